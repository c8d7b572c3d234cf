"""Numeric parity with Hugging Face PEFT (torch CPU, float32): LoRA, rsLoRA, DoRA, PiSSA.

Conventions: our kernel is ``[d_in, d_out]`` with ``y = x @ W``; torch's Linear
weight is ``[out, in]``, so PEFT's ``lora_A.weight`` is our ``A.T`` and
``lora_B.weight`` our ``B.T``. Every case builds a one-``nn.Linear`` torch module,
wraps it with ``peft.get_peft_model``, puts the same adapter values on both sides
and compares layer outputs (ours: ``x @ W + bias``).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

import reparam as rp

pytestmark = pytest.mark.peft

D_IN, D_OUT, R, BATCH = 48, 40, 8, 6
TOL = 1e-5


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(D_IN, D_OUT, bias=True)

    def forward(self, x):
        return self.lin(x)


# --- helpers ------------------------------------------------------------------------------------

def _peft_layer(seed: int = 0, decay=None, **lora_kwargs):
    """``(peft_model, lora_layer, W0 [d_in, d_out], bias)`` for ``LoraConfig(r=R, **lora_kwargs)``.

    ``decay``: replace the singular values of torch's init by ``σ_0 · decay^i`` (a
    pretrained-like spectrum whose gaps make singular vectors well conditioned).
    ``W0`` is read before PEFT wraps the module (PiSSA rewrites the base weight).
    """
    torch.manual_seed(seed)
    net = _Net()
    if decay is not None:
        with torch.no_grad():
            u, sv, vh = torch.linalg.svd(net.lin.weight, full_matrices=False)
            net.lin.weight.copy_((u * (sv[0] * decay ** torch.arange(len(sv)))) @ vh)
    w0 = net.lin.weight.detach().numpy().T.copy()
    bias = net.lin.bias.detach().numpy().copy()
    model = get_peft_model(net, LoraConfig(r=R, target_modules=["lin"], lora_dropout=0.0, **lora_kwargs))
    model.eval()
    return model, model.base_model.model.lin, w0, bias


def _peft_factors(layer):
    """PEFT's adapter in our convention: ``A [d_in, r] = lora_A.weight.T``, ``B [r, d_out] = lora_B.weight.T``."""
    return (layer.lora_A["default"].weight.detach().numpy().T.copy(),
            layer.lora_B["default"].weight.detach().numpy().T.copy())


def _copy_adapters(layer, A, B, m=None):
    """Writes our ``A``, ``B`` (and DoRA's ``m``) into PEFT's parameters."""
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.from_numpy(np.asarray(A, np.float32).T.copy()))
        layer.lora_B["default"].weight.copy_(torch.from_numpy(np.asarray(B, np.float32).T.copy()))
        if m is not None:
            layer.lora_magnitude_vector["default"].weight.copy_(torch.from_numpy(np.asarray(m, np.float32)))


def _random_adapters(seed: int, w0=None, base=None):
    """Nonzero ``A``, ``B`` (``base`` factors + noise when given) and, with ``w0``, a magnitude ``m``."""
    rng = np.random.default_rng(seed)
    out = {"A": rng.normal(0, 0.1, (D_IN, R)).astype(np.float32),
           "B": rng.normal(0, 0.1, (R, D_OUT)).astype(np.float32)}
    if base is not None:
        out = {k: (base[k] + out[k]).astype(np.float32) for k in ("A", "B")}
    if w0 is not None:
        out["m"] = (np.linalg.norm(w0, axis=0) * rng.uniform(0.5, 1.5, D_OUT)).astype(np.float32)
    return out


def _inputs(seed: int = 7):
    return np.random.default_rng(seed).normal(size=(BATCH, D_IN)).astype(np.float32)


def _our_layer(transform, w0, bias, via: str = "transform"):
    """``(frozen, trainable, forward)`` of our layer, ``forward(trainable, x) = x @ W + bias``.

    ``via="transform"`` uses the bare transform on the kernel; ``via="plan"`` goes
    through ``rp.plan`` on a ``{"lin": {"kernel", "bias"}}`` params tree (the bias
    stays frozen) and ``plan.apply``. ``frozen``/``trainable`` are the kernel's.
    """
    key = jax.random.key(0)
    if via == "transform":
        frozen, trainable = transform.init(key, jnp.asarray(w0))
        return frozen, trainable, lambda tr, x: x @ transform.apply(frozen, tr) + bias
    params = {"lin": {"kernel": jnp.asarray(w0), "bias": jnp.asarray(bias)}}
    plan = rp.plan([(r"lin/kernel", transform)], params)
    frozen, trainable = plan.init(key, params)

    def forward(tr, x):
        p = plan.apply(frozen, {"lin": {"kernel": tr, "bias": trainable["lin"]["bias"]}})
        return x @ p["lin"]["kernel"] + p["lin"]["bias"]
    return frozen["lin"]["kernel"], trainable["lin"]["kernel"], forward


