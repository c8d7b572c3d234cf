"""PEFT adapter directories <-> reparam (reparam.interop.peft), end to end on a two-layer MLP.

The torch model (``enc.l0``: 24 -> 32, tanh, ``enc.l1``: 32 -> 20) and its Flax twin share ``W0``.
(1) reparam trainables, perturbed away from init -> ``export`` -> ``PeftModel.from_pretrained`` on the
untouched torch model: the same logits. (2) a PEFT adapter made in torch with random nonzero weights and
``save_pretrained`` -> ``load`` -> ``plan.apply``: the same logits. Bad files fail with a ReparamError.
"""
from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from peft import LoKrConfig, LoraConfig, PeftModel, VeraConfig, get_peft_model, get_peft_model_state_dict
from safetensors.numpy import load_file, save_file

import reparam as rp
from reparam import kronecker as kr
from reparam import random_basis as rb
from reparam.interop import peft as rpeft
from reparam.plan import fingerprint_diff

pytestmark = pytest.mark.peft

D_IN, D_H, D_OUT, BATCH = 24, 32, 20, 5
TOL = 1e-5
MODULES = ["enc.l0", "enc.l1"]
ERRORS: dict[str, float] = {}


class TorchNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = torch.nn.ModuleDict({"l0": torch.nn.Linear(D_IN, D_H), "l1": torch.nn.Linear(D_H, D_OUT)})

    def forward(self, x):
        return self.enc["l1"](torch.tanh(self.enc["l0"](x)))


class Enc(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(D_OUT, name="l1")(jnp.tanh(nn.Dense(D_H, name="l0")(x)))


class FlaxNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return Enc(name="enc")(x)


def _torch_net():
    torch.manual_seed(0)
    return TorchNet().eval()


def _params():
    """The Flax twin's variables, holding the torch model's ``W0`` (``kernel = weight.T``)."""
    net = _torch_net()
    layer = lambda m: {"kernel": jnp.asarray(m.weight.detach().numpy().T),
                       "bias": jnp.asarray(m.bias.detach().numpy())}
    return {"params": {"enc": {"l0": layer(net.enc["l0"]), "l1": layer(net.enc["l1"])}}}


X = np.random.default_rng(0).standard_normal((BATCH, D_IN)).astype(np.float32)


def _ours(plan, frozen, trainable):
    return np.asarray(FlaxNet().apply(plan.apply(frozen, trainable), jnp.asarray(X)))


def _torch(model):
    with torch.no_grad():
        return model(torch.from_numpy(X)).numpy()


def _compare(name, ours, theirs):
    base = _torch(_torch_net())
    err = float(np.max(np.abs(ours - theirs)))
    ERRORS[name] = err
    print(f"[interop-peft] {name}: max |ours - peft| logits = {err:.2e} (max |logit| {np.max(np.abs(theirs)):.2f})")
    assert np.linalg.norm(theirs - base) > 0.05 * np.linalg.norm(base), "the adapter barely changes the logits"
    np.testing.assert_allclose(ours, theirs, rtol=TOL, atol=TOL, err_msg=name)


def perturb(tree, seed, scale):
    """Random nonzero trainables: ``x + scale · N(0, 1)`` per array (numpy: no per-shape compiles)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x + scale * rng.standard_normal(x.shape, np.float32)), tree)


def _plan(rules, seed=1):
    params = _params()
    plan = rp.plan(rules, params)
    frozen, trainable0 = plan.init(jax.random.key(seed), params)
    return plan, frozen, trainable0


# --- (1) reparam -> export -> PeftModel.from_pretrained --------------------------------------------

EXPORT_CASES = {
    "lora": [(r".*/kernel", rp.lora(4, alpha=8))],
    "rslora": [(r".*/kernel", rp.lora(4, alpha=8, rslora=True))],
    "lora_mixed_ranks": [(r".*/l0/kernel", rp.lora(4, alpha=8)), (r".*/l1/kernel", rp.lora(2, alpha=3))],
    "dora": [(r".*/kernel", rp.dora(4, alpha=8))],
    "pissa": [(r".*/kernel", rp.pissa(4, alpha=8))],
    "vera": [(r".*/kernel", rb.vera(8))],                  # fan_in=None: l0's d_in (24) < in_max (32)
    "lokr": [(r".*/kernel", kr.lokr(2, alpha=3.0))],
    "lokr_both_f4": [(r".*/kernel", kr.lokr(1, alpha=2.0, factor=4, decompose_both=True))],
}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_export_loads_in_peft(case, tmp_path):
    plan, frozen, trainable0 = _plan(EXPORT_CASES[case])
    trainable = perturb(trainable0, 2, 0.3)
    config = rpeft.export(plan, frozen, trainable, str(tmp_path), initial=trainable0)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors", "reparam_plan.json"]
    with open(tmp_path / "reparam_plan.json") as fh:       # the exporting plan, beside what PEFT reads
        assert fingerprint_diff(json.load(fh), plan.fingerprint()) == []
    assert config["target_modules"] == MODULES
    model = PeftModel.from_pretrained(_torch_net(), str(tmp_path)).eval()
    _compare(f"export {case}", _ours(plan, frozen, trainable), _torch(model))
    # the file's keys are exactly those PEFT itself would save for this config
    assert set(load_file(str(tmp_path / "adapter_model.safetensors"))) == set(get_peft_model_state_dict(model))
    if case == "pissa":     # a plain LoRA of rank 2r on the original W0
        assert config["r"] == 8 and config["init_lora_weights"] is True
    if case == "lora_mixed_ranks":
        assert config["rank_pattern"] and config["alpha_pattern"]
    if case in ("lora", "rslora", "dora", "vera", "lokr"):     # and it loads back into the same trainables
        back = rpeft.load(plan, frozen, str(tmp_path))
        for x, y in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(trainable)):
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


# --- (2) a PEFT adapter made in torch -> load --------------------------------------------------

def _randomize(model, seed=3):
    """Random nonzero values for every adapter parameter (VeRA's bases are buffers, not touched)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(0.3 * torch.randn(p.shape, generator=g) + (1.0 if "magnitude" in name else 0.0) * p)


LOAD_CASES = {   # PEFT config, our rules (alpha differs from the file's for "lora": factors get rescaled)
    "lora": (LoraConfig(r=4, lora_alpha=16, target_modules=MODULES), rp.lora(4)),
    "rslora": (LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=MODULES),
               rp.lora(4, alpha=8, rslora=True)),
    "dora": (LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=MODULES), rp.dora(4, alpha=8)),
    "vera": (VeraConfig(r=8, target_modules=MODULES), rb.vera(8)),
    "lokr": (LoKrConfig(r=2, alpha=3, target_modules=MODULES), kr.lokr(2, alpha=3.0)),
    "lokr_both_f4": (LoKrConfig(r=1, alpha=8, decompose_factor=4, decompose_both=True, target_modules=MODULES),
                     kr.lokr(1, alpha=1.0, factor=4, decompose_both=True)),
}


