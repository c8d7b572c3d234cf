"""Numeric parity with Hugging Face PEFT (torch CPU, float32) for VeRA and RandLoRA, and saved sizes.

Our bases come from JAX's threefry and PEFT's from torch's generator, so each
case copies our regenerated bases into PEFT's shared buffers (transposed to its
``[out, in]`` layout), puts the same trained vectors on both sides and compares
layer outputs (ours: ``x @ W + bias``). Layouts:

- VeRA: ``vera_A [r, in] = Aᵀ``, ``vera_B [out, r] = Bᵀ``, ``vera_lambda_d = d``, ``vera_lambda_b = b``.
- RandLoRA: ``randlora_A [r, 1, min] = Aᵀ``; ``randlora_B [max, N, r]`` flattened to
  ``[max, N·r]`` pairs its column ``ρ·N + n`` with ``randlora_A`` row ``ρ`` of basis ``n``
  (PEFT flattens the two sides in different orders), so our ``B[n, ρ, :]`` goes
  there; ``randlora_lambda = lambda [r, N]``, ``randlora_gamma = gamma [N, min]``.
"""
from __future__ import annotations

import math
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from peft import RandLoraConfig, VeraConfig, get_peft_model
from safetensors.numpy import save as st_save

import reparam as rp
from reparam import random_basis as rb
from tests.methods import perturb

pytestmark = pytest.mark.peft

BATCH, TOL = 6, 1e-5


class _Net(torch.nn.Module):
    def __init__(self, d_in, d_out, n=1):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(d_in, d_out) for _ in range(n))

    def forward(self, x):
        return self.layers[0](x)


def _peft(config, d_in, d_out, n=1, seed=0):
    torch.manual_seed(seed)
    net = _Net(d_in, d_out, n)
    w0 = net.layers[0].weight.detach().numpy().T.copy()
    bias = net.layers[0].bias.detach().numpy().copy()
    model = get_peft_model(net, config)
    model.eval()
    return model, model.base_model.model.layers[0], w0, bias


def _ours(t, w0, bias, seed=1):
    """Our layer with perturbed trainables: (frozen, trainable, forward)."""
    frozen, trainable = t.init(jax.random.key(seed), jnp.asarray(w0))
    trainable = perturb(trainable, jax.random.key(seed + 1), 0.3)
    return frozen, trainable, lambda x: np.asarray(x @ t.apply(frozen, trainable) + bias)


def _t(x):
    return torch.tensor(np.asarray(x, np.float32))


def _compare(model, forward, d_in):
    x = np.random.default_rng(0).standard_normal((BATCH, d_in)).astype(np.float32)
    with torch.no_grad():
        theirs = model(_t(x)).numpy()
    ours = forward(jnp.asarray(x))
    err, scale = float(np.max(np.abs(ours - theirs))), max(1.0, float(np.max(np.abs(theirs))))
    print(f"max |ours - peft| = {err:.2e} (max |y| = {scale:.1f}, relative {err / scale:.1e})")
    assert err <= TOL * scale


@pytest.mark.parametrize("d_in,d_out,r", [(48, 40, 8), (24, 56, 64)])
def test_vera_parity(d_in, d_out, r):
    model, layer, w0, bias = _peft(VeraConfig(r=r, target_modules=["layers.0"], vera_dropout=0.0), d_in, d_out)
    t = rb.vera(r)
    fresh = t.init(jax.random.key(0), jnp.asarray(w0))[1]        # same init as PEFT: d = 0.1, b = 0
    np.testing.assert_array_equal(fresh["d"], layer.vera_lambda_d["default"].detach().numpy())
    np.testing.assert_array_equal(fresh["b"], layer.vera_lambda_b["default"].detach().numpy())
    frozen, tr, forward = _ours(t, w0, bias)
    a, b = rb.vera_basis(frozen["key"], d_in, d_out, r)
    # same kaiming-uniform scale as PEFT's own draw (one layer: in_max = d_in)
    for ours, theirs in ((a.T, layer.vera_A["default"]), (b.T, layer.vera_B["default"])):
        bound = float(theirs.abs().max())
        assert float(jnp.abs(ours).max()) <= bound * 1.02 and abs(float(ours.std()) / float(theirs.std()) - 1) < 0.15
    with torch.no_grad():
        layer.vera_A["default"] = _t(a.T)
        layer.vera_B["default"] = _t(b.T)
        layer.vera_lambda_d["default"].copy_(_t(tr["d"]))
        layer.vera_lambda_b["default"].copy_(_t(tr["b"]))
    _compare(model, forward, d_in)


