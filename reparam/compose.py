"""Composition of trained adapters: task arithmetic / composable sparse fine-tuning, orthogonal adaptation.

    merged = rp.merge_adapters([(plan_a, frozen_a, trained_a), (plan_b, frozen_b, trained_b)], params)
    loss = task_loss + lam * rp.orthogonality_penalty(rp.weight_deltas(plan, f, t1), rp.weight_deltas(plan, f, t2))

These work for any transform (additive or not): an adapter's contribution is
measured as ``ΔW = W_adapted − W0`` against the real ``W0``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from reparam import quant, views
from reparam.core import ReparamError
from reparam.plan import Plan

def merge_adapters(adapters: Sequence[tuple[Plan, dict, dict]], base, weights: Optional[Sequence[float]] = None):
    """Plain params ``W0 + Σ_i w_i (apply_i − W0)`` from independently trained adapters on one base.

    ``adapters`` is a list of ``(plan, frozen, trainable)`` triples, all made
    from ``base`` (``W0``, same structure): one plan with several trained
    trainables (task arithmetic, Ilharco et al. 2023) or different plans, e.g.
    LT-SFT diffs of a language and a task with different supports (composable
    SFT, Ansell et al. 2022). ``ΔW_i = plan_i.merge(frozen_i, trainable_i) − W0``
    works for any transform (additive or not, base rewritten or not); weights
    default to 1, negative ones subtract (forgetting). Sums run in float32 and
    are cast to each leaf's dtype; leaves no plan adapts are ``base``'s own.
    """
    if not adapters:
        raise ReparamError("merge_adapters: give at least one (plan, frozen, trainable) triple.")
    weights = [1.0] * len(adapters) if weights is None else list(weights)
    if len(weights) != len(adapters):
        raise ReparamError(f"merge_adapters: {len(weights)} weights for {len(adapters)} adapters; give one each.")
    flat, struct = jax.tree_util.tree_flatten(base)
    acc = {}
    for n, ((plan, frozen, trainable), wt) in enumerate(zip(adapters, weights)):
        if plan.treedef != struct:
            raise ReparamError(f"merge_adapters: adapter {n}'s plan was made for another params structure than "
                               "base; pass the params the adapters were initialised from.")
        out = plan.treedef.flatten_up_to(plan.merge(frozen, trainable))
        for i, leaf in enumerate(plan.leaves):
            if leaf.transform is not None:
                f32 = jnp.promote_types(flat[i].dtype, jnp.float32)
                acc[i] = acc.get(i, 0.0) + wt * (out[i].astype(f32) - flat[i].astype(f32))
    return struct.unflatten([(b.astype(acc[i].dtype) + acc[i]).astype(b.dtype) if i in acc else b
                             for i, b in enumerate(flat)])


def weight_deltas(plan: Plan, frozen, trainable, base=None) -> dict:
    """``{path: ΔW}`` for every adapted leaf, as ``[..., d_in, d_out]`` matrices (the leaf's matrix view).

    ``ΔW = plan.apply(frozen, trainable) − W0`` with ``W0`` from ``base`` (the
    params), or ``frozen``'s bases when ``base`` is None (right for transforms
    that keep ``W0`` as their base: LoRA, sparse; pass ``base`` for PiSSA-like ones).
    Differentiable in ``trainable``: feed it to :func:`orthogonality_penalty` in a loss.
    """
    out = plan.treedef.flatten_up_to(plan.apply(frozen, trainable))
    w0 = (plan.treedef.flatten_up_to(base) if base is not None else
          [quant.dequantize(f.get("base")) for f in plan.treedef.flatten_up_to(frozen)])
    mat = lambda leaf, x: x if leaf.view is None else views.to_matrix(leaf.view, x)
    return {leaf.path: mat(leaf, (o - b).astype(jnp.float32))
            for leaf, o, b in zip(plan.leaves, out, w0) if leaf.transform is not None}


def _overlap(a, b, kind: str):
    if kind == "frobenius":                            # ⟨ΔW_a, ΔW_b⟩_F², per stacked layer
        return jnp.sum(jnp.square(jnp.sum(a * b, axis=(-2, -1))))
    if kind == "out":                                  # ‖ΔW_a ΔW_bᵀ‖² = ‖(ΔW_aᵀ)ᵀ ΔW_bᵀ‖²
        a, b = jnp.swapaxes(a, -1, -2), jnp.swapaxes(b, -1, -2)
    t = lambda x: jnp.swapaxes(x, -1, -2)
    if a.shape[-1] <= a.shape[-2]:                     # ‖ΔW_aᵀ ΔW_b‖², the cheaper of two exact forms
        return jnp.sum(jnp.square(t(a) @ b))
    return jnp.sum((a @ t(a)) * (b @ t(b)))


def orthogonality_penalty(*deltas, kind: str = "in"):
    """``Σ_{i<j} Σ_paths overlap(ΔW_i, ΔW_j)``: a loss term keeping adapters orthogonal (Po et al. 2024).

    Each argument is a ``{path: ΔW}`` dict (:func:`weight_deltas`) or one
    ``[d_in, d_out]`` array; paths common to a pair are compared. ``kind``:
    ``"in"``  ``‖ΔW_iᵀ ΔW_j‖_F²``: 0 iff their input (row) spaces are orthogonal, e.g.
      disjoint rows, or LoRA with ``A_iᵀ A_j = 0`` (orthogonal adaptation);
    ``"out"`` ``‖ΔW_i ΔW_jᵀ‖_F²``: output spaces; disjoint columns, ``B_i B_jᵀ = 0``;
    ``"frobenius"`` ``⟨ΔW_i, ΔW_j⟩_F²``: 0 for disjoint sparse supports.
    Orthogonal residuals add with little interference when merged (:func:`merge_adapters`).
    """
    if kind not in ("in", "out", "frobenius"):
        raise ReparamError(f"orthogonality_penalty: kind must be 'in', 'out' or 'frobenius', got {kind!r}.")
    if len(deltas) < 2:
        raise ReparamError("orthogonality_penalty: give at least two adapters' deltas.")
    ds = [d if isinstance(d, dict) else {"": d} for d in deltas]
    total, shared = jnp.float32(0), 0
    for i in range(len(ds)):
        for j in range(i + 1, len(ds)):
            for p in ds[i].keys() & ds[j].keys():
                a, b = ds[i][p], ds[j][p]
                if a.shape != b.shape:
                    raise ReparamError(f"orthogonality_penalty: '{p}' has ΔW shapes {a.shape} and {b.shape}; "
                                       "compare adapters of the same parameters.")
                total, shared = total + _overlap(a.astype(jnp.float32), b.astype(jnp.float32), kind), shared + 1
    if not shared:
        raise ReparamError("orthogonality_penalty: no parameter path is common to any two adapters; compare "
                           "weight_deltas(...) of plans over the same params.")
    return total
