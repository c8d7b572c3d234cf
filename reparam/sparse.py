"""Sparse-mask family: trainable values at a fixed support, ``W = W0 + ΔW``, ``ΔW`` zero off the support.

The support is a set of ``k`` flat indices into the ``[d_in, d_out]`` weight,
held in ``frozen["idx"]`` (int32, sorted); the trainable state is the ``k``
values (init 0), so optimizer state is the size of the support, not of ``W``.
Methods differ in how the support is chosen: at random (SLTrain's S, PaCA), by
the magnitude of ``W0`` (SaRA), of a calibration gradient (SPT), of a full
fine-tuning diff (LT-SFT), or as whole rows/columns (S²FT, :func:`structured`).

Composition (any transform, not only sparse): :func:`merge_adapters` sums
independently trained adapters into plain params (task arithmetic, composable
sparse fine-tuning); :func:`orthogonality_penalty` keeps adapters' weight
deltas orthogonal (orthogonal adaptation) as a loss term.
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from reparam.core import Reparam, ReparamError, additive, fmt_name
from reparam.plan import path_str
from reparam.structure import LowRank, Sparse


def _count(n: int, what: str, method: str, k, density) -> int:
    """``k``, or ``round(density · n)`` (at least 1), out of ``n`` items described by ``what``."""
    if (k is None) == (density is None):
        raise ReparamError(f"{method}: give exactly one of k (number of entries) or density (fraction), "
                           f"got k={k}, density={density}.")
    if density is not None:
        if not 0.0 < density <= 1.0:
            raise ReparamError(f"{method}: density must be in (0, 1], got {density}; e.g. density=0.01 "
                               "trains 1% of the entries.")
        return max(1, int(round(density * n)))
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise ReparamError(f"{method}: k must be a positive int, got {k!r}.")
    if k > n:
        raise ReparamError(f"{method}: k={k} exceeds the {n} {what}; use k <= {n} or a density.")
    return int(k)


def support_size(shape: tuple[int, ...], method: str, *, k: Optional[int] = None,
                 density: Optional[float] = None) -> int:
    """The number of support entries ``k`` from either ``k`` or ``density`` of a ``d_in x d_out`` weight."""
    return _count(shape[-2] * shape[-1], f"entries of a {shape[-2]}x{shape[-1]} weight", method, k, density)


def check_support(idx, shape: tuple[int, ...], method: str) -> None:
    """Raises a :class:`ReparamError` unless ``idx`` is a 1-D array of distinct integer flat indices
    ``row * d_out + col`` into a ``[d_in, d_out]`` weight: an index out of range would train an entry that does
    not exist (XLA drops or clamps it silently), a repeated one an entry twice."""
    d_in, d_out = shape[-2:]
    n, idx = d_in * d_out, np.asarray(idx)
    fix = "fix the indices (a support meant for another weight?), or narrow the rule's regex to the weights it fits"
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
        raise ReparamError(f"{method}: the support must be a 1-D array of integer flat indices (row * d_out + col), "
                           f"got {idx.dtype.name}{list(idx.shape)}; {fix}.")
    bad = idx[(idx < 0) | (idx >= n)]
    if bad.size:
        raise ReparamError(f"{method}: support index {int(bad[0])} ({bad.size} of {idx.size} out of range) is not "
                           f"an entry of a {d_in}x{d_out} weight: flat indices row * d_out + col must be in "
                           f"[0, {n}); {fix}.")
    uniq, counts = np.unique(idx, return_counts=True)
    if (counts > 1).any():
        raise ReparamError(f"{method}: support indices repeat ({uniq[counts > 1][:5].tolist()}); each entry may be "
                           f"trained once: {fix}.")


def from_support(name: str, choose, scale: float = 1.0, **fields) -> Reparam:
    """A sparse transform from ``choose(key, w, calib) -> idx`` (unique flat indices); values start at 0.

    A support that is data rather than computed from ``w`` (a list, a file's indices) is checked with
    :func:`check_support` when the plan is made, before any training."""
    def init_fn(key, w, calib=None):
        with jax.ensure_compile_time_eval():    # a support given as data stays concrete under rp.plan's tracing
            idx = choose(key, w, calib)
        if not isinstance(idx, jax.core.Tracer):
            check_support(idx, w.shape, name)
        idx = jnp.sort(idx).astype(jnp.int32)
        return {"base": w, "idx": idx}, {"values": jnp.zeros(idx.shape, jnp.float32)}
    return additive(name, init_fn, structure=lambda f, t: Sparse(f["idx"], scale * t["values"], f["base"].shape[-1]),
                    **fields)


def sample(key, n: int, k: int):
    """``k`` distinct indices of ``range(n)`` at random: the top ``k`` of ``n`` uniform floats. One ``top_k``,
    much faster on CPU than ``jax.random.choice(replace=False)``'s shuffles. A float32 uniform has 2²³ values, so a tie at the cut (chance about ``n/2²³``) goes
    to the lower index: a bias of that order on one entry, none on the rest."""
    return jax.lax.top_k(jax.random.uniform(key, (n,)), k)[1]


def random(*, k: Optional[int] = None, density: Optional[float] = None, scale: float = 1.0) -> Reparam:
    """Random sparse support (SLTrain's S, PaCA): ``ΔW = s · S``, ``S`` nonzero on ``k`` uniformly random entries.

    The support is drawn once at init (without replacement) and fixed; the
    ``k`` values (init 0) are trained. SLTrain (Han et al. 2024) is
    ``rp.add(rp.lora(r), sparse.random(density=0.03))``.
    """
    def choose(key, w, calib):
        n = support_size(w.shape, "sparse.random", k=k, density=density)
        return sample(key, w.shape[-2] * w.shape[-1], n)
    return from_support(fmt_name("sparse.random", k=k, density=density, scale=scale if scale != 1.0 else None),
                        choose, scale)


def _top(score, n: int):
    """Flat indices of the ``n`` largest entries of ``score`` (ties: lower index first)."""
    return jax.lax.top_k(score.reshape(-1), n)[1]


def magnitude(k: Optional[int] = None, density: Optional[float] = None, *, largest: bool = False) -> Reparam:
    """Support = the ``k`` smallest ``|W0|`` entries (SaRA, Hu et al. 2025; 10-20% typical) or the largest.

    SaRA's observation: the smallest-magnitude weights of a pretrained model
    carry little of its behaviour, so they are free capacity to train.
    """
    method = fmt_name("sparse.magnitude", k=k, density=density, largest=largest)

    def choose(key, w, calib):
        n = support_size(w.shape, method, k=k, density=density)
        a = jnp.abs(w).astype(jnp.float32)
        return _top(a if largest else -a, n)
    return from_support(method, choose)


def _calib_array(calib, kind: str, w, method: str, fix: str):
    """``calib[kind]``, checked to have ``w``'s shape."""
    g = None if calib is None else calib.get(kind)
    if g is None:
        raise ReparamError(f"{method} needs calib['{kind}'] for this weight and got none; {fix}.")
    if tuple(g.shape) != tuple(w.shape):
        raise ReparamError(f"{method}: calib['{kind}'] has shape {tuple(g.shape)} but the weight has shape "
                           f"{tuple(w.shape)}; {fix} for this very parameter (its [d_in, d_out] matrix view).")
    return g


def _top_of_calib(method: str, kind: str, k, density, fix: str) -> Reparam:
    """Support = the ``k`` entries of largest ``|calib[kind]|`` (a weight-shaped statistic)."""
    def choose(key, w, calib):
        n = support_size(w.shape, method, k=k, density=density)
        return _top(jnp.abs(_calib_array(calib, kind, w, method, fix)).astype(jnp.float32), n)
    return from_support(method, choose, calib=kind)


def sensitivity(k: Optional[int] = None, density: Optional[float] = None) -> Reparam:
    """SPT's sparse part (He et al. 2023): support = the ``k`` largest ``|∂L/∂W|`` on calibration batches.

    Needs ``calib[path]["grad"]``, the mean full fine-tuning gradient from
    :func:`reparam.calibrate.capture_grads` over ``plan.calibrated()``.
    """
    return _top_of_calib(fmt_name("sparse.sensitivity", k=k, density=density), "grad", k, density,
                         "pass calib=rp.capture_grads(loss_fn, params, batches, paths=list(plan.calibrated())) "
                         "to plan.init")


def lt_sft(k: Optional[int] = None, density: Optional[float] = 0.01) -> Reparam:
    """LT-SFT (Ansell et al. 2022), phase 2: train only the top-``k`` ``|θ1 − θ0|`` entries, reset to ``θ0``.

    Phase 1 is full fine-tuning ``θ0 → θ1`` (``rp.full()``); ``calib=diffs(θ0,
    θ1, paths)`` hands its change to ``plan.init(key, θ0, calib=...)``, which
    keeps the ``k`` (default 1%) entries that moved most, with values reset to
    0 (``W = θ0``). The trained sparse diffs of several tasks or languages
    compose by addition (:func:`merge_adapters`). Per weight, where the paper
    ranks globally.
    """
    density = None if k is not None else density
    return _top_of_calib(fmt_name("sparse.lt_sft", k=k, density=density), "diff", k, density,
                         "pass calib=sparse.diffs(params0, params1, list(plan.calibrated())) to plan.init")


def diffs(params0, params1, paths: Sequence[str]) -> dict:
    """``{path: {"diff": θ1 − θ0}}`` (float32) for :func:`lt_sft`; ``params1`` = ``params0`` after full FT."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    f0 = {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(params0)[0]}
    f1 = {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(params1)[0]}
    missing = [p for p in paths if p not in f0 or p not in f1]
    if missing:
        raise ReparamError(f"diffs: {missing[:5]} are not parameter paths of both params0 and params1; paths "
                           f"look like {list(f0)[:3]} (use list(plan.calibrated())).")
    bad = [(p, np.shape(f0[p]), np.shape(f1[p])) for p in paths if np.shape(f0[p]) != np.shape(f1[p])]
    if bad:
        raise ReparamError(f"diffs: params0 and params1 differ in shape at {bad[:3]}; params1 must be params0 "
                           "after full fine-tuning (e.g. plan_full.merge(frozen, trained)).")
    return {p: {"diff": jnp.asarray(f1[p], jnp.float32) - jnp.asarray(f0[p], jnp.float32)} for p in paths}


def structured(rows: Optional[Sequence[int]] = None, cols: Optional[Sequence[int]] = None, *,
               axis: str = "out", k: Optional[int] = None, density: Optional[float] = None,
               group: int = 1, select: str = "random") -> Reparam:
    """S²FT (Yang et al. 2024): whole rows or columns of ``W`` trained as one dense block.

    ``axis="in"`` trains rows (input channels): ``ΔW[rows] = V``, ``V [n, d_out]``;
    ``axis="out"`` trains columns (output channels): ``ΔW[:, cols] = V``, ``V [d_in, n]``;
    ``V`` starts at 0 and the rest of ``ΔW`` is 0, so optimizer state is the block.
    Units are channels, or heads with ``group=head_dim`` (contiguous groups of
    ``group`` channels, e.g. the columns of one head of a q/k/v kernel or the rows of
    one head of the out projection). Give the units explicitly (``rows=`` or
    ``cols=``, unit indices) or their number (``k``) or fraction (``density``) and
    ``select``: ``"random"`` (the paper's default) or ``"norm"`` (largest ``‖W0‖``).
    """
    if rows is not None and cols is not None:
        raise ReparamError("sparse.structured: give rows= or cols=, not both; use two rules (or rp.add) "
                           "to train both.")
    fixed = rows if rows is not None else cols
    axis = "in" if rows is not None else "out" if cols is not None else axis
    if axis not in ("in", "out"):
        raise ReparamError(f"sparse.structured: axis must be 'in' (rows) or 'out' (columns), got {axis!r}.")
    if select not in ("random", "norm"):
        raise ReparamError(f"sparse.structured: select must be 'random' or 'norm', got {select!r}.")
    if not isinstance(group, int) or group < 1:
        raise ReparamError(f"sparse.structured: group must be a positive int (head_dim), got {group!r}.")
    if fixed is not None:
        if k is not None or density is not None:
            raise ReparamError("sparse.structured: explicit rows/cols fix the support; drop k and density.")
        fixed = np.asarray(fixed, np.int64).reshape(-1)
        if fixed.size == 0 or len(np.unique(fixed)) != fixed.size:
            raise ReparamError(f"sparse.structured: rows/cols must be distinct unit indices, got {fixed.tolist()}.")
    ax = 0 if axis == "in" else 1
    key_name = "rows" if ax == 0 else "cols"
    method = fmt_name("sparse.structured", axis=axis if fixed is None else None, k=k, density=density,
                      group=group if group > 1 else None,
                      select=select if fixed is None and select != "random" else None,
                      **({key_name: fixed.tolist()} if fixed is not None else {}))

    def init_fn(key, w, calib=None):
        d = w.shape[-2:][ax]
        if d % group:
            raise ReparamError(f"{method}: group={group} does not divide d_{axis}={d}; use a head_dim that "
                               "divides it.")
        n_units = d // group
        what = f"{'rows' if ax == 0 else 'columns'} (units of {group}) of a {w.shape[-2]}x{w.shape[-1]} weight"
        if fixed is not None:
            if fixed.min() < 0 or fixed.max() >= n_units:
                raise ReparamError(f"{method}: unit indices must be in [0, {n_units}) for the {n_units} {what}.")
            units = jnp.asarray(fixed, jnp.int32)
        else:
            n = _count(n_units, what, method, k, density)
            if select == "random":
                units = sample(key, n_units, n)
            else:
                norms = jnp.sum(jnp.square(w.astype(jnp.float32)), axis=1 - ax).reshape(n_units, group).sum(1)
                units = _top(norms, n)
        idx = jnp.sort((units[:, None] * group + jnp.arange(group)).reshape(-1)).astype(jnp.int32)
        block = (idx.shape[0], w.shape[-1]) if ax == 0 else (w.shape[-2], idx.shape[0])
        return {"base": w, key_name: idx}, {"values": jnp.zeros(block, jnp.float32)}

    def delta(frozen, trainable):
        v = trainable["values"]
        z = jnp.zeros(frozen["base"].shape[-2:], v.dtype)
        at = z.at[frozen["rows"]] if ax == 0 else z.at[:, frozen["cols"]]
        return at.set(v, indices_are_sorted=True, unique_indices=True)

    def structure(frozen, trainable):
        # a block of rows / columns is low rank with a one-hot factor: ΔW = Pᵀ V (rows) or V P (columns),
        # P [n, d] one-hot; the hot path then trains V by rank-n products and never forms xᵀg
        v = trainable["values"]
        one_hot = jax.nn.one_hot(frozen[key_name], frozen["base"].shape[-2:][ax], dtype=v.dtype)
        return LowRank(one_hot.T, v, frozen="l") if ax == 0 else LowRank(v, one_hot, frozen="r")
    return additive(method, init_fn, delta, structure=structure)