def _peft_randlora_B(b):
    """Our ``B [N, r, max]`` in PEFT's ``randlora_B [max, N, r]`` (see the module docstring)."""
    n, r, hi = b.shape
    return np.asarray(b).transpose(2, 1, 0).reshape(hi, r * n).reshape(hi, n, r)


@pytest.mark.parametrize("d_in,d_out,r", [(40, 48, 7), (33, 20, 6)])
def test_randlora_parity(d_in, d_out, r):
    alpha = 3.0 * r
    model, layer, w0, bias = _peft(RandLoraConfig(r=r, target_modules=["layers.0"], randlora_alpha=alpha,
                                                  randlora_dropout=0.0), d_in, d_out)
    t = rb.randlora(r, alpha=alpha, scaling="peft")
    fresh = t.init(jax.random.key(0), jnp.asarray(w0))[1]        # same shapes and init: lambda = 0, gamma = 1/min
    np.testing.assert_array_equal(fresh["lambda"], layer.randlora_lambda["default"].detach().numpy())
    np.testing.assert_allclose(fresh["gamma"], layer.randlora_gamma["default"].detach().numpy(), rtol=1e-7)
    frozen, tr, forward = _ours(t, w0, bias)
    a, b = rb.randlora_basis(frozen["key"], min(d_in, d_out), max(d_in, d_out), r)
    for ours, theirs in ((a, layer.randlora_A["default"]), (b, layer.randlora_B["default"])):
        assert ours.size == theirs.numel() and abs(float(ours.std()) - float(theirs.float().std())) < 0.15
    with torch.no_grad():
        layer.randlora_A["default"] = _t(a.T[:, None, :])
        layer.randlora_B["default"] = _t(_peft_randlora_B(b))
        layer.randlora_lambda["default"].copy_(_t(tr["lambda"]))
        layer.randlora_gamma["default"].copy_(_t(tr["gamma"]))
    _compare(model, forward, d_in)
    # the paper's (official code's) scaling is PEFT's divided by √N
    paper = rb.randlora(r, alpha=alpha)
    np.testing.assert_allclose(paper.delta(frozen, tr) * math.sqrt(rb.num_bases(d_in, d_out, r)),
                               t.delta(frozen, tr), rtol=1e-5, atol=1e-6)


# --- saved sizes: ours (key + trained vectors) vs PEFT's save_pretrained (save_projection=True) ----

def _peft_saved_bytes(model) -> int:
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        return os.path.getsize(os.path.join(d, "adapter_model.safetensors"))


def _our_saved_bytes(t, width, n_layers) -> int:
    params = {f"l{i}": {"kernel": jax.ShapeDtypeStruct((width, width), jnp.float32)} for i in range(n_layers)}
    plan = rp.plan([(r".*/kernel", t)], params)
    frozen, trainable = jax.eval_shape(plan.init, jax.random.key(0), params)
    tensors = {}
    for leaf, tr in zip(plan.leaves, plan.treedef.flatten_up_to(trainable)):
        tensors[leaf.path + "/key"] = np.zeros((2,), np.uint32)              # jax.random.key_data
        tensors.update({f"{leaf.path}/{k}": np.zeros(v.shape, v.dtype) for k, v in tr.items()})
    return len(st_save(tensors))


@pytest.mark.parametrize("method", ["vera", "randlora"])
def test_saved_size_vs_peft(method):
    width, n_layers, r = 256, 4, 32
    targets = [f"layers.{i}" for i in range(n_layers)]
    if method == "vera":
        cfg, t, bases = VeraConfig(r=r, target_modules=targets), rb.vera(r), 2 * r * width
    else:
        n = rb.num_bases(width, width, r)
        cfg, t, bases = RandLoraConfig(r=r, target_modules=targets), rb.randlora(r), r * width + n * r * width
    assert cfg.save_projection                                    # PEFT's default: bases in the file
    model = get_peft_model(_Net(width, width, n_layers), cfg)
    peft_bytes, ours = _peft_saved_bytes(model), _our_saved_bytes(t, width, n_layers)
    print(f"{method}: {n_layers} layers {width}x{width}, r={r}: ours {ours:,} B (keys + trained vectors); "
          f"PEFT save_pretrained(save_projection=True) {peft_bytes:,} B; one copy of the shared bases alone "
          f"is {4 * bases:,} B")
    assert ours + 4 * bases <= peft_bytes
