"""The hot path's gradient paths that avoid ``xᵀg``: the CPU sampled product (SDDMM) for sparse supports and
the per-token products for small Kronecker factors equal the dense results, and the compiled step uses them."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import reparam as rp
from reparam import matmul as mm
from reparam import sampled
from reparam import structure as S
from tests.test_matmul import assert_hot_gradients_match_autodiff


def test_the_kernel_is_available_in_ci():
    """numba is a dependency: without it the CPU path would silently fall back to the dense GEMM."""
    assert sampled.available()


@settings(max_examples=12, deadline=None)
@given(st.integers(1, 600), st.integers(1, 40), st.integers(1, 40), st.floats(0.0, 1.0),
       st.sampled_from([jnp.float32, jnp.bfloat16, jnp.complex64]), st.integers(0, 2 ** 16))
def test_sampled_dot_equals_the_dense_product_at_the_support(n, d_in, d_out, frac, dtype, seed):
    """For every token count (across the 8-row strips and 256-token blocks), shape, support size and
    input dtype: v[k] = (xᵀg).flat[idx[k]] in float32; complex rows as their interleaved re, im columns."""
    g_ = np.random.default_rng(seed)
    cplx = dtype == jnp.complex64
    rows = lambda d: g_.standard_normal((n, d)) + (1j * g_.standard_normal((n, d)) if cplx else 0)
    x, g = jnp.asarray(rows(d_in), dtype), jnp.asarray(rows(d_out), dtype)
    as_real = lambda v: np.asarray(v).view(np.float32) if cplx else np.asarray(v, np.float32)   # interleaves
    xr, gr = as_real(x).astype(np.float64), as_real(g).astype(np.float64)
    size = xr.shape[1] * gr.shape[1]
    idx = np.sort(g_.choice(size, 1 + int(frac * (size - 1)), replace=False)).astype(np.int32)
    got = jax.jit(sampled.sampled_dot)(x, g, jnp.asarray(idx))
    ref = (xr.T @ gr).reshape(-1)[idx]
    assert got.dtype == jnp.float32 and got.shape == idx.shape
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-4 * np.sqrt(n))


@settings(max_examples=12, deadline=None)
@given(st.integers(1, 300), st.integers(1, 40), st.integers(1, 40), st.floats(0.0, 1.0), st.integers(0, 2 ** 16))
def test_half_spectrum_gradient_equals_the_dft_product(n, d_in, d_out, frac, seed):
    """For odd and even sizes and supports anywhere in the spectrum (DC, Nyquist, both mirrored halves):
    FourierFT's coefficient gradient from the half spectra equals s·Re(ifft(x)ᵀ ifft(g)) at the support."""
    g_ = np.random.default_rng(seed)
    size = d_in * d_out
    idx = np.sort(g_.choice(size, 1 + int(frac * (size - 1)), replace=False)).astype(np.int32)
    s = S.InBasis(S.Sparse(jnp.asarray(idx), jnp.zeros(idx.shape), d_out), 3.0, rp.fourier_basis())
    x, g = g_.standard_normal((n, d_in)), g_.standard_normal((n, d_out))
    got = jax.jit(S.half_spectrum_grad)(s, jnp.asarray(x, jnp.float32), jnp.asarray(g, jnp.float32))
    ref = 3.0 * np.real(np.fft.ifft(x, axis=-1).T @ np.fft.ifft(g, axis=-1)).reshape(-1)[idx]
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-5 * np.sqrt(n))


def test_choose_falls_back_to_dense():
    """``use=False`` and a missing kernel both take the dense branch; the staged choice runs the CPU one."""
    x, g = jnp.ones((3, 2)), jnp.ones((3, 4))
    cpu, dense = (lambda x, g: x.sum() + 1), (lambda x, g: x.sum() + 2)
    assert float(sampled.choose((x, g), cpu, dense, use=False)) == 8.0
    assert float(jax.jit(lambda x, g: sampled.choose((x, g), cpu, dense))(x, g)) == 7.0


def _sparse(seed, d_in, d_out, density):
    g = np.random.default_rng(seed)
    idx = np.sort(g.choice(d_in * d_out, max(1, int(density * d_in * d_out)), replace=False)).astype(np.int32)
    return S.Sparse(jnp.asarray(idx), jnp.asarray(g.standard_normal(idx.shape), jnp.float32), d_out)


@pytest.mark.parametrize("kind", ["sparse", "sum", "haar", "fourier", "scaled"])
def test_low_density_gradients_match_autodiff(kind):
    """At a support of 2% (under SAMPLED_MAX_DENSITY) the hot path's gradients, now from the kernel,
    equal plain autodiff through the materialised weight."""
    d_in, d_out, n = 40, 48, 300
    sp = _sparse(0, d_in, d_out, 0.02)
    lr = S.LowRank(jax.random.normal(jax.random.key(5), (d_in, 2)), jax.random.normal(jax.random.key(6), (2, d_out)))
    s = {"sparse": sp, "sum": S.Sum((lr, sp)), "haar": S.InBasis(sp, 0.5, rp.wavelet_basis("haar")),
         "fourier": S.InBasis(sp, 30.0, rp.fourier_basis()),
         "scaled": S.Scaled(S.Sum((lr, sp)), 1.0 + 0.1 * jnp.arange(d_out, dtype=jnp.float32))}[kind]
    base = jax.random.normal(jax.random.key(1), (d_in, d_out))
    x = jax.random.normal(jax.random.key(2), (n, d_in))
    g = jax.random.normal(jax.random.key(3), (n, d_out))
    assert_hot_gradients_match_autodiff(s, base, x, g, tol=2e-4)


