"""The bases of ``reparam.wavelet`` (wavelet, DCT, Fourier) and the methods built on ``in_basis``.

References: PyWavelets (``wavedec2`` with ``mode="periodization"``, laid out by
``coeffs_to_array``) and hand-computed Haar examples.
"""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import pywt
from hypothesis import given, settings, strategies as st

import reparam as rp
from reparam import sparse
from reparam.core import ReparamError, in_basis
from reparam.wavelet import (dct_basis, fourier_basis, fourierft, wara, wavelet_basis, wavelet_filters,
                             waveft)
from tests.methods import rel_err

ORTHO = [("haar", 1), ("haar", 3), ("db2", 2), ("db3", 1), ("db4", 1), ("dct", 0)]


def _basis(name, levels):
    return dct_basis() if name == "dct" else wavelet_basis(name, levels)


def _plan(t, shape):
    return rp.plan([("w", t)], {"w": jax.ShapeDtypeStruct(shape, jnp.float32)})


@st.composite
def ortho_cases(draw):
    name, levels = draw(st.sampled_from(ORTHO))
    unit = 2 ** max(levels, 1)
    d_in, d_out = unit * draw(st.integers(1, 12 // unit + 1)), unit * draw(st.integers(1, 12 // unit + 1))
    return name, levels, d_in, d_out, draw(st.integers(0, 2 ** 16))


@settings(max_examples=8, deadline=None)
@given(case=ortho_cases())
def test_orthogonal_bases_round_trip_and_keep_norms(case):
    name, levels, d_in, d_out, seed = case
    b = _basis(name, levels)
    g = np.random.default_rng(seed)                      # numpy draws: jax.random compiles once per shape
    w = jnp.asarray(g.standard_normal((d_in, d_out)).astype(np.float32))
    c = b.forward(w)
    assert c.shape == w.shape and c.dtype == jnp.float32
    assert rel_err(b.inverse(c), w) <= 1e-6
    assert abs(float(jnp.linalg.norm(c)) - float(jnp.linalg.norm(w))) <= 1e-5 * float(jnp.linalg.norm(w))
    # in_basis through an orthogonal basis: ‖ΔW‖ = s·‖values‖ (Parseval), and a fresh adapter is W0 exactly
    k = max(1, d_in * d_out // 3)
    t = in_basis(b, sparse.random(k=k), scale=0.5)
    frozen, trainable = t.init(jax.random.key(1), w)
    apply = jax.jit(t.apply)
    assert frozen["base"] is w and np.array_equal(apply(frozen, trainable), w)
    v = jnp.asarray(g.standard_normal(k).astype(np.float32))
    dw = apply(frozen, {"values": v}) - w
    np.testing.assert_allclose(float(jnp.linalg.norm(dw)), 0.5 * float(jnp.linalg.norm(v)), rtol=1e-5)


@pytest.mark.parametrize("wavelet", ["haar", "db1", "db2", "db3", "db4"])
def test_filters_match_pywavelets(wavelet):
    lo, hi = wavelet_filters(wavelet)
    np.testing.assert_allclose(lo, pywt.Wavelet(wavelet).dec_lo, atol=1e-15)
    np.testing.assert_allclose(hi, pywt.Wavelet(wavelet).dec_hi, atol=1e-15)


@pytest.mark.parametrize("wavelet,levels", [("haar", 1), ("haar", 3), ("db2", 1), ("db2", 2), ("db3", 2),
                                            ("db4", 3)])
def test_multilevel_equals_pywavelets_periodization(wavelet, levels):
    x = np.random.default_rng(levels).standard_normal((16, 24)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)    # "level too high": boundary effects, fine for us
        ref, _ = pywt.coeffs_to_array(pywt.wavedec2(x, wavelet, mode="periodization", level=levels))
    c = wavelet_basis(wavelet, levels).forward(jnp.asarray(x))
    assert rel_err(c, ref) <= 1e-6
    assert rel_err(wavelet_basis(wavelet, levels).inverse(jnp.asarray(ref, jnp.float32)), x) <= 1e-6


def test_haar_by_hand():
    a, b, c, d = 1.0, 2.0, 4.0, 8.0
    got = wavelet_basis("haar").forward(jnp.array([[a, b], [c, d]]))
    want = np.array([[a + b + c + d, a - b + c - d], [a + b - c - d, a - b - c + d]]) / 2
    np.testing.assert_allclose(got, want, atol=1e-6)
    # two levels on a constant 4x4: all energy in the coarsest approximation, ‖W‖_F = 4
    got = wavelet_basis("haar", levels=2).forward(jnp.ones((4, 4)))
    np.testing.assert_allclose(got, np.zeros((4, 4)) + 4 * (np.arange(16) == 0).reshape(4, 4), atol=1e-6)
    # one level of a 4x4 with one coefficient set: a 2x2 tile of ±1/2 in the first block row/col
    dw = wavelet_basis("haar").inverse(jnp.zeros((4, 4)).at[0, 2].set(1.0))      # LH band (row-low, col-high)
    np.testing.assert_allclose(dw[:2, :2], [[0.5, -0.5], [0.5, -0.5]], atol=1e-6)
    assert float(jnp.abs(dw[2:]).sum() + jnp.abs(dw[:, 2:]).sum()) == 0.0


def test_stacked_weights_and_bf16():
    x = jax.random.normal(jax.random.key(0), (3, 8, 12))
    b = wavelet_basis("db2", 2)
    np.testing.assert_allclose(b.forward(x), jnp.stack([b.forward(xi) for xi in x]), atol=1e-6)
    np.testing.assert_allclose(b.inverse(b.forward(x)), x, atol=1e-5)
    w = x[0].astype(jnp.bfloat16)
    t = waveft(k=5)
    frozen, trainable = t.init(jax.random.key(1), w)
    out = t.apply(frozen, {"values": jnp.ones(5)})
    assert out.dtype == jnp.bfloat16 and not np.array_equal(out, w)


def test_fourier_basis_is_linear_not_orthogonal_and_transposes():
    w = jax.random.normal(jax.random.key(0), (6, 10))
    b = fourier_basis()
    c = b.forward(w)
    assert jnp.iscomplexobj(c) and rel_err(b.inverse(c), w) <= 1e-6
    np.testing.assert_allclose(float(jnp.linalg.norm(c)), np.sqrt(60) * float(jnp.linalg.norm(w)), rtol=1e-5)
    r = jax.random.normal(jax.random.key(1), (6, 10))     # a real coefficient matrix, as FourierFT trains
    np.testing.assert_allclose(b.inverse(r.T), b.inverse(r).T, atol=1e-6)
    np.testing.assert_allclose(b.inverse(jnp.zeros((6, 10)).at[0, 0].set(60.0)), jnp.ones((6, 10)), atol=1e-5)


@settings(max_examples=12, deadline=None)
@given(m=st.integers(1, 9), n=st.integers(1, 9), lead=st.integers(0, 2))
def test_real_fft_paths_equal_the_complex_transform(m, n, lead):
    """For real C and G, the real-FFT inverse is ``Re(ifft2(C))`` and the basis's ``adjoint`` is its adjoint,
    ``⟨inverse(C), G⟩ = ⟨C, adjoint(G)⟩``, for every shape (odd and even sides, stacked)."""
    b = fourier_basis()
    shape = (2,) * lead + (m, n)
    c, g = (jax.random.normal(jax.random.key(i), shape) for i in (0, 1))
    np.testing.assert_allclose(b.inverse(c), jnp.real(jnp.fft.ifft2(c)), atol=1e-6)
    np.testing.assert_allclose(b.adjoint(g), jnp.real(jnp.fft.ifft2(g)), atol=1e-6)
    np.testing.assert_allclose(jnp.sum(b.inverse(c) * g), jnp.sum(c * b.adjoint(g)), atol=1e-5)
    assert b.inverse(c).shape == b.adjoint(g).shape == shape


def test_grad_of_coefficients_is_the_forward_transform():
    """The adjoint is right: ∂⟨G, s·IDWT2(scatter v)⟩/∂v = s·DWT2(G) at the support (orthogonal basis)."""
    w = jax.random.normal(jax.random.key(0), (8, 16))
    g = jax.random.normal(jax.random.key(1), (8, 16))
    t = waveft(k=20, wavelet="db2", levels=2, scale=3.0)
    frozen, trainable = t.init(jax.random.key(2), w)
    grad = jax.jit(jax.grad(lambda tr: jnp.sum(g * t.apply(frozen, tr))))(trainable)["values"]
    want = 3.0 * wavelet_basis("db2", 2).forward(g).reshape(-1)[frozen["inner"]["idx"]]
    np.testing.assert_allclose(grad, want, atol=1e-5)


def test_shape_errors_name_the_fix():
    with pytest.raises(ReparamError, match=r"2\*\*levels = 4.*use levels <= 1"):
        _plan(waveft(k=2, levels=2), (6, 8))
    with pytest.raises(ReparamError, match="both dimensions must be even"):
        _plan(wara(2), (7, 8))
    with pytest.raises(ReparamError, match="64 entries of a 8x8 weight"):
        _plan(waveft(k=100), (8, 8))
    with pytest.raises(ReparamError, match="12 entries"):
        _plan(fourierft(13), (3, 4))
    with pytest.raises(ReparamError, match="unknown wavelet 'sym9'"):
        wavelet_basis("sym9")
    with pytest.raises(ReparamError, match="levels must be a positive int"):
        waveft(k=1, levels=0)


def test_trainable_counts_and_names():
    assert _plan(waveft(k=7), (8, 16)).trainable_counts() == [7]
    assert _plan(waveft(density=0.25, wavelet="db2", levels=3), (8, 16)).trainable_counts() == [32]
    assert _plan(fourierft(5), (7, 9)).trainable_counts() == [5]
    assert _plan(wara(3, wavelet="db3"), (8, 16)).trainable_counts() == [3 * 24]
    assert waveft(k=7).name == "waveft(k=7, wavelet=haar)"
    assert wara(4, alpha=8, levels=2).name == "wara(r=4, alpha=8, wavelet=haar, levels=2)"
    assert fourierft(1000).name == "fourierft(n=1000, s=150)"


@pytest.mark.parametrize("basis", [dct_basis(), wavelet_basis("haar", 2)], ids=["dct", "haar2"])
@pytest.mark.parametrize("stacked", [False, True], ids=["matrix", "stacked"])
def test_in_basis_keeps_the_inner_penalty(basis, stacked):
    """in_basis(basis, sorsa(r)) trains with SORSA's orthonormality regulariser (it used to drop it): the plan's
    penalty is the inner transform's on the same trainables, and a train step adds it to the loss."""
    shape = (2, 16, 8) if stacked else (16, 8)
    params = {"w": jax.random.normal(jax.random.key(0), shape)}
    inner = rp.sorsa(4, gamma=0.1)
    plan = rp.plan([("w", in_basis(basis, inner))], params, stacked="w" if stacked else None)
    assert plan.leaves[0].transform.penalty is not None
    frozen, trainable = plan.init(jax.random.key(1), params)
    trainable = jax.tree_util.tree_map(lambda x: x + 0.1, trainable)       # U, V no longer orthonormal
    t = trainable["w"]
    one = lambda u, vt: inner.penalty({}, {"U": u, "S": None, "Vt": vt})
    want = sum(one(t["U"][i], t["Vt"][i]) for i in range(2)) if stacked else one(t["U"], t["Vt"])
    got = plan.penalty(frozen, trainable)
    assert float(got) > 1e-3
    np.testing.assert_allclose(got, want, rtol=1e-5)
    step = rp.train.make_train_step(plan, lambda p, b, rng: jnp.sum(p["w"]) * 0.0, optax.sgd(1e-2), matmul="autodiff")
    _, metrics = step(rp.train.init_state(trainable, optax.sgd(1e-2), jax.random.key(2)), frozen, None)
    np.testing.assert_allclose(metrics["penalty"], want, rtol=1e-5)
