"""Numeric parity of LoKr with Hugging Face PEFT (torch CPU, float32).

PEFT's LoKr weight is ``[out, in]``: ``ΔW_peft = s · lokr_w1 ⊗ lokr_w2`` with ``lokr_w1 = w1_a @ w1_b`` and
``lokr_w2 = w2_a @ w2_b`` when decomposed. Ours is ``[in, out]`` and ``(X ⊗ Y)ᵀ = Xᵀ ⊗ Yᵀ``, so each factor
maps by a transpose: ``A = w1ᵀ``, ``A1 = w1_bᵀ``, ``A2 = w1_aᵀ``, ``B = w2ᵀ``, ``B1 = w2_bᵀ``, ``B2 = w2_aᵀ``.
Every case builds a one-``nn.Linear`` torch module, wraps it with ``get_peft_model``, checks that both sides
make the same factors (names, shapes, which one is zero, init bounds), puts the same random factor values on
both sides and compares layer outputs and merged weights.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from peft import LoKrConfig, get_peft_model

from reparam import kronecker as kr

pytestmark = pytest.mark.peft

TOL = 1e-5
# ours -> PEFT parameter name (each transposed)
NAMES = {"A": "lokr_w1", "A1": "lokr_w1_b", "A2": "lokr_w1_a", "B": "lokr_w2", "B1": "lokr_w2_b", "B2": "lokr_w2_a"}


class _Net(torch.nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.lin = torch.nn.Linear(d_in, d_out, bias=True)

    def forward(self, x):
        return self.lin(x)


CASES = [  # d_in, d_out, r, alpha, factor, decompose_both: which factors are full / low-rank
    (48, 40, 2, 4.0, -1, False),     # A [6, 5] full, B = B1 @ B2 (2 < 8/2)
    (48, 40, 8, 8.0, -1, False),     # A full, B [8, 8] full (8 >= 8/2)
    (64, 32, 1, 3.0, 4, True),       # factor 4: A = A1 @ A2 [4, 4] (1 < 4/2), B = B1 @ B2 [16, 8]
    (30, 42, 2, 2.0, -1, True),      # A [5, 6] = A1 @ A2, B [6, 7] = B1 @ B2
]


@pytest.mark.parametrize("d_in,d_out,r,alpha,factor,both", CASES)
def test_lokr_matches_peft(d_in, d_out, r, alpha, factor, both):
    torch.manual_seed(0)
    net = _Net(d_in, d_out)
    w0 = net.lin.weight.detach().numpy().T.copy()
    bias = net.lin.bias.detach().numpy().copy()
    cfg = LoKrConfig(r=r, alpha=alpha, target_modules=["lin"], decompose_factor=factor, decompose_both=both)
    model = get_peft_model(net, cfg)
    model.eval()
    layer = model.base_model.model.lin
    theirs = {k: getattr(layer, v)["default"].detach().numpy().T for k, v in NAMES.items()
              if "default" in getattr(layer, v)}

    t = kr.lokr(r, alpha, factor=factor, decompose_both=both)
    frozen, ours = t.init(jax.random.key(0), jnp.asarray(w0))
    # the same factors, the same one zero, the same kaiming-uniform bound U(±1/√rows) on the others
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    for k in ours:
        zero_ours, zero_theirs = not np.any(np.asarray(ours[k])), not np.any(theirs[k])
        assert zero_ours == zero_theirs, k
        if not zero_ours:
            bound = 1 / np.sqrt(ours[k].shape[0])
            assert np.max(np.abs(ours[k])) <= bound and np.max(np.abs(theirs[k])) <= bound + 1e-7, k

    # the same nonzero values on both sides -> the same outputs and merged weight
    rng = np.random.default_rng(1)
    values = {k: rng.normal(0, 0.3, v.shape).astype(np.float32) for k, v in ours.items()}
    with torch.no_grad():
        for k, v in values.items():
            getattr(layer, NAMES[k])["default"].copy_(torch.from_numpy(v.T.copy()))
    x = rng.normal(size=(6, d_in)).astype(np.float32)
    w = np.asarray(t.apply(frozen, {k: jnp.asarray(v) for k, v in values.items()}))
    with torch.no_grad():
        y_peft = model(torch.from_numpy(x)).numpy()
        with model.disable_adapter():
            y_base = model(torch.from_numpy(x)).numpy()
    y_ours = x @ w + bias
    err = float(np.max(np.abs(y_ours - y_peft)))
    print(f"[peft-parity] lokr{(d_in, d_out, r, alpha, factor, both)}: max |ours - peft| = {err:.3e}")
    np.testing.assert_allclose(y_ours, y_peft, rtol=TOL, atol=TOL)
    assert np.linalg.norm(y_peft - y_base) > 0.05 * np.linalg.norm(y_base)      # the adapter matters
    merged = model.merge_and_unload().lin.weight.detach().numpy().T
    np.testing.assert_allclose(w, merged, rtol=TOL, atol=TOL)