def _peft_out(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def _assert_close(name, ours, theirs, rtol=TOL, atol=TOL):
    """``allclose`` in float64, printing the max absolute error (``pytest -s`` shows it)."""
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape, f"{name}: shape {ours.shape} vs PEFT {theirs.shape}"
    err = float(np.max(np.abs(ours - theirs)))
    print(f"[peft-parity] {name}: max |ours - peft| = {err:.3e} (max |peft| = {np.max(np.abs(theirs)):.3g})")
    np.testing.assert_allclose(ours, theirs, rtol=rtol, atol=atol, err_msg=name)
    return err


def _assert_adapter_matters(model, x, y):
    """The adapted output differs clearly from the base output, so parity is not vacuous."""
    with model.disable_adapter(), torch.no_grad():
        y_base = model(torch.from_numpy(x)).numpy()
    assert np.linalg.norm(y - y_base) > 0.05 * np.linalg.norm(y_base)


def _align_signs(a, b, a_ref):
    """Flips each component ``(a[:, i], b[i])`` together so that ``a[:, i]`` points like ``a_ref[:, i]``."""
    sign = np.sign(np.sum(np.asarray(a) * a_ref, axis=0))
    return np.asarray(a) * sign, sign[:, None] * np.asarray(b)


# --- LoRA / rsLoRA (bare transform and through a plan) -------------------------------------------

@pytest.mark.parametrize("rslora,via", [(False, "transform"), (True, "transform"), (False, "plan")])
def test_lora_parity(rslora, via):
    model, layer, w0, bias = _peft_layer(lora_alpha=16, use_rslora=rslora)
    assert layer.scaling["default"] == pytest.approx(16 / math.sqrt(R) if rslora else 16 / R)
    frozen, tr0, forward = _our_layer(rp.lora(R, alpha=16, rslora=rslora), w0, bias, via)
    x = _inputs()

    # Default init: same shapes, B = 0, A from the same U(±1/√d_in) (PEFT's kaiming-uniform a=√5).
    a_peft, b_peft = _peft_factors(layer)
    bound = 1.0 / math.sqrt(D_IN)
    for who, a, b in (("ours", tr0["A"], tr0["B"]), ("peft", a_peft, b_peft)):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == (D_IN, R) and b.shape == (R, D_OUT), who
        assert np.all(b == 0), who
        assert 0.9 * bound < np.max(np.abs(a)) <= bound * (1 + 1e-6), (who, np.max(np.abs(a)), bound)
    _assert_close(f"lora(rslora={rslora}, {via}) init output", forward(tr0, x), _peft_out(model, x))

    # Same nonzero adapter on both sides -> same output and same delta.
    ad = _random_adapters(1)
    _copy_adapters(layer, ad["A"], ad["B"])
    tr = {"A": jnp.asarray(ad["A"]), "B": jnp.asarray(ad["B"])}
    y_peft = _peft_out(model, x)
    _assert_adapter_matters(model, x, y_peft)
    _assert_close(f"lora(rslora={rslora}, {via}) output", forward(tr, x), y_peft)
    if via == "transform":
        _assert_close(f"lora(rslora={rslora}) delta", rp.lora(R, alpha=16, rslora=rslora).delta(frozen, tr),
                      layer.get_delta_weight("default").detach().numpy().T)
    else:
        n_peft, _ = model.get_nb_trainable_parameters()
        assert sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(tr0)) == n_peft


# --- DoRA ---------------------------------------------------------------------------------------