def _peft_adapter(config, directory, vera_key=None):
    """A PEFT model with random adapter weights, saved to ``directory``; VeRA's bases from ``vera_key`` if given."""
    model = get_peft_model(_torch_net(), config).eval()
    _randomize(model)
    if vera_key is not None:
        # our bases, as export writes them: [r, in_max] and [out_max, r] (PEFT draws its own with torch)
        a, b = rb.vera_basis(vera_key, D_H, D_H, config.r, fan_in=D_H)
        model.base_model.vera_A["default"] = torch.from_numpy(np.asarray(a).T.copy())
        model.base_model.vera_B["default"] = torch.from_numpy(np.asarray(b).T.copy())
    model.save_pretrained(directory)
    return model


@pytest.mark.parametrize("case", list(LOAD_CASES))
def test_peft_adapter_loads_here(case, tmp_path):
    config, t = LOAD_CASES[case]
    plan, frozen, _ = _plan([(r".*/kernel", t)])
    vera_key = frozen["params"]["enc"]["l0"]["kernel"]["key"] if case == "vera" else None
    model = _peft_adapter(config, str(tmp_path), vera_key)
    trainable = rpeft.load(plan, frozen, str(tmp_path))
    _compare(f"load {case}", _ours(plan, frozen, trainable), _torch(model))


# --- bad input -----------------------------------------------------------------------------------

def test_wrong_rank_is_a_clear_error(tmp_path):
    _peft_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=MODULES), str(tmp_path))
    plan, frozen, _ = _plan([(r".*/kernel", rp.lora(2))])
    with pytest.raises(rp.ReparamError, match=r"base_model\.model\.enc\.l0\.lora_A\.weight.*shape \(4, 24\).*"
                                              r"needs \(2, 24\).*use the file's r"):
        rpeft.load(plan, frozen, str(tmp_path))


