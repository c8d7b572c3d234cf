"""What a run on a quantised base saves: checkpoints and PEFT exports hold the adapter, never the base (issue 16).

A checkpoint of a LoRA run on an nf4 base restores the trainables and optimizer state it saved and resumes
bit-identically (one program, one machine), and none of its entries is, or is as big as, the base's codes.
A PEFT export of an adapter trained on an nf4 base is exactly the export of the same trainables on the
dequantised base -- the adapter alone, as PEFT writes for QLoRA -- and loads back into the trainables.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file

import reparam as rp
from reparam import quant
from reparam.interop import peft as rpeft
from reparam.plan import path_str

CONFIG = {"base_format": "nf4", "method": "lora", "rank": 2}


def _perturbed(tree, seed=5):
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(tree))))
    return jax.tree.map(lambda a: a + 0.1 * jax.random.normal(next(keys), a.shape, a.dtype), tree)


def test_checkpoint_on_an_nf4_base_holds_the_adapter_only(tmp_path):
    params = {"l1": {"kernel": jax.random.normal(jax.random.key(0), (1024, 512)) / 32}}
    q = quant.quantize(params, "nf4")
    plan = rp.plan([(r"l1/kernel", rp.lora(2))], q)
    frozen, trainable = plan.init(jax.random.key(1), q)
    assert quant.is_quantized(frozen["l1"]["kernel"]["base"])
    opt = optax.adam(1e-2)
    x = jax.random.normal(jax.random.key(2), (8, 1024))
    loss = lambda p, b, rng: jnp.mean((b @ p["l1"]["kernel"] - 1.0) ** 2)
    step = rp.train.make_train_step(plan, loss, opt, donate=False)
    fresh = lambda: rp.train.init_state(plan.init(jax.random.key(1), q)[1], opt, jax.random.key(3))

    straight = fresh()
    for _ in range(4):
        straight, _ = step(straight, frozen, x)
    mgr = rp.checkpoint.manager(str(tmp_path / "ck"))
    state = fresh()
    for _ in range(2):
        state, _ = step(state, frozen, x)
    rp.checkpoint.save(mgr, state, CONFIG, plan=plan)

    saved = mgr.item_metadata(2)["state"]
    paths = [path_str(k) for k, _ in jax.tree_util.tree_flatten_with_path(getattr(saved, "tree", saved))[0]]
    assert paths and all(p.split("/")[0] in ("step", "trainable", "opt_state", "rng") for p in paths), paths
    assert not any(w in p for p in paths for w in ("base", "codes", "scales")), paths
    base_bytes = frozen["l1"]["kernel"]["base"].nbytes                              # 262,144 codes + 32,768 scales
    on_disk = sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(tmp_path / "ck") for n in ns)
    assert on_disk < base_bytes / 2, (on_disk, base_bytes)                          # 3 x 12 KB of LoRA + adam

    restored = rp.checkpoint.restore(mgr, like=fresh(), config=CONFIG, plan=plan)
    mgr.close()
    jax.tree.map(np.testing.assert_array_equal, restored.trainable, state.trainable)
    jax.tree.map(np.testing.assert_array_equal, restored.opt_state, state.opt_state)
    for _ in range(2):
        restored, _ = step(restored, frozen, x)          # frozen: the nf4 base, rebuilt, never restored
    jax.tree.map(np.testing.assert_array_equal, restored.trainable, straight.trainable)


MODULES = {"l1/kernel": "l1", "layers/q/kernel": "layers.{layer}.q"}


@pytest.mark.parametrize("name", ["lora", "dora"])
def test_peft_export_on_an_nf4_base_is_the_adapter(tmp_path, name):
    """Plain and stacked (three layers, ``nn.scan``-style) kernels on nf4: the export equals, file for file,
    the export of the same trainables on the dequantised base; its tensors are exactly the adapter's entries
    (``lora_A`` / ``lora_B``, DoRA's magnitudes) per module and layer; loading it gives the trainables back."""
    k = jax.random.split(jax.random.key(0), 2)
    params = {"l1": {"kernel": jax.random.normal(k[0], (128, 64))},
              "layers": {"q": {"kernel": jax.random.normal(k[1], (3, 64, 128))}}}
    q = quant.quantize(params, "nf4")
    t = {"lora": rp.lora(4, alpha=8), "dora": rp.dora(4, alpha=8)}[name]
    rules = [(r"l1/kernel|layers/q/kernel", t)]
    plan = rp.plan(rules, q, stacked=r"layers/.*")
    frozen, trainable = plan.init(jax.random.key(1), q)
    trainable = _perturbed(trainable)                   # "trained"
    config = rpeft.export(plan, frozen, trainable, str(tmp_path / "q"), module_map=MODULES)

    deq = quant.dequantize(q)
    plan32 = rp.plan(rules, deq, stacked=r"layers/.*")
    frozen32, _ = plan32.init(jax.random.key(1), deq)
    config32 = rpeft.export(plan32, frozen32, trainable, str(tmp_path / "f32"), module_map=MODULES)
    assert config == config32
    assert sorted(os.listdir(tmp_path / "q")) == sorted(os.listdir(tmp_path / "f32"))
    got, want = (load_file(str(tmp_path / d / rpeft.WEIGHTS_NAME)) for d in ("q", "f32"))
    assert got.keys() == want.keys()
    for key in got:
        np.testing.assert_array_equal(got[key], want[key])

    modules = ["l1"] + [f"layers.{i}.q" for i in range(3)]
    parts = ["lora_A.weight", "lora_B.weight"] + (["lora_magnitude_vector"] if name == "dora" else [])
    assert set(got) == {f"{rpeft.PREFIX}{m}.{p}" for m in modules for p in parts}
    n_adapter = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(trainable))
    assert sum(a.size for a in got.values()) == n_adapter                          # nothing of the base
    assert json.loads((tmp_path / "q" / rpeft.CONFIG_NAME).read_text())["target_modules"] == modules

    back = rpeft.load(plan, frozen, str(tmp_path / "q"), module_map=MODULES)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=0), back, trainable)