def test_dora_parity_and_grads():
    model, layer, w0, bias = _peft_layer(lora_alpha=16, use_dora=True)
    t = rp.dora(R, alpha=16)
    _, tr0, forward = _our_layer(t, w0, bias)
    x = _inputs()

    # Init: PEFT's magnitude = row norms of W [out, in] = our column norms of W0.
    m_peft = layer.lora_magnitude_vector["default"].weight.detach().numpy()
    _assert_close("dora init magnitude", tr0["m"], m_peft, rtol=1e-6, atol=1e-6)

    ad = _random_adapters(2, w0=w0)
    _copy_adapters(layer, ad["A"], ad["B"], ad["m"])
    tr = {k: jnp.asarray(v) for k, v in ad.items()}
    y_peft = _peft_out(model, x)
    _assert_adapter_matters(model, x, y_peft)
    _assert_close("dora output", forward(tr, x), y_peft)

    # Gradients of sum(y²): PEFT detaches ‖V‖, and so do we by default.
    model.zero_grad()
    (model(torch.from_numpy(x)) ** 2).sum().backward()
    g_peft = {"A": layer.lora_A["default"].weight.grad.numpy().T,
              "B": layer.lora_B["default"].weight.grad.numpy().T,
              "m": layer.lora_magnitude_vector["default"].weight.grad.numpy()}

    def grads(transform):
        _, _, fwd = _our_layer(transform, w0, bias)
        return jax.grad(lambda p: jnp.sum(fwd(p, x) ** 2))(tr)

    g_ours = grads(t)
    for k in ("A", "B", "m"):
        scale = np.max(np.abs(g_peft[k]))
        _assert_close(f"dora grad {k} (relative to max |grad|)", g_ours[k] / scale, g_peft[k] / scale,
                      rtol=1e-4, atol=1e-4)
    # The comparison is sensitive to the detach: differentiating through ‖V‖ gives other gradients.
    g_full = grads(rp.dora(R, alpha=16, detach_norm=False))
    assert not np.allclose(g_full["A"], g_peft["A"], rtol=1e-3, atol=1e-3 * np.max(np.abs(g_peft["A"])))


# --- PiSSA --------------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [8, 16])
def test_pissa_exact_parity(alpha):
    model, layer, w0, bias = _peft_layer(lora_alpha=alpha, init_lora_weights="pissa", decay=0.85)
    frozen, tr0, forward = _our_layer(rp.pissa(R, alpha=alpha), w0, bias)
    x = _inputs()

    w_res_peft = layer.get_base_layer().weight.detach().numpy().T
    _assert_close(f"pissa(alpha={alpha}) W_res", frozen["base"], w_res_peft)
    a_peft, b_peft = _peft_factors(layer)
    a, b = _align_signs(tr0["A"], tr0["B"], a_peft)
    _assert_close(f"pissa(alpha={alpha}) A (sign-aligned)", a, a_peft)
    _assert_close(f"pissa(alpha={alpha}) B (sign-aligned)", b, b_peft)

    y_peft = _peft_out(model, x)
    _assert_close(f"pissa(alpha={alpha}) init output, our factors", forward(tr0, x), y_peft)
    pf = {"A": jnp.asarray(a_peft), "B": jnp.asarray(b_peft)}
    _assert_close(f"pissa(alpha={alpha}) init output, PEFT factors", forward(pf, x), y_peft)

    # A trained adapter: PEFT's factors moved by the same noise on both sides.
    ad = _random_adapters(3, base={"A": a_peft, "B": b_peft})
    _copy_adapters(layer, ad["A"], ad["B"])
    y_peft = _peft_out(model, x)
    _assert_adapter_matters(model, x, y_peft)
    _assert_close(f"pissa(alpha={alpha}) output, moved factors",
                  forward({k: jnp.asarray(v) for k, v in ad.items()}, x), y_peft)


def test_pissa_randomized_reconstructs_as_well_as_peft():
    model, layer, w0, bias = _peft_layer(lora_alpha=R, init_lora_weights="pissa_niter_4")
    frozen, tr0, _ = _our_layer(rp.pissa(R, niter=4), w0, bias)
    s = 1.0   # alpha = r on both sides

    w0_64 = w0.astype(np.float64)
    u, sv, vt = np.linalg.svd(w0_64, full_matrices=False)
    best = (u[:, :R] * sv[:R]) @ vt[:R]
    a_peft, b_peft = _peft_factors(layer)
    w_res_peft = layer.get_base_layer().weight.detach().numpy().T
    errs = {}
    for who, w_res, a, b in (("ours", frozen["base"], tr0["A"], tr0["B"]),
                             ("peft", w_res_peft, a_peft, b_peft)):
        a, b, w_res = (np.asarray(v, np.float64) for v in (a, b, w_res))
        recon = np.linalg.norm(w0_64 - w_res - s * a @ b) / np.linalg.norm(w0_64)
        errs[who] = np.linalg.norm(s * a @ b - best) / np.linalg.norm(best)
        print(f"[peft-parity] pissa_niter_4 {who}: ||W0 - W_res - sAB||/||W0|| = {recon:.2e}, "
              f"||sAB - best rank-{R}||/||best|| = {errs[who]:.3e}")
        assert recon < 1e-6, (who, recon)
    assert errs["ours"] <= errs["peft"] * 1.5 + 1e-6, errs