@settings(max_examples=10, deadline=None)
@given(st.integers(1, 4), st.integers(1, 5), st.integers(1, 5), st.integers(1, 5), st.integers(1, 5),
       st.integers(1, 40), st.integers(0, 2 ** 16))
def test_batched_kron_gradient_equals_the_vec_trick_pullback(k, a1, a2, b1, b2, n, seed):
    """For every number of terms, factor shape and token count: da, db from the per-token products equal
    the pullback of the vec-trick matvec at g."""
    r = np.random.default_rng(seed)
    s = S.Kron(jnp.asarray(r.standard_normal((k, a1, a2)), jnp.float32),
               jnp.asarray(r.standard_normal((k, b1, b2)), jnp.float32))
    x = jnp.asarray(r.standard_normal((n, a1 * b1)), jnp.float32)
    g = jnp.asarray(r.standard_normal((n, a2 * b2)), jnp.float32)
    ref = jax.vjp(lambda s_: S.matvec(s_, x), s)[1](g)[0]
    got = jax.jit(S.kron_grad)(s, x, g)
    for a, b in ((ref.a, got.a), (ref.b, got.b)):
        assert a.shape == b.shape
        np.testing.assert_allclose(b, a, atol=1e-4, rtol=1e-4)


@settings(max_examples=6, deadline=None)
@given(st.integers(1, 4), st.integers(1, 5), st.integers(1, 5), st.integers(1, 6), st.integers(1, 6),
       st.integers(1, 4), st.integers(1, 40), st.integers(0, 2 ** 16))
def test_lowrank_kron_gradient_equals_the_matvec_pullback(k, a1, a2, b1, b2, r, n, seed):
    """Compacter's low-rank blocks (Kron.v): da, db, dv from the rank-K·r GEMMs equal the pullback of
    matvec, and both equal the pullback of the dense blocks' matvec."""
    rng = np.random.default_rng(seed)
    arr = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    s = S.Kron(arr(k, a1, a2), arr(k, b1, r), arr(k, r, b2))
    x, g = arr(n, a1 * b1), arr(n, a2 * b2)
    ref = jax.vjp(lambda s_: S.matvec(s_, x), s)[1](g)[0]
    got = jax.jit(S.kron_lowrank_grad)(s, x, g)
    via_blocks = jax.vjp(lambda a, b, v: S.matvec(S.Kron(a, jnp.einsum("kpr,krq->kpq", b, v)), x), s.a, s.b, s.v)[1](g)
    for want, have, dense_ in ((ref.a, got.a, via_blocks[0]), (ref.b, got.b, via_blocks[1]), (ref.v, got.v, via_blocks[2])):
        assert want.shape == have.shape
        np.testing.assert_allclose(have, want, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(have, dense_, atol=1e-4, rtol=1e-4)


def test_kron_rule_takes_lokr_factors_not_compacter_terms():
    """LoKr's near-√d pair of a 384x1536 kernel goes by the per-token products; Compacter's four
    [96, 384] blocks, dense, by xᵀg, and low rank (as rp.compacter builds them) by rank-K·r GEMMs; and
    through the hot path a batched Kron's and a low-rank Kron's gradients equal autodiff."""
    kron = lambda k, a, b: S.Kron(jnp.ones((k, *a)), jnp.ones((k, *b)))
    assert S.kron_grad_batched(kron(1, (16, 32), (24, 48)), 384, 1536)
    assert not S.kron_grad_batched(kron(4, (4, 4), (96, 384)), 384, 1536)
    assert S.kron_grad_by_gemm(kron(4, (4, 4), (96, 384)), 2048, 384, 1536)
    compacter = S.Kron(jnp.ones((4, 4, 4)), jnp.ones((4, 96, 8)), jnp.ones((4, 8, 384)))
    assert not S.kron_grad_batched(compacter, 384, 1536) and not S.kron_grad_by_gemm(compacter, 2048, 384, 1536)
    s = S.Kron(*(jax.random.normal(jax.random.key(i), shape) for i, shape in enumerate([(2, 4, 3), (2, 5, 2), (2, 2, 8)])))
    base = jax.random.normal(jax.random.key(5), (20, 24))
    x, g = jax.random.normal(jax.random.key(6), (300, 20)), jax.random.normal(jax.random.key(7), (300, 24))
    assert not S.kron_grad_by_gemm(s, 300, 20, 24)
    assert_hot_gradients_match_autodiff(s, base, x, g, tol=1e-3)
    s = S.Kron(jax.random.normal(jax.random.key(0), (1, 4, 6)), jax.random.normal(jax.random.key(1), (1, 5, 4)))
    assert S.kron_grad_batched(s, 20, 24)
    base = jax.random.normal(jax.random.key(2), (20, 24))
    x, g = jax.random.normal(jax.random.key(3), (700, 20)), jax.random.normal(jax.random.key(4), (700, 24))
    assert_hot_gradients_match_autodiff(s, base, x, g, tol=1e-3)