def test_missing_and_extra_keys_are_clear_errors(tmp_path):
    plan, frozen, tr0 = _plan([(r".*/kernel", rp.lora(4))])
    rpeft.export(plan, frozen, perturb(tr0, 2, 0.3), str(tmp_path))
    path = str(tmp_path / "adapter_model.safetensors")
    tensors = load_file(path)
    del tensors["base_model.model.enc.l1.lora_B.weight"]
    save_file(tensors, path)
    with pytest.raises(rp.ReparamError, match=r"key 'base_model\.model\.enc\.l1\.lora_B\.weight' is missing.*"
                                              r"params/enc/l1/kernel.*module_map"):
        rpeft.load(plan, frozen, str(tmp_path))
    # a plan that adapts only l0 leaves the file's l1 keys unread
    plan0, frozen0, _ = _plan([(r".*/l0/kernel", rp.lora(4))])
    with pytest.raises(rp.ReparamError, match=r"keys no adapted parameter reads.*enc\.l1\.lora_A"):
        rpeft.load(plan0, frozen0, str(tmp_path))
    # module names that match nothing in the file
    with pytest.raises(rp.ReparamError, match=r"missing.*'model\.enc\.l0'.*fix module_map"):
        rpeft.load(plan, frozen, str(tmp_path), module_map=lambda p: "model." + rpeft.default_module_name(p))


def test_method_mismatch_and_missing_inputs(tmp_path):
    plan, frozen, tr0 = _plan([(r".*/kernel", rp.lora(4))])
    rpeft.export(plan, frozen, tr0, str(tmp_path))
    vplan, vfrozen, _ = _plan([(r".*/kernel", rb.vera(4))])
    with pytest.raises(rp.ReparamError, match=r"is a LORA adapter but the plan adapts 'params/enc/l0/kernel' with "
                                              r"vera.*use rp.lora"):
        rpeft.load(vplan, vfrozen, str(tmp_path))
    dplan, dfrozen, _ = _plan([(r".*/kernel", rp.dora(4))])
    with pytest.raises(rp.ReparamError, match=r"use rp.lora"):
        rpeft.load(dplan, dfrozen, str(tmp_path))
    pplan, pfrozen, ptr0 = _plan([(r".*/kernel", rp.pissa(4))])
    with pytest.raises(rp.ReparamError, match=r"principal init.*initial="):
        rpeft.export(pplan, pfrozen, ptr0, str(tmp_path / "p"))
    with pytest.raises(rp.ReparamError, match=r"module_map has no entry for the adapted parameter "
                                              r"'params/enc/l1/kernel'"):
        rpeft.export(plan, frozen, tr0, str(tmp_path / "m"), module_map={"params/enc/l0/kernel": "enc.l0"})
    mixed, mfrozen, mtr = _plan([(r".*/l0/kernel", rp.lora(4)), (r".*/l1/kernel", rb.vera(4))])
    with pytest.raises(rp.ReparamError, match=r"one PEFT adapter holds one method"):
        rpeft.export(mixed, mfrozen, mtr, str(tmp_path / "x"))
    with pytest.raises(rp.ReparamError, match=r"does not exist"):
        rpeft.load(plan, frozen, str(tmp_path / "nowhere"))


def test_vera_with_torch_bases_is_refused(tmp_path):
    _peft_adapter(VeraConfig(r=8, target_modules=MODULES), str(tmp_path))
    plan, frozen, _ = _plan([(r".*/kernel", rb.vera(8))])
    with pytest.raises(rp.ReparamError, match=r"base_model\.vera_A .*not the basis.*merge_and_unload"):
        rpeft.load(plan, frozen, str(tmp_path))
    cfg = json.load(open(tmp_path / "adapter_config.json"))
    cfg["save_projection"] = False
    tensors = {k: v for k, v in load_file(str(tmp_path / "adapter_model.safetensors")).items() if "vera_A" not in k}
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(rp.ReparamError, match=r"save_projection=False"):
        rpeft.load(plan, frozen, str(tmp_path))


def test_module_map_forms(tmp_path):
    assert rpeft.default_module_name("params/encoder/layer_0/attention/query/kernel") == \
        "encoder.layer_0.attention.query"
    assert rpeft.default_module_name("enc/l0/kernel") == "enc.l0"
    plan, frozen, tr0 = _plan([(r".*/kernel", rp.lora(4))])
    tr = perturb(tr0, 2, 0.3)
    # a dict (full PEFT names with the base_model.model. prefix) and a function give the default's file
    as_dict = {f"params/enc/l{i}/kernel": f"base_model.model.enc.l{i}" for i in range(2)}
    for i, mm in enumerate([None, as_dict, lambda p: p.split("/", 1)[1].removesuffix("/kernel").replace("/", ".")]):
        rpeft.export(plan, frozen, tr, str(tmp_path / str(i)), module_map=mm)
        assert load_file(str(tmp_path / str(i) / "adapter_model.safetensors")).keys() == \
            load_file(str(tmp_path / "0" / "adapter_model.safetensors")).keys()
    with pytest.raises(rp.ReparamError, match=r"sends both 'params/enc/l0/kernel' and 'params/enc/l1/kernel'"):
        rpeft.export(plan, frozen, tr, str(tmp_path / "x"), module_map=lambda p: "enc")
