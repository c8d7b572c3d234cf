"""ΔW in factored form: the structures a transform may declare (``Reparam.structure``).

A structure is a small pytree that says how ``ΔW [d_in, d_out]`` is built, so that ``x @ ΔW`` and the
gradient of its arrays can be computed without forming ``ΔW`` or the full weight gradient ``xᵀg``
(:mod:`reparam.matmul`):

    LowRank(l, r)        ΔW = l @ r                     LoRA, PiSSA, VeRA, NOLA, RandLoRA, S²FT (one-hot), ...
    Kron(a, b[, v])      ΔW = Σ_k a[k] ⊗ B_k            KronA, LoKr, Compacter (B_k = b_k v_k), SoKA
    Sparse(idx, values)  ΔW.flat[idx] = values          SLTrain, SaRA, SPT, LT-SFT
    Sum(parts)           ΔW = Σ_p parts[p]              rp.add
    InBasis(inner, s)    ΔW = s·Re(T_in·inner·T_outᵀ)    rp.in_basis: FourierFT, WaveFT, WaRA (separable bases)
    Scaled(inner, c)     W = (W0 + inner)·diag(c)       DoRA (c = m / ‖W0 + s·AB‖_col)

The protocol. An additive structure has

    dense(shape) -> ΔW            matvec(x) -> x @ ΔW (x [N, d_in])       costs(shape) -> (per token, to form)
    pullback(x, g, dw, sampled_ok) -> its cotangent, from the layer input x [N, d_in] and output cotangent
        g [N, d_out]: what autodiff of ``x @ (W0 + ΔW)`` gives the structure's arrays, computed without
        forming ``xᵀg`` where the structure allows (``dw()`` forms it, once per layer, for the parts that
        need it; ``sampled_ok``: the CPU branch, where sparse parts may take the sampled product)
    has_sparse: whether some part is sparse (the step stages a CPU and a GEMM branch for those)

A right-multiplicative structure ``W = (W0 + inner)·R`` (``right = True``; DoRA's ``R = diag(c)``; the slot
for OFT's block-diagonal rotation and HRA's reflections) has ``inner`` (additive) and

    times(z) -> z·R               times_t(g) -> g·Rᵀ      r_pullback(z, g, d_inner) -> its cotangent, with
                                                          z = x @ (W0 + inner) and the inner one given

:mod:`reparam.matmul` runs one custom VJP over both kinds. A new structure is one class here with these
methods; nothing dispatches on its type. The cost thresholds below decide between gradient paths by
multiply-adds; what each path costs on this machine is in ``benchmarks/results/grad_paths.md``.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from flax import struct

from reparam import sampled

Array = jax.Array
DW = Callable[[], Array]       # () -> xᵀg, formed on the first call only


def _lazy(f):
    """``f()``, computed on the first call only (the ``dW = xᵀg`` shared by a sum's parts)."""
    cache = []
    return lambda: cache[0] if cache else cache.append(f()) or cache[0]


def _vjp_at(f, s, ct):
    """The pullback of ``f`` at ``s``, applied to ``ct`` cast to ``f``'s output dtype (ΔW is f32 where x, g are bf16)."""
    out, pull = jax.vjp(f, s)
    return pull(ct.astype(out.dtype))[0]


# --- low rank ---------------------------------------------------------------------------------------
def lowrank_grad_by_gemm(rank: int, tokens: int, d_in: int, d_out: int, factors: int = 2) -> bool:
    """Whether ``dL, dR`` of ``ΔW = L @ R`` cost fewer multiply-adds from one ``dW = xᵀg`` GEMM
    (``N·d_in·d_out``, then ``dL = dW Rᵀ``, ``dR = Lᵀ dW``: ``2·d_in·d_out·r``) than from rank-r
    products (``xᵀ(gRᵀ)``, ``(xL)ᵀg``: ``2·N·r·(d_in + d_out)``): for ranks above about
    ``d_in·d_out / (2 (d_in + d_out))`` -- VeRA's r=256 on a 384² kernel, not LoRA's r=8.
    ``factors=1`` when one factor is frozen (``LowRank.frozen``): one product of each kind, so the rank-r
    products win up to twice the rank (VeRA's r=256 on 384x1536)."""
    return tokens * d_in * d_out + factors * d_in * d_out * rank < factors * tokens * rank * (d_in + d_out)


@struct.dataclass
class LowRank:
    """``ΔW = l @ r``, ``l [d_in, r]``, ``r [r, d_out]`` (scales folded into ``l``).

    ``frozen``: ``"l"`` or ``"r"`` when no trainable parameter feeds that factor (VeRA's and RandLoRA's
    random bases, SVFit's ``Vᵀ``, S²FT's one-hot rows). The gradient then costs only the other factor's
    (XLA drops the frozen one's unused cotangent), which moves the choice between rank-r products and one
    ``xᵀg`` GEMM (:func:`lowrank_grad_by_gemm`). A wrong hint costs speed, never correctness."""
    l: Array
    r: Array
    frozen: str = struct.field(pytree_node=False, default="")
    has_sparse = False

    def dense(self, shape):
        return self.l @ self.r

    def matvec(self, x):
        return (x @ self.l.astype(x.dtype)) @ self.r.astype(x.dtype)

    def costs(self, shape):
        d_in, d_out = shape
        r = self.l.shape[-1]
        return r * (d_in + d_out), d_in * d_out * r

    def dense_t(self, shape):
        return self.r.T @ self.l.T

    def pullback(self, x, g, dw: DW, sampled_ok: bool = False):
        (tokens, d_in), d_out = x.shape, g.shape[1]
        if lowrank_grad_by_gemm(self.l.shape[-1], tokens, d_in, d_out, factors=1 if self.frozen else 2):
            return _vjp_at(lambda s: s.dense((d_in, d_out)), self, dw())
        g = g.astype(x.dtype)
        # dl = xᵀ(g rᵀ) is formed as (g rᵀ)ᵀx [r, d_in] and transposed behind a barrier: a token
        # contraction into a [d_in, r] result, which XLA would make of the transpose, runs slower
        # on XLA:CPU than the same product laid out [r, d_in] (`python -m benchmarks.lowrank_layout`)
        # (a frozen factor's cotangent is unused, and XLA drops it)
        dl = jax.lax.optimization_barrier(jnp.einsum("nr,nd->rd", g @ self.r.astype(x.dtype).T, x)).T
        dr = jnp.einsum("nr,nk->rk", x @ self.l.astype(x.dtype), g)
        return LowRank(dl.astype(self.l.dtype), dr.astype(self.r.dtype), self.frozen)

    def grad_probe(self, d):
        return d.r if self.frozen == "l" else d.l


# --- Kronecker ----------------------------------------------------------------------------------------
# From this many tokens per call, dense Kronecker blocks too large for the per-token products (SoKA) take
# their gradient from one dW = xᵀg GEMM (projected onto A and B) rather than the vec trick: fewer FLOPs,
# and on XLA:CPU the vec trick's batched products grow slower than the GEMM from about here.
KRON_GEMM_TOKENS = 512


@struct.dataclass
class Kron:
    """``ΔW = Σ_k a[k] ⊗ B_k``, ``a [K, a1, a2]``, ``d_in = a1·b1``, ``d_out = a2·b2``, with ``B_k = b[k]``
    (``b [K, b1, b2]``) or, given ``v``, the low-rank block ``B_k = b[k] @ v[k]`` (``b [K, b1, r]``,
    ``v [K, r, b2]``: Compacter's), whose ``x @ ΔW`` and gradients take ``K·r·(d_in + a1·a2 + d_out)``
    multiply-adds a token, never ``B_k``'s ``b1·b2``."""
    a: Array
    b: Array
    v: Optional[Array] = None
    has_sparse = False

    @property
    def dims(self) -> tuple[int, int, int, int, int]:
        """``(K, a1, a2, b1, b2)``."""
        (k, a1, a2), b1 = self.a.shape, self.b.shape[1]
        return k, a1, a2, b1, (self.b if self.v is None else self.v).shape[2]

    @property
    def blocks(self) -> Array:
        """``B [K, b1, b2]``."""
        return self.b if self.v is None else jnp.einsum("kpr,krq->kpq", self.b, self.v)

    def dense(self, shape):
        _, a1, a2, b1, b2 = self.dims
        return jnp.einsum("kij,kpq->ipjq", self.a, self.blocks).reshape(a1 * b1, a2 * b2)

    def matvec(self, x):
        _, a1, a2, b1, b2 = self.dims
        xs, cast = x.reshape(x.shape[0], a1, b1), (lambda v: v.astype(x.dtype))
        if self.v is not None:      # x's blocks through b first: [n, a1, b1] -> [n, k, a1, r], never B_k
            return jnp.einsum("nip,kpr,kij,krq->njq", xs, cast(self.b), cast(self.a), cast(self.v),
                              optimize=True).reshape(x.shape[0], a2 * b2)
        return jnp.einsum("nip,kij,kpq->njq", xs, cast(self.a), cast(self.b), optimize=True).reshape(
            x.shape[0], a2 * b2)

    def costs(self, shape):
        d_in, d_out = shape
        k, a1, a2, b1, b2 = self.dims
        if self.v is not None:
            r = self.b.shape[2]
            return k * r * (d_in + a1 * a2 + d_out), k * (d_in * d_out + b1 * r * b2)
        return k * min(a1 * b1 * b2 + a1 * a2 * b2, a1 * b1 * a2 + a2 * b1 * b2), k * d_in * d_out

    def pullback(self, x, g, dw: DW, sampled_ok: bool = False):
        """Per-token products for small dense factors (:func:`kron_grad_batched`), rank-``K·r`` GEMMs for
        low-rank blocks (:func:`kron_lowrank_grad`), else the vec trick (the pullback of :meth:`matvec`) or
        one ``xᵀg`` projected onto the factors (:func:`kron_grad_by_gemm`)."""
        tokens, d_in, d_out = x.shape[0], x.shape[1], g.shape[1]
        if kron_grad_batched(self, d_in, d_out):
            return kron_grad(self, x, g)
        by_gemm = kron_grad_by_gemm(self, tokens, d_in, d_out)
        if self.v is not None and not by_gemm:
            return kron_lowrank_grad(self, x, g)
        if by_gemm:
            return _vjp_at(lambda s: s.dense((d_in, d_out)), self, dw())
        return _vjp_at(lambda s: s.matvec(x), self, g)


def kron_grad_batched(s: Kron, d_in: int, d_out: int) -> bool:
    """Whether :func:`kron_grad` takes ``Σ_k a_k ⊗ b_k``'s gradient: dense blocks whose per-token products
    (``K·(a1·a2 + b1·b2)`` floats a token) stay within ``2·(d_in + d_out)`` -- LoKr's and KronA's one
    pair of near-√d factors, not SoKA's ``K = r`` terms, whose batched products outgrow the ``xᵀg`` GEMM."""
    if s.v is not None:
        return False
    k, a1, a2, b1, b2 = s.dims
    return k * (a1 * a2 + b1 * b2) <= 2 * (d_in + d_out)


def kron_grad_by_gemm(s: Kron, tokens: int, d_in: int, d_out: int) -> bool:
    """Whether ``Σ_k a_k ⊗ B_k``'s gradient (where not :func:`kron_grad_batched`) comes from one ``dW = xᵀg``
    rather than the pullback of :meth:`Kron.matvec`: for dense blocks from ``KRON_GEMM_TOKENS`` tokens; for
    low-rank blocks (``Kron.v``: Compacter, ``K·r·(d_in + a1·a2 + d_out)`` a token) only where twice that
    exceeds the GEMM's ``d_in·d_out``."""
    if s.v is None:
        return tokens >= KRON_GEMM_TOKENS
    return 2 * s.costs((d_in, d_out))[0] >= d_in * d_out


def kron_grad(s: Kron, x, g):
    """``da_k = Σ_n X_n b_k G_nᵀ`` and ``db_k = Σ_n X_nᵀ a_k G_n`` for ``ΔW = Σ_k a_k ⊗ b_k``, with token
    ``n``'s row of ``x`` as ``X_n [a1, b1]`` and of ``g`` as ``G_n [a2, b2]`` (row-major reshapes, no copies).

    One GEMM over all tokens (``G·b_kᵀ``, ``X·a_k``), then a batch of per-token ``[a1, b1] x [b1, a2·K]``
    (``[b1·K, a2] x [a2, b2]``) products summed over ``n``: ``N·K·(d_in·a2 + a1·d_out)`` multiply-adds
    each for ``da`` and ``db``, and no transpose of x or g."""
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


def kron_lowrank_grad(s: Kron, x, g):
    """The gradient of ``ΔW = Σ_k a_k ⊗ (b_k v_k)`` (low-rank blocks, ``Kron.v``) with token ``n``'s rows as
    ``X_n [a1, b1]``, ``G_n [a2, b2]``: ``T_n = X_n b`` and ``D_n = G_n vᵀ`` (two GEMMs over all tokens, rank
    ``K·r`` wide), then ``da_k = Σ_n T_nk D_nkᵀ``, ``dv_k = Σ_n (a_kᵀ T_nk)ᵀ G_n``, ``db_k = Σ_n X_nᵀ (a_k D_nk)``:
    ``2·N·K·r·(d_in + a1·a2 + d_out)`` multiply-adds, as the pullback of :meth:`Kron.matvec` but as plain
    GEMMs (which XLA:CPU runs faster than the einsum's pullback)."""
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


# --- sparse -------------------------------------------------------------------------------------------
# Up to this density a sparse part's gradient is the CPU sampled product (``N·k`` multiply-adds on one
# thread, plus its blocked transposes of x and g) rather than read off the dense ``xᵀg`` (``N·d_in·d_out``
# on the whole pool); above it the gain narrows while the kernel's k dot products grow.
SAMPLED_MAX_DENSITY = 0.05


@struct.dataclass
class Sparse:
    """``ΔW`` zero except ``ΔW.flat[idx[k]] = values[k]`` (``idx`` sorted, unique) in a ``[d_in, d_out]`` weight."""
    idx: Array
    values: Array
    d_out: int = struct.field(pytree_node=False)
    has_sparse = True

    def dense(self, shape):
        flat = jnp.zeros(shape[0] * shape[1], self.values.dtype)
        return flat.at[self.idx].set(self.values, indices_are_sorted=True, unique_indices=True).reshape(shape)

    def matvec(self, x):
        rows, cols = self.idx // self.d_out, self.idx % self.d_out
        contrib = x[:, rows] * self.values.astype(x.dtype)
        return jax.ops.segment_sum(contrib.T, cols, num_segments=self.d_out, indices_are_sorted=False).T

    def costs(self, shape):
        return 2 * self.values.shape[-1], shape[0] * shape[1]

    def fits_sampled(self, d_in: int, d_out: int) -> bool:
        """Whether the sampled product takes this support: at most ``SAMPLED_MAX_DENSITY`` of the weight."""
        return self.idx.shape[-1] <= SAMPLED_MAX_DENSITY * d_in * d_out

    def pullback(self, x, g, dw: DW, sampled_ok: bool = False):
        """``dv_k = Σ_n x[n, i_k] g[n, j_k]``: by the sampled product (:func:`reparam.sampled.sampled_dot`) on
        the CPU branch for a small support, else ``dW[idx]`` from the layer's one dense ``dW = xᵀg``."""
        if sampled_ok and self.fits_sampled(x.shape[1], g.shape[1]):
            return self.replace(idx=None, values=sampled.sampled_dot(x, g, self.idx).astype(self.values.dtype))
        return self.replace(idx=None, values=dw().reshape(-1)[self.idx].astype(self.values.dtype))


# --- sums and bases -----------------------------------------------------------------------------------
@struct.dataclass
class Sum:
    """``ΔW = Σ_p parts[p]`` (``rp.add`` of structured transforms)."""
    parts: tuple

    @property
    def has_sparse(self) -> bool:
        return any(p.has_sparse for p in self.parts)

    def dense(self, shape):
        return sum(p.dense(shape) for p in self.parts)

    def matvec(self, x):
        return sum(p.matvec(x) for p in self.parts)

    def costs(self, shape):
        parts = [p.costs(shape) for p in self.parts]
        return sum(p[0] for p in parts), sum(p[1] for p in parts)

    def pullback(self, x, g, dw: DW, sampled_ok: bool = False):
        return Sum(tuple(p.pullback(x, g, dw, sampled_ok) for p in self.parts))

    def grad_probe(self, d):
        return grad_probe(self.parts[0], d.parts[0])


@struct.dataclass
class InBasis:
    """``ΔW = s · Re(T_in · inner · T_outᵀ)``: an additive structure ``inner`` in a separable basis.

    ``basis`` is a separable :class:`reparam.core.Basis`: its ``along = (t, t_adj)`` apply the basis's
    1-D matrix ``T`` (``d x d``, maybe complex, for the length ``d`` of the last axis) to rows:
    ``t(v) = v @ T``, ``t_adj(v) = v @ Tᵀ``; its ``inverse`` is ``C ↦ Re(T_in C T_outᵀ)``, so
    ``x @ ΔW = s·Re(t_adj(matvec(inner, t(x))))`` and the coefficients' gradient is
    ``dC = s·Re(t(x)ᵀ t(g))``: the inner structure's gradient at the transformed ``x`` and ``g``.
    """
    inner: object
    scale: float = struct.field(pytree_node=False)
    basis: tuple = struct.field(pytree_node=False)          # a reparam.core.Basis (a NamedTuple)

    @property
    def has_sparse(self) -> bool:
        return self.inner.has_sparse

    @property
    def along(self) -> tuple:
        return self.basis.along

    def adjoint(self, g: Array) -> Array:
        """``Re(T_inᵀ G T_out)`` for a real ``[d_in, d_out]`` ``G``: the basis's 2-D adjoint, else ``t`` twice."""
        if self.basis.adjoint is not None:
            return self.basis.adjoint(g)
        t = self.basis.along[0]
        return jnp.real(t(t(g).T).T)

    def dense(self, shape):
        return self.scale * self.basis.inverse(self.inner.dense(shape))

    def matvec(self, x):
        t, t_adj = self.along
        return (self.scale * jnp.real(t_adj(self.inner.matvec(t(x))))).astype(x.dtype)

    def costs(self, shape):              # fast 1-D transforms: ~d·log2(d) per row, both sides
        d_in, d_out = shape
        per_token, form = self.inner.costs(shape)
        lg = math.log2(d_in) + math.log2(d_out)
        return per_token + int((d_in + d_out) * lg), form + int(d_in * d_out * lg)

    def pullback(self, x, g, dw: DW, sampled_ok: bool = False):
        """The inner structure's cotangent ``dC = s·Re(T_inᵀ xᵀg T_out)``.

        Low rank / Kronecker inner parts take it from the rows transformed by the basis, ``dC = s·Re(t(x)ᵀ
        t(g))`` (``N·d·log d`` for the transforms, then their rank-r products): never ``xᵀg``. Sparse inner
        parts take the sampled product on CPU: of those rows in a real basis (WaveFT), of the half spectra
        in a Hermitian one (the DFT: FourierFT, :func:`half_spectrum_grad`). Otherwise (GPU/TPU, or a dense
        support) they read ``dC`` at their support from the layer's one ``dW = xᵀg`` mapped by the basis's
        2-D adjoint, ``s·Re(T_inᵀ dW T_out)``. A complex ``T`` (Fourier) with a low-rank inner part uses
        ``Re(aᵀb) = Re(a)ᵀRe(b) - Im(a)ᵀIm(b)``: ``2N`` real rows."""
        inner = self.inner
        if sampled_ok and self.basis.half is not None and isinstance(inner, Sparse) \
                and inner.fits_sampled(x.shape[1], g.shape[1]):
            return self.replace(inner=inner.replace(
                idx=None, values=half_spectrum_grad(self, x, g).astype(inner.values.dtype)))
        t = self.along[0]
        f32 = jnp.promote_types(x.dtype, jnp.float32)
        xt, gt = t(x.astype(f32)), t(g.astype(f32))
        if jnp.iscomplexobj(xt):
            xt, gt = jnp.concatenate([xt.real, xt.imag]), jnp.concatenate([gt.real, -gt.imag])
            sampled_ok = False      # 2N complex rows cost more than the dense xᵀg's real-FFT adjoint
        d_inner = inner.pullback(xt, self.scale * gt, _lazy(lambda: self.scale * self.adjoint(dw())), sampled_ok)
        return self.replace(inner=d_inner)

    def grad_probe(self, d):
        return grad_probe(self.inner, d.inner)


def half_spectrum_grad(s: InBasis, x, g):
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


# --- right-multiplicative -----------------------------------------------------------------------------
@struct.dataclass
class Scaled:
    """``W = (W0 + inner) · diag(c)``: an additive structure ``inner`` and a scale ``c [d_out]`` per output
    (DoRA). Right-multiplicative: with ``z = x @ (W0 + inner)``, ``y = z·c``, ``dc = Σ_n g ∘ z`` and the
    inner structure's cotangent is taken at ``g·c``."""
    inner: object
    c: Array
    right = True

    @property
    def has_sparse(self) -> bool:
        return self.inner.has_sparse

    def times(self, z):
        return z * self.c.astype(z.dtype)

    def times_t(self, g):
        return g * self.c.astype(g.dtype)

    def r_pullback(self, z, g, d_inner):
        return self.replace(inner=d_inner, c=jnp.sum(g * z, axis=0).astype(self.c.dtype))

    def costs(self, shape):             # the scale: d_out per token, or d_in·d_out once
        per_token, form = self.inner.costs(shape)
        return per_token + shape[1], form + shape[0] * shape[1]

    def dense(self, shape):
        raise _needs_base(self)

    def matvec(self, x):
        raise _needs_base(self)


def _needs_base(s):
    return TypeError(f"{type(s).__name__} (W = (W0 + inner)·R) is not additive: use reparam.matmul, "
                     "which has the base")


def split(s) -> tuple[object, object]:
    """``(additive part, right multiplier or None)``: ``(s.inner, s)`` for a right-multiplicative ``s``."""
    return (s.inner, s) if getattr(s, "right", False) else (s, None)


# --- the module-level protocol -----------------------------------------------------------------------
def dense(s, shape: tuple[int, int]) -> Array:
    """The ``[d_in, d_out]`` matrix ``ΔW`` of an additive structure."""
    return s.dense(shape)


def dense_t(s, shape: tuple[int, int]) -> Array:
    """``ΔWᵀ [d_out, d_in]``, formed in that layout where the kind can (low rank: ``rᵀ lᵀ``), so that a
    backward reading ``Wᵀ`` row by row does not read ``ΔW`` down its columns."""
    return s.dense_t(shape) if hasattr(s, "dense_t") else s.dense(shape).T


def grad_probe(s, d) -> Array:
    """One array of ``d``, the gradient that ``s.pullback`` returned, that the train step uses: a trained
    factor's, never the cotangent of a frozen one (``LowRank.frozen``), which XLA would otherwise drop. Kinds
    whose arrays all train give their first (:func:`reparam.matmul._tied` makes the backward's weight wait
    for it)."""
    return s.grad_probe(d) if hasattr(s, "grad_probe") else jax.tree_util.tree_leaves(d)[0]


def matvec(s, x: Array) -> Array:
    """``x @ ΔW`` for ``x [N, d_in]`` without forming ``ΔW``."""
    return s.matvec(x)


def costs(s, shape: tuple[int, int]) -> tuple[int, int]:
    """``(multiply-adds of matvec per token, multiply-adds of forming ΔW)`` from the shapes."""
    return s.costs(shape)


def weight(base: Array, s) -> Array:
    """The effective ``[d_in, d_out]`` weight of ``base`` and a structure: ``base + ΔW``, or ``(base + inner)·R``
    for a right-multiplicative one; summed in float32 (at least) and cast to the base's dtype, as ``apply``."""
    inner, right = split(s)
    f32 = jnp.promote_types(base.dtype, jnp.float32)
    v = base.astype(f32) + inner.dense(base.shape[-2:])
    return (v if right is None else right.times(v)).astype(base.dtype)


def crossover(s, shape: tuple[int, int]) -> int:
    """Tokens per call below which the factored forward is cheaper: the materialised path forms
    ``ΔW`` once, the factored one pays ``matvec`` twice (forward and ``dx``); ``dθ`` costs both the same."""
    per_token, form = s.costs(shape)
    return math.ceil(form / (2 * per_token))


def prefer_factored(s, shape: tuple[int, int], tokens: int) -> bool:
    """Whether the factored forward costs fewer multiply-adds for ``tokens`` rows."""
    return tokens < crossover(s, shape)
