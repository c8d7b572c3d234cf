"""Quantisation-aware low-rank init: the adapter absorbs the quantisation error of the base (LoftQ; T=1: INT2.1).

    plan = rp.plan([(r".*/(query|value)/kernel", rp.lora(16, alpha=32))], params)   # full-precision params
    frozen, trainable = rp.loftq(plan, key, params, "nf4", iters=5)      # base in nf4, adapter = its error
    loss = ... plan.apply(frozen, trainable) ...                           # as any quantised base

A fresh adapter on a quantised base starts from ``dequant(Q(W))``, off ``W`` by the whole quantisation error.
LoftQ (Li et al. 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization") chooses the base and the adapter together
so that ``dequant(Q) + s·A@B ≈ W`` at step 0 (the fresh adapter is NOT zero: it is the correction). With ``ΔW_0``
the transform's own fresh ``s·A_0@B_0`` (0 for LoRA), alternate for ``t = 1 .. T``::

    Q_t       = quantize(W − ΔW_{t−1})                      # in the base format (nf4, int8, q4_1, q8_0)
    U S Vᵀ    = SVD_r(W − dequant(Q_t))                     # the r largest components of the error
    A_t, B_t  = U √(S/s),  √(S/s) Vᵀ                        # so s·A_t@B_t = U S Vᵀ exactly,  ΔW_t = s·A_t@B_t

and keep ``Q_T`` as the frozen base, ``A_T``, ``B_T`` as the trainables. ``iters=1`` is low-rank error correction
(INT2.1, Chai et al. 2023; the init of LQ-LoRA, Guo et al. 2023): one SVD of ``W − dequant(Q(W))``, so the
error left is exactly the rank-r tail of plain quantisation's error. Further alternations usually lower it (the
LoftQ paper runs T = 1 .. 5; PEFT's default is 1), not always monotonically: nearest rounding with rescaled
blocks is no least-squares projection. Starting from the transform's own adapter makes PiSSA's principal
components the start: ``Q_1`` is QPiSSA's base and the SVD refits the adapter to its error (at T=1 never worse
than QPiSSA) -- and far better than LoRA's start from zero when the spectrum decays (tests/test_loftq.py, rank 8
of a 128×64 weight: 0.17× plain nf4's error from PiSSA, 0.74× from zero at T=1; 0.14× and 0.67× at T=5).

PEFT (``LoraConfig(init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=T))``) runs the same
loop on ``[out, in]`` weights, through bitsandbytes (0.21: nf4 blocks of 64 along ``in`` -- our default blocks along
``d_in`` -- or int8 per output row, our ``int8``; no CPU path, so the tests check the loop and its
``_low_rank_decomposition`` split, not its output) and splits ``√S`` evenly (its ``lora_B = U√S``, ``lora_A = √S
Vᵀ``, our ``B.T`` and ``A.T``), but ignores the LoRA scale: its fresh adapter adds ``(α/r)·U S Vᵀ``, the correction
only when ``α = r``. Here the scale is divided out, so the adapter absorbs the error for any ``α`` (and rsLoRA's
``α/√r``); at ``α = r`` the two agree.

Which transforms it serves: any whose trainables are exactly ``{A, B}`` and whose ``W = base + s·A@B`` for one
scalar ``s`` (LoRA, rsLoRA, PiSSA, MiLoRA, CorDA, EVA): checked on the plan's own ``apply`` with random
factors, which also reads ``s``. Stacked kernels (``[L, d_in, d_out]``) and other matrix views run per layer;
the base is quantised in the kernel's own layout, as :func:`reparam.quant.quantize` would.
"""
from __future__ import annotations

import functools
import re
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from reparam import quant, views
from reparam.core import ReparamError
from reparam.linalg import truncated_svd
from reparam.svd import split_factors

PyTree = Any


def _where(plan, leaf) -> str:
    return f"parameter '{leaf.path}', rule {leaf.rule} ({plan.rules[leaf.rule][0]!r} -> {leaf.transform.name})"


