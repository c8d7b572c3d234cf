"""Sparse-mask family: trainable values at a fixed support, ``W = W0 + scatter(idx, values)``.

The support is a set of ``k`` flat indices into the ``[d_in, d_out]`` weight,
held in ``frozen["idx"]`` (int32, sorted); the trainable state is the ``k``
values, so optimizer state is the size of the support, not of ``W``.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from reparam.core import Reparam, ReparamError, additive, fmt_name


def support_size(shape: tuple[int, ...], method: str, *, k: Optional[int] = None,
                 density: Optional[float] = None) -> int:
    """The number of support entries ``k`` from either ``k`` or ``density`` of a ``d_in x d_out`` weight."""
    n = shape[-2] * shape[-1]
    if (k is None) == (density is None):
        raise ReparamError(f"{method}: give exactly one of k (number of entries) or density (fraction), "
                           f"got k={k}, density={density}.")
    if density is not None:
        if not 0.0 < density <= 1.0:
            raise ReparamError(f"{method}: density must be in (0, 1], got {density}; e.g. density=0.01 "
                               "trains 1% of the entries.")
        return max(1, int(round(density * n)))
    if not isinstance(k, int) or k < 1:
        raise ReparamError(f"{method}: k must be a positive int, got {k!r}.")
    if k > n:
        raise ReparamError(f"{method}: k={k} coefficients exceed the {n} entries of a {shape[-2]}x{shape[-1]} "
                           f"weight; use k <= {n} or a density.")
    return k


def scatter(frozen, trainable, scale: float = 1.0):
    """``ΔW = s · scatter(idx, values)`` into a zero ``[d_in, d_out]`` matrix of ``frozen["base"]``'s shape."""
    shape = frozen["base"].shape[-2:]
    v = trainable["values"]
    flat = jnp.zeros(shape[0] * shape[1], v.dtype).at[frozen["idx"]].set(v, indices_are_sorted=True,
                                                                       unique_indices=True)
    return scale * flat.reshape(shape)


def from_support(name: str, choose, scale: float = 1.0, **fields) -> Reparam:
    """A sparse transform from ``choose(key, w, calib) -> idx`` (sorted unique flat indices); values start at 0."""
    def init_fn(key, w, calib=None):
        idx = jnp.sort(choose(key, w, calib)).astype(jnp.int32)
        return {"base": w, "idx": idx}, {"values": jnp.zeros(idx.shape, jnp.float32)}
    return additive(name, init_fn, lambda f, t: scatter(f, t, scale), **fields)


def random(*, k: Optional[int] = None, density: Optional[float] = None, scale: float = 1.0) -> Reparam:
    """Random sparse support (SLTrain's S, PaCA): ``ΔW = s · S``, ``S`` nonzero on ``k`` uniformly random entries.

    The support is drawn once at init (without replacement) and fixed; the
    ``k`` values (init 0) are trained.
    """
    def choose(key, w, calib):
        n = support_size(w.shape, "sparse.random", k=k, density=density)
        return jax.random.choice(key, w.shape[-2] * w.shape[-1], (n,), replace=False)
    return from_support(fmt_name("sparse.random", k=k, density=density, scale=scale if scale != 1.0 else None),
                        choose, scale)
