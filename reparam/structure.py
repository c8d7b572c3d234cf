"""ΔW in factored form: the structures a transform may declare (``Reparam.structure``).

A structure is a small pytree that says how ``ΔW [d_in, d_out]`` is built, so
that ``x @ ΔW`` and the gradient of its arrays can be computed without forming
``ΔW`` or the full weight gradient ``xᵀg`` (:mod:`reparam.matmul`):

    LowRank(l, r)        ΔW = l @ r                     LoRA, PiSSA, VeRA, NOLA, RandLoRA, S²FT (one-hot), ...
    Kron(a, b)           ΔW = Σ_k a[k] ⊗ b[k]           KronA, LoKr, Compacter, SoKA
    Sparse(idx, values)  ΔW.flat[idx] = values          SLTrain, SaRA, SPT, LT-SFT
    Sum(parts)           ΔW = Σ_p parts[p]              rp.add
    InBasis(inner, s)    ΔW = s·Re(T_in·inner·T_outᵀ)    rp.in_basis: FourierFT, WaveFT, WaRA (separable bases)
    Scaled(inner, c)     W = (W0 + inner)·diag(c)       DoRA (c = m / ‖W0 + s·AB‖_col)

Each has :func:`dense` (the matrix), :func:`matvec` (``x @ ΔW``) and :func:`costs`. ``Scaled`` is not
additive (its ``ΔW = W0·diag(c - 1) + inner·diag(c)`` involves the base): :mod:`reparam.matmul` computes
``(x @ W0 + matvec(inner, x)) · c`` with it, and ``dense`` / ``matvec`` refuse it.
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import struct

Array = jax.Array


@struct.dataclass
class LowRank:
    """``ΔW = l @ r``, ``l [d_in, r]``, ``r [r, d_out]`` (scales folded into ``l``).

    ``frozen``: ``"l"`` or ``"r"`` when no trainable parameter feeds that factor (VeRA's and RandLoRA's
    random bases, SVFit's ``Vᵀ``, S²FT's one-hot rows). The hot path's gradient then costs only the other
    factor's (XLA drops the frozen one's unused cotangent), which moves its choice between rank-r
    products and one ``xᵀg`` GEMM (:func:`reparam.matmul.lowrank_grad_by_gemm`). A wrong hint costs
    speed, never correctness."""
    l: Array
    r: Array
    frozen: str = struct.field(pytree_node=False, default="")


@struct.dataclass
class Kron:
    """``ΔW = Σ_k a[k] ⊗ B_k``, ``a [K, a1, a2]``, ``d_in = a1·b1``, ``d_out = a2·b2``, with ``B_k = b[k]``
    (``b [K, b1, b2]``) or, given ``v``, the low-rank block ``B_k = b[k] @ v[k]`` (``b [K, b1, r]``,
    ``v [K, r, b2]``: Compacter's), whose ``x @ ΔW`` and gradients take ``K·r·(d_in + a1·a2 + d_out)``
    multiply-adds a token, never ``B_k``'s ``b1·b2``."""
    a: Array
    b: Array
    v: Optional[Array] = None

    @property
    def dims(self) -> tuple[int, int, int, int, int]:
        """``(K, a1, a2, b1, b2)``."""
        (k, a1, a2), b1 = self.a.shape, self.b.shape[1]
        return k, a1, a2, b1, (self.b if self.v is None else self.v).shape[2]

    @property
    def blocks(self) -> Array:
        """``B [K, b1, b2]``."""
        return self.b if self.v is None else jnp.einsum("kpr,krq->kpq", self.b, self.v)


@struct.dataclass
class Sparse:
    """``ΔW`` zero except ``ΔW.flat[idx[k]] = values[k]`` (``idx`` sorted, unique) in a ``[d_in, d_out]`` weight."""
    idx: Array
    values: Array
    d_out: int = struct.field(pytree_node=False)


@struct.dataclass
class Sum:
    """``ΔW = Σ_p parts[p]`` (``rp.add`` of structured transforms)."""
    parts: tuple


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
    def along(self) -> tuple:
        return self.basis.along

    def adjoint(self, g: Array) -> Array:
        """``Re(T_inᵀ G T_out)`` for a real ``[d_in, d_out]`` ``G``: the basis's 2-D adjoint, else ``t`` twice."""
        if self.basis.adjoint is not None:
            return self.basis.adjoint(g)
        t = self.basis.along[0]
        return jnp.real(t(t(g).T).T)


@struct.dataclass
class Scaled:
    """``W = (W0 + inner) · diag(c)``: an additive structure ``inner`` and a scale ``c [d_out]`` per output."""
    inner: object
    c: Array


def _needs_base(s):
    return TypeError(f"{type(s).__name__} (W = (W0 + inner)·diag(c)) is not additive: use reparam.matmul, "
                     "which has the base")


def dense(s, shape: tuple[int, int]) -> Array:
    """The ``[d_in, d_out]`` matrix ``ΔW`` of a structure."""
    if isinstance(s, LowRank):
        return s.l @ s.r
    if isinstance(s, Kron):
        _, a1, a2, b1, b2 = s.dims
        return jnp.einsum("kij,kpq->ipjq", s.a, s.blocks).reshape(a1 * b1, a2 * b2)
    if isinstance(s, Sparse):
        flat = jnp.zeros(shape[0] * shape[1], s.values.dtype)
        return flat.at[s.idx].set(s.values, indices_are_sorted=True, unique_indices=True).reshape(shape)
    if isinstance(s, Sum):
        return sum(dense(p, shape) for p in s.parts)
    if isinstance(s, InBasis):
        return s.scale * s.basis.inverse(dense(s.inner, shape))
    if isinstance(s, Scaled):
        raise _needs_base(s)
    raise TypeError(f"not a ΔW structure: {type(s).__name__}")


def weight(base: Array, s) -> Array:
    """The effective ``[d_in, d_out]`` weight of ``base`` and a structure: ``base + ΔW``, or ``(base + inner)·diag(c)``
    for :class:`Scaled`; summed in float32 (at least) and cast to the base's dtype, as the transforms' ``apply``."""
    f32 = jnp.promote_types(base.dtype, jnp.float32)
    if isinstance(s, Scaled):
        return ((base.astype(f32) + dense(s.inner, base.shape[-2:])) * s.c.astype(f32)).astype(base.dtype)
    return (base.astype(f32) + dense(s, base.shape[-2:])).astype(base.dtype)


def matvec(s, x: Array) -> Array:
    """``x @ ΔW`` for ``x [N, d_in]`` without forming ``ΔW``."""
    if isinstance(s, LowRank):
        return (x @ s.l.astype(x.dtype)) @ s.r.astype(x.dtype)
    if isinstance(s, Kron):
        _, a1, a2, b1, b2 = s.dims
        xs, cast = x.reshape(x.shape[0], a1, b1), (lambda v: v.astype(x.dtype))
        if s.v is not None:         # x's blocks through b first: [n, a1, b1] -> [n, k, a1, r], never B_k
            return jnp.einsum("nip,kpr,kij,krq->njq", xs, cast(s.b), cast(s.a), cast(s.v),
                              optimize=True).reshape(x.shape[0], a2 * b2)
        return jnp.einsum("nip,kij,kpq->njq", xs, cast(s.a), cast(s.b), optimize=True).reshape(x.shape[0], a2 * b2)
    if isinstance(s, Sparse):
        rows, cols = s.idx // s.d_out, s.idx % s.d_out
        contrib = x[:, rows] * s.values.astype(x.dtype)
        return jax.ops.segment_sum(contrib.T, cols, num_segments=s.d_out, indices_are_sorted=False).T
    if isinstance(s, Sum):
        return sum(matvec(p, x) for p in s.parts)
    if isinstance(s, InBasis):
        t, t_adj = s.along
        return (s.scale * jnp.real(t_adj(matvec(s.inner, t(x))))).astype(x.dtype)
    if isinstance(s, Scaled):
        raise _needs_base(s)
    raise TypeError(f"not a ΔW structure: {type(s).__name__}")


def costs(s, shape: tuple[int, int]) -> tuple[int, int]:
    """``(multiply-adds of matvec per token, multiply-adds of forming ΔW)`` from the shapes."""
    d_in, d_out = shape
    if isinstance(s, LowRank):
        r = s.l.shape[-1]
        return r * (d_in + d_out), d_in * d_out * r
    if isinstance(s, Kron):
        k, a1, a2, b1, b2 = s.dims
        if s.v is not None:
            r = s.b.shape[2]
            return k * r * (d_in + a1 * a2 + d_out), k * (d_in * d_out + b1 * r * b2)
        return k * min(a1 * b1 * b2 + a1 * a2 * b2, a1 * b1 * a2 + a2 * b1 * b2), k * d_in * d_out
    if isinstance(s, Sparse):
        return 2 * s.values.shape[-1], d_in * d_out
    if isinstance(s, Sum):
        parts = [costs(p, shape) for p in s.parts]
        return sum(p[0] for p in parts), sum(p[1] for p in parts)
    if isinstance(s, InBasis):          # fast 1-D transforms: ~d·log2(d) per row, both sides
        per_token, form = costs(s.inner, shape)
        lg = math.log2(d_in) + math.log2(d_out)
        return per_token + int((d_in + d_out) * lg), form + int(d_in * d_out * lg)
    if isinstance(s, Scaled):           # the scale: d_out per token, or d_in·d_out once
        per_token, form = costs(s.inner, shape)
        return per_token + d_out, form + d_in * d_out
    raise TypeError(f"not a ΔW structure: {type(s).__name__}")


def crossover(s, shape: tuple[int, int]) -> int:
    """Tokens per call below which the factored forward is cheaper: the materialised path forms
    ``ΔW`` once, the factored one pays ``matvec`` twice (forward and ``dx``); ``dθ`` costs both the same."""
    per_token, form = costs(s, shape)
    return math.ceil(form / (2 * per_token))


def prefer_factored(s, shape: tuple[int, int], tokens: int) -> bool:
    """Whether the factored forward costs fewer multiply-adds for ``tokens`` rows."""
    return tokens < crossover(s, shape)
