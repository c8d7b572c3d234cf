"""The hot path: ``y = x @ (W0 + ΔW(θ))`` whose backward never forms the full ``dW = xᵀg``.

Plain autodiff through a materialised weight computes the full weight gradient
``xᵀg`` for every adapted kernel -- full fine-tuning's backward cost -- and only
then projects it onto the adapter. A transform whose ``ΔW`` has structure
declares it (``Reparam.structure``), and the train step routes the layer's dot
product through :func:`structured_matmul`, a ``jax.custom_vjp`` op:

    forward   materialised:  y = x @ (W0 + ΔW)                  (N·d·k + cost of forming ΔW)
              factored:      y = x @ W0 + matvec(ΔW, x)          (N·d·k + N·cost(matvec))
    backward  dx = g @ Wᵀ (or gW0ᵀ + matvecᵀ(g) when factored)
              dθ = the pullback of ``s ↦ matvec(s, x)`` at g, i.e. the gradient of the
                   structure's arrays straight from the layer's input x and output cotangent g:
                   low rank ΔW = L@R:         dL = xᵀ(gRᵀ), dR = (xL)ᵀg          (rank-r products; for
                                              ranks above ~d·k/(2(d+k)), e.g. VeRA, from one xᵀg GEMM)
                   Kronecker ΔW = Σ A_k⊗B_k:  dA_k = Σ_n X_n B_k G_nᵀ, dB_k = Σ_n X_nᵀ A_k G_n with x, g
                                              rows as matrices (small factors; else the vec trick / xᵀg)
                   sparse ΔW[i_k, j_k] = v_k: dv_k = Σ_n x[n, i_k] g[n, j_k]   (N·k: on CPU the
                   sampled product of reparam.sampled; elsewhere read off one xᵀg GEMM)
              scaled W = (W0 + inner)·diag(c) (DoRA): with z = x @ (W0 + inner),
                   dc = Σ_n g ∘ z, and the inner structure's gradient at g·c
              in a separable basis ΔW = s·Re(T_in C T_outᵀ) (FourierFT, WaveFT, WaRA): the inner
                   structure's gradient at the transformed rows t(x), s·t(g) (an FFT / one DWT level
                   per row); a sparse C in the DFT basis samples the real FFTs' half spectra (CPU),
                   elsewhere reads s·Re(T_inᵀ (xᵀg) T_out) at its support

The cheaper forward is chosen per call from the shapes and the tokens ``N``
(:func:`prefer_factored`). The train step routes every contraction of an adapted
weight in the loss to this op, however the model is written (:mod:`reparam.route`).

:func:`norm_barriers` puts a *cotangent barrier* after every linen ``nn.LayerNorm`` and
``nn.RMSNorm``: an identity whose backward divides by a runtime ``1.0``. XLA:CPU
otherwise re-computes the residual stream's LayerNorm-backward chain inside every
consumer's transposing fusion (PERF_NOTES: 558 ms per MiniLM step); a divide is
"expensive" to XLA, so it is computed once. Values and gradients are unchanged.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from reparam import sampled
from reparam.structure import InBasis, Kron, LowRank, Scaled, Sparse, Sum, costs, dense, matvec, prefer_factored

Array = jax.Array


# --- the op -------------------------------------------------------------------------------------
def _weight(base, s, dtype):
    return (base.astype(jnp.float32) + dense(s, base.shape)).astype(base.dtype).astype(dtype)


@jax.custom_vjp
def _materialised(x, base, s):
    return x @ _weight(base, s, x.dtype)


def _materialised_fwd(x, base, s):
    w = _weight(base, s, x.dtype)
    return x @ w, (x, w, s)


# From this many tokens per call, dense Kronecker blocks too large for the per-token products
# (:func:`kron_grad_batched`: SoKA) take their gradient from one dW = xᵀg GEMM (projected onto A
# and B) rather than the vec trick: fewer FLOPs, but slower and larger on XLA:CPU at 1024+ tokens
# (benchmarks/hot_path.py before the per-token path, 768² LoKr: 29 vs 37 ms autodiff at 1024, 230 vs 164 ms
# at 4096).
KRON_GEMM_TOKENS = 512


def lowrank_grad_by_gemm(rank: int, tokens: int, d_in: int, d_out: int, factors: int = 2) -> bool:
    """Whether ``dL, dR`` of ``ΔW = L @ R`` cost fewer multiply-adds from one ``dW = xᵀg`` GEMM
    (``N·d_in·d_out``, then ``dL = dW Rᵀ``, ``dR = Lᵀ dW``: ``2·d_in·d_out·r``) than from rank-r
    products (``xᵀ(gRᵀ)``, ``(xL)ᵀg``: ``2·N·r·(d_in + d_out)``): for ranks above about
    ``d_in·d_out / (2 (d_in + d_out))`` -- VeRA's r=256 on a 384² kernel, not LoRA's r=8.
    ``factors=1`` when one factor is frozen (``LowRank.frozen``): one product of each kind, so the rank-r
    products win up to twice the rank (VeRA's r=256 on 384x1536)."""
    return tokens * d_in * d_out + factors * d_in * d_out * rank < factors * tokens * rank * (d_in + d_out)


# Up to this density a sparse part's gradient is the CPU sampled product (``N·k`` multiply-adds on one
# thread, plus its blocked transposes of x and g) rather than read off the dense ``xᵀg`` (``N·d_in·d_out``
# on the whole pool). 384x1536 at 2048 tokens (benchmarks/grad_paths.py): 0.5% 4.7 vs 21 ms, 2% 7.7 vs
# 19 ms, 5% 14 vs 21 ms -- the gain narrowing, while the kernel's k dot products grow.
SAMPLED_MAX_DENSITY = 0.05


def _structure_grad(s, x, g, dw, sampled_ok: bool = False):
    """The cotangent of structure ``s`` from the layer's input ``x`` and output cotangent ``g``.

    Low rank and Kronecker: the pullback of ``matvec`` (rank-r products, the vec trick), or of
    ``dense`` at ``dW`` where that is cheaper (low rank: :func:`lowrank_grad_by_gemm`; Kronecker:
    :func:`kron_grad_by_gemm`), or for small Kronecker factors per-token products (:func:`kron_grad_batched`),
    or for low-rank Kronecker blocks rank-``K·r`` GEMMs (:func:`_kron_lowrank_grad`). Sparse: ``dv_k = Σ_n x[n, i_k] g[n, j_k]``, by the sampled product
    (:func:`reparam.sampled.sampled_dot`) where ``sampled_ok`` (the CPU branch of :func:`_grad`) and the
    support is at most ``SAMPLED_MAX_DENSITY`` of the weight, else ``dW[idx]`` from one dense
    ``dW = xᵀg`` (``dw()``, shared by all sparse parts).
    """
    if isinstance(s, Sum):
        return Sum(tuple(_structure_grad(p, x, g, dw, sampled_ok) for p in s.parts))
    if isinstance(s, InBasis):
        return s.replace(inner=_in_basis_grad(s, x, g, dw, sampled_ok))
    if isinstance(s, Sparse):
        if sampled_ok and _sampled_fits(s, x, g):
            return s.replace(idx=None, values=sampled.sampled_dot(x, g, s.idx).astype(s.values.dtype))
        return s.replace(idx=None, values=dw().reshape(-1)[s.idx].astype(s.values.dtype))
    tokens, d_in, d_out = x.shape[0], x.shape[1], g.shape[1]
    if isinstance(s, Kron):
        if kron_grad_batched(s, d_in, d_out):
            return _kron_grad(s, x, g)
        by_gemm = kron_grad_by_gemm(s, tokens, d_in, d_out)
        if s.v is not None and not by_gemm:
            return _kron_lowrank_grad(s, x, g)
    else:
        by_gemm = isinstance(s, LowRank) and lowrank_grad_by_gemm(s.l.shape[-1], tokens, d_in, d_out,
                                                                  factors=1 if s.frozen else 2)
    if by_gemm:
        out, pull = jax.vjp(lambda s_: dense(s_, (d_in, d_out)), s)
        return pull(dw().astype(out.dtype))[0]          # ΔW is f32 where x and g are bf16
    out, pull = jax.vjp(lambda s_: matvec(s_, x), s)
    return pull(g.astype(out.dtype))[0]


def kron_grad_batched(s: Kron, d_in: int, d_out: int) -> bool:
    """Whether :func:`_kron_grad` takes ``Σ_k a_k ⊗ b_k``'s gradient: dense blocks whose per-token products
    (``K·(a1·a2 + b1·b2)`` floats a token) stay within ``2·(d_in + d_out)`` -- LoKr's and KronA's one
    pair of near-√d factors, not SoKA's ``K = r`` terms, whose batched products outgrow the ``xᵀg`` GEMM."""
    if s.v is not None:
        return False
    k, a1, a2, b1, b2 = s.dims
    return k * (a1 * a2 + b1 * b2) <= 2 * (d_in + d_out)


def kron_grad_by_gemm(s: Kron, tokens: int, d_in: int, d_out: int) -> bool:
    """Whether ``Σ_k a_k ⊗ B_k``'s gradient (where not :func:`kron_grad_batched`) comes from one ``dW = xᵀg``
    rather than the pullback of :func:`matvec`: for dense blocks from ``KRON_GEMM_TOKENS`` tokens; for
    low-rank blocks (``Kron.v``: Compacter, ``K·r·(d_in + a1·a2 + d_out)`` a token) only where twice that
    exceeds the GEMM's ``d_in·d_out``."""
    if s.v is None:
        return tokens >= KRON_GEMM_TOKENS
    return 2 * costs(s, (d_in, d_out))[0] >= d_in * d_out


def _kron_grad(s: Kron, x, g):
    """``da_k = Σ_n X_n b_k G_nᵀ`` and ``db_k = Σ_n X_nᵀ a_k G_n`` for ``ΔW = Σ_k a_k ⊗ b_k``, with token
    ``n``'s row of ``x`` as ``X_n [a1, b1]`` and of ``g`` as ``G_n [a2, b2]`` (row-major reshapes, no copies).

    One GEMM over all tokens (``G·b_kᵀ``, ``X·a_k``), then a batch of per-token ``[a1, b1] x [b1, a2·K]``
    (``[b1·K, a2] x [a2, b2]``) products summed over ``n``: ``N·K·(d_in·a2 + a1·d_out)`` multiply-adds
    each for ``da`` and ``db``, and no transpose of x or g. XLA:CPU runs this 2.3-2.5x faster than one
    ``xᵀg`` GEMM projected onto the factors (MiniLM's 384x1536 at 2048 tokens: 7.4 vs 18.9 ms;
    ``benchmarks/grad_paths.py``)."""
    (k, a1, a2), (_, b1, b2) = s.a.shape, s.b.shape
    n, f32 = x.shape[0], jnp.float32
    xs, gs = x.reshape(n, a1, b1), g.reshape(n, a2, b2)
    a, b = s.a.astype(x.dtype), s.b.astype(g.dtype)
    dot = lambda u, v, dims: jax.lax.dot_general(u, v, dims, preferred_element_type=f32)
    gb = dot(gs, b, (((2,), (2,)), ((), ()))).reshape(n, a2 * k, b1)          # [n, j·k, p] = Σ_q G b_k
    xa = dot(xs, a, (((1,), (1,)), ((), ()))).reshape(n, b1 * k, a2)          # [n, p·k, j] = Σ_i X a_k
    da = dot(xs, gb.astype(x.dtype), (((2,), (2,)), ((0,), (0,)))).sum(0)     # [i, j·k]
    db = dot(xa.astype(x.dtype), gs, (((2,), (1,)), ((0,), (0,)))).sum(0)     # [p·k, q]
    return s.replace(a=da.reshape(a1, a2, k).transpose(2, 0, 1).astype(s.a.dtype),
                     b=db.reshape(b1, k, b2).transpose(1, 0, 2).astype(s.b.dtype))


def _kron_lowrank_grad(s: Kron, x, g):
    """The gradient of ``ΔW = Σ_k a_k ⊗ (b_k v_k)`` (low-rank blocks, ``Kron.v``) with token ``n``'s rows as
    ``X_n [a1, b1]``, ``G_n [a2, b2]``: ``T_n = X_n b`` and ``D_n = G_n vᵀ`` (two GEMMs over all tokens, rank
    ``K·r`` wide), then ``da_k = Σ_n T_nk D_nkᵀ``, ``dv_k = Σ_n (a_kᵀ T_nk)ᵀ G_n``, ``db_k = Σ_n X_nᵀ (a_k D_nk)``:
    ``2·N·K·r·(d_in + a1·a2 + d_out)`` multiply-adds, as the pullback of :func:`matvec` but as plain GEMMs
    (XLA:CPU runs the einsum's pullback 2x slower: Compacter n=4, r=8 on 384x1536 at 2048 tokens, 16.3 vs
    7.9 ms, against 20.9 ms for ``xᵀg``; ``benchmarks/grad_paths.py``)."""
    k, a1, a2, b1, b2 = s.dims
    n, r, f32 = x.shape[0], s.b.shape[2], jnp.float32
    dot = lambda u, v: jnp.matmul(u, v, preferred_element_type=f32)
    xs, gs = x.reshape(n * a1, b1), g.reshape(n * a2, b2)
    b = s.b.astype(x.dtype).transpose(1, 0, 2).reshape(b1, k * r)               # [p, k·r]
    v = s.v.astype(g.dtype).reshape(k * r, b2)                                  # [k·r, q]
    t = dot(xs, b).reshape(n, a1, k, r)                                         # X_n b_k
    d = dot(gs, v.T).reshape(n, a2, k, r)                                       # G_n v_kᵀ
    a = s.a.astype(f32)
    da = jnp.einsum("nikr,njkr->kij", t, d)
    ta = jnp.einsum("nikr,kij->njkr", t, a).reshape(n * a2, k * r)              # a_kᵀ X_n b_k
    ad = jnp.einsum("kij,njkr->nikr", a, d).reshape(n * a1, k * r)              # a_k G_n v_kᵀ
    dv = dot(ta.T.astype(g.dtype), gs).reshape(k, r, b2)
    db = dot(xs.T, ad.astype(x.dtype)).reshape(b1, k, r).transpose(1, 0, 2)
    return s.replace(a=da.astype(s.a.dtype), b=db.astype(s.b.dtype), v=dv.astype(s.v.dtype))


def _in_basis_grad(s: InBasis, x, g, dw, sampled_ok: bool = False):
    """The inner structure's cotangent of ``ΔW = s·Re(T_in C T_outᵀ)``: ``dC = s·Re(T_inᵀ xᵀg T_out)``.

    Low rank / Kronecker inner parts take it from the rows transformed by the basis, ``dC = s·Re(t(x)ᵀ t(g))``
    (``N·d·log d`` for the transforms, then their rank-r products): never ``xᵀg``. Sparse inner parts
    take the sampled product on CPU: of those rows in a real basis (WaveFT), of the half spectra in a
    Hermitian one (the DFT: FourierFT, :func:`_half_spectrum_grad`). Otherwise (GPU/TPU, or a dense
    support) they read ``dC`` at their support from the layer's one ``dW = xᵀg`` (``dw()``) mapped by the
    basis's 2-D adjoint, ``s·Re(T_inᵀ dW T_out)`` (:meth:`InBasis.adjoint`). A complex ``T`` (Fourier)
    with a low-rank inner part uses ``Re(aᵀb) = Re(a)ᵀRe(b) - Im(a)ᵀIm(b)``: ``2N`` real rows."""
    if sampled_ok and s.basis.half is not None and isinstance(s.inner, Sparse) and _sampled_fits(s.inner, x, g):
        return s.inner.replace(idx=None, values=_half_spectrum_grad(s, x, g).astype(s.inner.values.dtype))
    t = s.along[0]
    f32 = jnp.promote_types(x.dtype, jnp.float32)
    xt, gt = t(x.astype(f32)), t(g.astype(f32))
    if jnp.iscomplexobj(xt):
        xt, gt = jnp.concatenate([xt.real, xt.imag]), jnp.concatenate([gt.real, -gt.imag])
        sampled_ok = False      # 2N complex rows cost more than the dense xᵀg's real-FFT adjoint
    return _structure_grad(s.inner, xt, s.scale * gt, _lazy(lambda: s.scale * s.adjoint(dw())), sampled_ok)


def _half_spectrum_grad(s: InBasis, x, g):
    """``dC_k = s·Re(Σ_n t(x)[n, u_k] t(g)[n, v_k])`` at a sparse ``C``'s support, for a Hermitian basis
    (``s.basis.half``: the DFT) by one sampled product of the half spectra ``h(x) [N, d_in//2 + 1]``,
    ``h(g)`` -- complex, read by the kernel as interleaved real and imaginary columns.

    Column ``u > d//2`` of ``t(x)`` is ``conj`` of column ``d - u``, so with ``u' = min(u, d - u)``,
    ``t(x)[u] = c·conj^{[u ≤ d/2]}(h[u'])``; and ``Re(conj^a(p) conj^b(q))`` is ``Re p Re q - Im p Im q``
    when ``a == b``, ``+`` otherwise: ``2k`` samples, no transform of ``2N`` complex rows and no ``xᵀg``."""
    (d_in, d_out), k = (x.shape[1], g.shape[1]), s.inner.idx.shape[-1]
    (hx, cx), (hg, cg) = s.basis.half(x), s.basis.half(g)
    cols = 2 * hg.shape[1]                                      # g's interleaved columns
    u, v = s.inner.idx // d_out, s.inner.idx % d_out
    u_half, v_half = jnp.minimum(u, d_in - u), jnp.minimum(v, d_out - v)
    re_re = 2 * u_half * cols + 2 * v_half
    both = sampled.sampled_dot(hx, hg, jnp.concatenate([re_re, re_re + cols + 1]))     # + im·im
    sign = jnp.where((u > d_in // 2) == (v > d_out // 2), -1.0, 1.0)
    return (s.scale * cx * cg) * (both[:k] + sign * both[k:])


def _sampled_fits(s: Sparse, x, g) -> bool:
    """Whether a sparse part takes the sampled product: a support of at most ``SAMPLED_MAX_DENSITY``."""
    return s.idx.shape[-1] <= SAMPLED_MAX_DENSITY * x.shape[1] * g.shape[1]


def _lazy(f):
    """``f()``, computed on the first call only (the ``dW = xᵀg`` shared by a sum's sparse / Kronecker parts)."""
    cache = []
    return lambda: cache[0] if cache else cache.append(f()) or cache[0]


def _lazy_dw(x, g):
    """``() -> xᵀg``, computed on the first call only."""
    return _lazy(lambda: x.T @ g)


def _has_sparse(s) -> bool:
    return isinstance(s, Sparse) or (isinstance(s, Sum) and any(map(_has_sparse, s.parts))) or \
        (isinstance(s, InBasis) and _has_sparse(s.inner))


def _grad(s, x, g):
    """:func:`_structure_grad` with the layer's own lazy ``dW = xᵀg``; a structure with sparse parts
    is staged twice, the CPU branch taking them by the sampled product (:func:`reparam.sampled.choose`)."""
    def branch(sampled_ok):
        return lambda x, g: _structure_grad(s, x, g, _lazy_dw(x, g), sampled_ok)
    if not _has_sparse(s):
        return branch(False)(x, g)
    return sampled.choose((x, g), branch(True), branch(False))


def _materialised_bwd(res, g):
    x, w, s = res
    return g @ w.T, None, _grad(s, x, g)


_materialised.defvjp(_materialised_fwd, _materialised_bwd)


@jax.custom_vjp
def _materialised_scaled(x, base, s: Scaled):
    return (x @ _weight(base, s.inner, x.dtype)) * s.c.astype(x.dtype)


def _scaled_fwd(x, base, s: Scaled):
    v = _weight(base, s.inner, x.dtype)
    z = x @ v
    return z * s.c.astype(x.dtype), (x, v, z, s)


def _scaled_bwd(res, g):
    x, v, z, s = res
    gz = g * s.c.astype(g.dtype)                    # the cotangent of z = x @ (W0 + inner)
    dc = jnp.sum(g * z, axis=0).astype(s.c.dtype)
    return gz @ v.T, None, s.replace(inner=_grad(s.inner, x, gz), c=dc)


_materialised_scaled.defvjp(_scaled_fwd, _scaled_bwd)


def structured_matmul(x: Array, base: Array, s, *, factored: Optional[bool] = None) -> Array:
    """``x @ (base + ΔW)`` for ``x [N, d_in]``, ``base [d_in, d_out]`` (frozen) and a structure ``s``.

    ``factored=None`` picks the cheaper forward (:func:`prefer_factored`). Both
    paths give the same values and gradients as plain autodiff through the
    materialised weight (up to float rounding); neither forms ``xᵀg``.
    """
    if factored is None:
        factored = prefer_factored(s, base.shape, x.shape[0])
    if isinstance(s, Scaled):
        if factored:
            return structured_matmul(x, base, s.inner, factored=True) * s.c.astype(x.dtype)
        return _materialised_scaled(x, jax.lax.stop_gradient(base), s)
    if factored:
        # plain autodiff of the factored form is already rank-r / vec-trick / support-only
        return x @ jax.lax.stop_gradient(base).astype(x.dtype) + matvec(s, x)
    return _materialised(x, jax.lax.stop_gradient(base), s)


@jax.custom_vjp
def cotangent_barrier(y: Array, one: Array) -> Array:
    """Identity in the forward; the backward returns ``g / one`` (``one`` a runtime 1.0).

    Forces XLA to compute the cotangent once instead of re-fusing its producer
    chain into each consumer (see the module docstring)."""
    return y


def _barrier_fwd(y, one):
    return y, one


def _barrier_bwd(one, g):
    return (g / one.astype(g.dtype), None)


cotangent_barrier.defvjp(_barrier_fwd, _barrier_bwd)


def runtime_one(step: Array) -> Array:
    """A float32 1.0 that XLA cannot constant-fold (it depends on the runtime ``step``)."""
    return jnp.where(step >= 0, jnp.float32(1.0), jnp.float32(2.0))


# --- the barrier on linen norms ------------------------------------------------------------------
@contextlib.contextmanager
def norm_barriers(one: Optional[Array]):
    """Puts :func:`cotangent_barrier` after every linen ``nn.LayerNorm`` / ``nn.RMSNorm`` called in the block
    (nothing when ``one`` is None)."""
    if one is None:
        yield
        return

    def hook(next_fun, args, kwargs, ctx):
        out = next_fun(*args, **kwargs)
        if ctx.method_name == "__call__" and isinstance(ctx.module, (nn.LayerNorm, nn.RMSNorm)):
            out = cotangent_barrier(out, one)
        return out

    with nn.intercept_methods(hook):
        yield
