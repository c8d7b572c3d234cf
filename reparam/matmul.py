"""The hot path: ``y = x @ (W0 + ΔW(θ))`` whose backward never forms the full ``dW = xᵀg``.

Plain autodiff through a materialised weight computes the full weight gradient
``xᵀg`` for every adapted kernel -- full fine-tuning's backward cost -- and only
then projects it onto the adapter. A transform whose ``ΔW`` has structure
declares it (``Reparam.structure``), and the train step routes the layer's dot
product through :func:`structured_matmul`, a ``jax.custom_vjp`` op:

    forward   materialised:  y = x @ (W0 + ΔW)                  (N·d·k + cost of forming ΔW)
              factored:      y = x @ W0 + matvec(ΔW, x)          (N·d·k + N·cost(matvec))
    backward  dx = g @ Wᵀ (or gW0ᵀ + matvecᵀ(g) when factored)
              dθ = the structure's ``pullback(x, g)`` (:mod:`reparam.structure`): the gradient of its
                   arrays straight from the layer's input x and output cotangent g -- rank-r products for
                   low rank, per-token products or the vec trick for Kronecker, the k sampled entries
                   Σ_n x[n, i_k] g[n, j_k] for sparse, the transformed rows for a separable basis; one
                   xᵀg GEMM only where the cost model says it is cheaper
              right-multiplicative W = (W0 + inner)·R (DoRA's R = diag(c)): with z = x @ (W0 + inner),
                   R's cotangent from (z, g), and the inner structure's at g·Rᵀ

The cheaper forward is chosen per call from the shapes and the tokens ``N``
(:func:`prefer_factored`). The train step routes every contraction of an adapted
weight in the loss to this op, however the model is written (:mod:`reparam.route`).

:func:`norm_barriers` puts a *cotangent barrier* after every linen ``nn.LayerNorm`` and
``nn.RMSNorm``: an identity whose backward divides by a runtime ``1.0``. XLA:CPU
otherwise re-computes the residual stream's LayerNorm-backward chain inside every
consumer's transposing fusion; a divide is
"expensive" to XLA, so it is computed once. Values and gradients are unchanged.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from reparam import sampled, views
from reparam.structure import _lazy, dense_t, grad_probe, prefer_factored, split

Array = jax.Array


# --- the op -------------------------------------------------------------------------------------
def _weight(base, inner, dtype):
    """``W0 + inner`` in the base's dtype (the sum in f32), then in the compute dtype. A deferred base
    (:class:`reparam.views.Matrix`: quantised, or needing a transpose into its view) is formed here, for this
    layer only, in its grouped layout ``[*inp sizes, *out sizes]`` (``inner`` reshaped to it), which keeps a
    sharding of any of its axes; :func:`_times` contracts it (the backward's ``Wᵀ``: :func:`_weight_t`)."""
    b = base.grouped() if isinstance(base, views.Matrix) else base
    return _plus(b, inner.dense(base.shape), dtype)


def _plus(b, d, dtype):
    """``b + d`` (``d`` reshaped to ``b``) summed in f32, cast to ``b``'s dtype, then to the compute dtype."""
    return (b.astype(jnp.float32) + d.reshape(b.shape)).astype(b.dtype).astype(dtype)


def _grouped_t(base):
    """A deferred base's kernel ``[*out sizes, *inp sizes]``: :meth:`reparam.views.Matrix.grouped` transposed."""
    ni, no = (len(a) for a in base.sizes)
    return base.grouped().transpose(tuple(range(ni, ni + no)) + tuple(range(ni)))


def _weight_t(base, inner, dtype):
    """``Wᵀ = W0ᵀ + ΔWᵀ`` for a deferred base, in its grouped layout transposed: ``[*out sizes, *inp sizes]``.
    What the backward's ``g Wᵀ`` reads: formed as :func:`_weight` and then transposed, each element of ``ΔW``
    would be read down a column (:func:`reparam.structure.dense_t` forms ``ΔWᵀ`` in this layout instead)."""
    return _plus(_grouped_t(base), dense_t(inner, base.shape), dtype)


def _times(x, w, base):
    """``x [N, d_in] @ W -> [N, d_out]``, ``W`` as :func:`_weight` gives it for ``base``."""
    if not isinstance(base, views.Matrix):
        return x @ w
    inp, _ = base.sizes
    return jnp.tensordot(x.reshape((x.shape[0],) + inp), w, len(inp)).reshape(x.shape[0], -1)


def _times_t(g, w, base):
    """``g [N, d_out] @ Wᵀ -> [N, d_in]``, ``W`` as :func:`_weight` gives it for ``base`` (a deferred base:
    ``Wᵀ`` as :func:`_weight_t` gives it)."""
    if not isinstance(base, views.Matrix):
        return g @ w.T
    out = base.sizes[1]
    return jnp.tensordot(g.reshape((g.shape[0],) + out), w, len(out)).reshape(g.shape[0], -1)


def _grad(s, x, g):
    """``s.pullback`` with the layer's own lazy ``dW = xᵀg``; a structure with sparse parts is staged
    twice, the CPU branch taking them by the sampled product (:func:`reparam.sampled.choose`)."""
    def branch(sampled_ok):
        return lambda x, g: s.pullback(x, g, _lazy(lambda: x.T @ g), sampled_ok)
    if not s.has_sparse:
        return branch(False)(x, g)
    return sampled.choose((x, g), branch(True), branch(False))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _materialised(x, base, s, tie):
    inner, right = split(s)
    z = _times(x, _weight(*_tied((base, inner), x, tie), x.dtype), base)
    return z if right is None else right.times(z)


def _materialised_fwd(x, base, s, tie):
    inner, right = split(s)
    z = _times(x, _weight(*_tied((base, inner), x, tie), x.dtype), base)
    # the residuals are the frozen base and the structure, not W: a weight-sized residual per layer would be
    # stacked by a scan over layers (and kept alive by any model); the backward forms W again (d_in·d_out·r)
    return (z, (x, base, None, s)) if right is None else (right.times(z), (x, base, z, s))


def _tied(tree, t, tie: bool = True):
    """``tree`` (a base and a structure) made to depend on the array ``t`` (the layer's input; in the backward,
    the structure's gradient, formed from the output's cotangent): every array plus a zero computed from ``t``
    at run time. A layer's weight-sized intermediates
    formed from it -- a quantised base's f32 dequantisation, ``ΔW``, ``W0 + ΔW`` -- then exist only from
    when ``t`` does to their one use: XLA can neither compute every layer's at the start (its scheduler
    would, as they depend on parameters only) nor share the forward's with the backward (common-subexpression
    elimination), either of which keeps one per layer alive at once -- for a quantised base, the whole
    model in f32. (XLA:CPU expands ``optimization_barrier`` before it eliminates common subexpressions, so a
    barrier does not do this.)

    ``tie=False`` (a layer inside a scan over layers) returns ``tree`` as it is: a loop body holds one
    layer's intermediates whatever the schedule, and its forward and backward are different loops, while
    the tie would hold forming the backward's ``W`` until the cotangent arrives, on the critical path of
    every iteration."""
    if not tie:
        return tree
    t0 = t.reshape(-1)[0].astype(jnp.float32)
    zero = jnp.where(jnp.isfinite(t0), t0 * 0, 0)       # 0 at run time, unknown to the compiler
    return jax.tree_util.tree_map(lambda a: a + zero.astype(a.dtype), tree)


def _materialised_bwd(tie, res, g):
    x, base, z, s = res
    inner, right = split(s)
    form = _weight_t if isinstance(base, views.Matrix) else _weight
    gz = g if right is None else right.times_t(g)              # the cotangent of z = x @ (W0 + inner)
    d_inner = _grad(inner, x, gz)
    # W waits for the structure's gradient, not for g itself: reading an element of g would make XLA compute
    # g's producer apart from g's own fusion (a GELU's derivative: its exp in a pass of its own)
    v = form(*_tied((base, inner), grad_probe(inner, d_inner), tie), x.dtype)
    return _times_t(gz, v, base), None, d_inner if right is None else right.r_pullback(z, g, d_inner)


_materialised.defvjp(_materialised_fwd, _materialised_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _deferred_product(x, base, tie):
    """``x @ W0`` for a deferred base (:class:`reparam.views.Matrix`: quantised, or transposed into its view),
    whose backward forms ``W0`` again rather than keeping the forward's as autodiff's residual."""
    return _times(x, _tied(base, x, tie).grouped().astype(x.dtype), base)


def _deferred_product_bwd(tie, base, g):
    return _times_t(g, _grouped_t(_tied(base, g, tie)).astype(g.dtype), base), None


_deferred_product.defvjp(lambda x, base, tie: (_deferred_product(x, base, tie), base), _deferred_product_bwd)


def _frozen_product(x, base, tie: bool = True):
    """``x @ W0`` with no gradient for ``W0``."""
    base = jax.lax.stop_gradient(base)
    return _deferred_product(x, base, tie) if isinstance(base, views.Matrix) else x @ base.astype(x.dtype)


def structured_matmul(x: Array, base: Array, s, *, factored: Optional[bool] = None, in_scan: bool = False) -> Array:
    """``x @ W`` for ``x [N, d_in]``, ``base [d_in, d_out]`` (frozen; an array or a quantised
    :class:`reparam.views.Matrix`, dequantised inside the op in the forward and again in the backward) and a
    structure ``s``: ``W = base + ΔW``, or ``(base + inner)·R`` for a right-multiplicative one
    (:mod:`reparam.structure`).

    ``factored=None`` picks the cheaper forward (:func:`prefer_factored`). Both
    paths give the same values and gradients as plain autodiff through the
    materialised weight (up to float rounding); neither forms ``xᵀg``. ``in_scan``: the call is a layer in
    the body of a scan over layers, where the weight-sized intermediates need no tie (:func:`_tied`).
    """
    if factored is None:
        factored = prefer_factored(s, base.shape, x.shape[0])
    if not factored:
        return _materialised(x, jax.lax.stop_gradient(base), s, not in_scan)
    # plain autodiff of the factored form is already rank-r / vec-trick / support-only
    inner, right = split(s)
    z = _frozen_product(x, base, not in_scan) + inner.matvec(x)
    return z if right is None else right.times(z)


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