def _selected(plan, where: Optional[str]) -> list[int]:
    """Indices of the leaves LoftQ initialises: those whose path fullmatches ``where``, or by default every
    adapted leaf that has both a frozen base and trainables (``rp.full()`` / ``rp.frozen()`` leaves have
    nothing to quantise or nothing to absorb the error)."""
    if where is not None:
        rx = re.compile(where)
        hits = [i for i, leaf in enumerate(plan.leaves) if rx.fullmatch(leaf.path)]
        if not hits:
            raise ReparamError(f"loftq: where={where!r} matches no parameter path (re.fullmatch); adapted paths "
                               f"look like {plan.adapted()[:3]}.")
        bare = [plan.leaves[i].path for i in hits if plan.leaves[i].transform is None]
        if bare:
            raise ReparamError(f"loftq: where={where!r} matches {bare[:3]}, which no rule adapts: LoftQ "
                               "initialises an adapter; give those parameters a rule with rp.lora(...) or narrow "
                               "`where`.")
        return hits
    out = [i for i, leaf in enumerate(plan.leaves)
           if leaf.transform is not None and leaf.transform.ident.method not in ("full", "frozen")]
    if not out:
        raise ReparamError("loftq: the plan adapts no parameter with a low-rank rule; add a rule such as "
                           "(r'.*/kernel', rp.lora(8)).")
    return out


def _scale(plan, leaf, f: dict, tr: dict, key) -> float:
    """``s`` of ``W = base + s·A@B``, read from the leaf's own ``apply`` at random factors; a
    :class:`ReparamError` naming the parameter when its transform is not of that form."""
    fix = ("LoftQ needs W = base + s·A@B with A and B the only trainables; use rp.lora(r, alpha) (or "
           "rp.lora(r, alpha, rslora=True), rp.pissa) on this parameter, or leave it out of loftq's `where=`.")
    t = leaf.transform
    if t.stochastic:
        raise ReparamError(f"loftq: {_where(plan, leaf)}: a stochastic transform (its ΔW changes with the step's "
                           f"rng) cannot hold the quantisation error at every step. {fix}")
    if "base" not in f or not isinstance(tr, dict) or set(tr) != {"A", "B"}:
        keys = sorted(tr) if isinstance(tr, dict) else type(tr).__name__
        raise ReparamError(f"loftq: {_where(plan, leaf)} trains {keys}{'' if 'base' in f else ' with no frozen base'}"
                           f", not a low-rank pair. {fix}")
    ka, kb = jax.random.split(key)
    a = jax.random.normal(ka, tr["A"].shape, jnp.float32)
    b = jax.random.normal(kb, tr["B"].shape, jnp.float32)
    base = f["base"].astype(jnp.float32)
    d = views.to_matrix(leaf.view, t.apply({**f, "base": base}, {"A": a, "B": b}) - base)
    p = a @ b
    s = float(jnp.vdot(d, p) / jnp.vdot(p, p))
    if not s or float(jnp.linalg.norm(d - s * p)) > 1e-3 * float(jnp.linalg.norm(d)):
        raise ReparamError(f"loftq: {_where(plan, leaf)}: its ΔW is not a scalar times A@B (WaRA's basis, DoRA's "
                           f"column scaling, ...). {fix}")
    return s


@functools.partial(jax.jit, static_argnames=("rank", "nb", "niter"))
def _fit(err, key, scale, *, rank: int, nb: int, niter: Optional[int]):
    """``(A, B)`` with ``s·A@B`` the rank-``rank`` truncated SVD of each ``[d_in, d_out]`` matrix of ``err``
    (``nb`` leading stacked axes)."""
    def one(e, k):
        u, sv, vt = truncated_svd(e, rank, niter=niter, key=k)
        return split_factors(u, sv, vt, scale)
    keys = jax.random.split(key, err.shape[:nb]) if nb else key
    for _ in range(nb):
        one = jax.vmap(one)
    return one(err, keys)


def _alternate(leaf, w, a, b, scale: float, fmt: str, iters: int, niter, key, kwargs):
    """LoftQ on one kernel ``w`` (its own layout) from the adapter ``(a, b)``: ``(Q_T, A_T, B_T)``."""
    view, nb = leaf.view, len(leaf.view.batch)
    m = views.to_matrix(view, jnp.asarray(w, jnp.float32))
    for t in range(iters):
        base = views.from_matrix(view, m - scale * (a @ b), leaf.shape).astype(w.dtype)
        q = quant.quantize_array(base, fmt, path=leaf.path, **kwargs)
        err = m - views.to_matrix(view, quant.dequantize(q).astype(jnp.float32))
        a, b = _fit(err, jax.random.fold_in(key, t), scale, rank=a.shape[-1], nb=nb, niter=niter)
    return q, a, b


def loftq(plan, key: jax.Array, params: PyTree, fmt: str, *, iters: int = 1, where: Optional[str] = None,
          niter: Optional[int] = None, calib: Optional[dict] = None, **kwargs) -> tuple[PyTree, PyTree]:
    """``(frozen, trainable)`` as ``plan.init(key, params, calib)``, with each selected leaf's base quantised in
    ``fmt`` and its adapter initialised to absorb the quantisation error: LoftQ with ``iters`` = T alternations
    (``iters=1``: INT2.1's low-rank error correction). See the module docstring for the math.

    ``params``: the FULL-PRECISION weights (the error is measured against them; already-quantised leaves are
    refused). ``fmt`` and ``kwargs`` (``block``, ``axis``, ``double_quant``) as :func:`reparam.quant.quantize_array`.
    ``where``: a regex (fullmatch) of the paths to initialise; default every adapted leaf but ``rp.full()`` /
    ``rp.frozen()`` ones. Every selected leaf must be of the form ``base + s·A@B`` with ``A``, ``B`` trained
    (LoRA, rsLoRA, PiSSA, ...). ``niter``: randomized SVD with that many power iterations (exact by default, as
    PEFT). Leaves not selected keep ``plan.init``'s state; quantise their bases with
    ``quant.quantize(frozen, fmt, where=...)`` for a base quantised throughout.
    """
    if fmt not in quant.FORMATS:
        raise ReparamError(f"loftq: unknown format {fmt!r}; use one of {sorted(quant.FORMATS)} (e.g. 'nf4', QLoRA's).")
    if not isinstance(iters, (int, np.integer)) or isinstance(iters, bool) or iters < 1:
        raise ReparamError(f"loftq: iters={iters!r} must be a positive int: 1 for one SVD of the quantisation error "
                           "(INT2.1), 5 as LoftQ's paper.")
    chosen = _selected(plan, where)
    flat = plan.treedef.flatten_up_to(params)
    for i in chosen:
        if quant.is_quantized(flat[i]):
            raise ReparamError(f"loftq: {_where(plan, plan.leaves[i])} is already quantised ({flat[i].fmt}): LoftQ "
                               "measures the error against the full-precision weight; pass the params before "
                               "rp.quant.quantize (or use plan.init on the quantised params for a plain QLoRA base).")
    frozen, trainable = plan.init(key, params, calib)
    fl, tl = plan.treedef.flatten_up_to(frozen), plan.treedef.flatten_up_to(trainable)
    sub = jax.random.split(key)[1]          # apart from plan.init's fold_in(key, i): the probes, randomized SVDs
    for i in chosen:
        leaf, f, tr = plan.leaves[i], fl[i], tl[i]
        k = jax.random.fold_in(sub, i)
        s = _scale(plan, leaf, f, tr, jax.random.fold_in(k, 0))
        a0, b0 = (jnp.asarray(tr[n], jnp.float32) for n in ("A", "B"))
        q, a, b = _alternate(leaf, flat[i], a0, b0, s, fmt, iters, niter, jax.random.fold_in(k, 1), kwargs)
        fl[i] = {**f, "base": q}
        tl[i] = {"A": a.astype(tr["A"].dtype), "B": b.astype(tr["B"].dtype)}
    frozen, trainable = plan.treedef.unflatten(fl), plan.treedef.unflatten(tl)
    plan.check(frozen, trainable)
    return frozen, trainable
