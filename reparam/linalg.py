"""Truncated SVD, exact or randomized (Halko, Martinsson & Tropp 2011), shared by the SVD-based inits."""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp


@functools.partial(jax.jit, static_argnames=("rank", "smallest", "niter", "oversample"))
def truncated_svd(w: jax.Array, rank: int, *, smallest: bool = False, niter: Optional[int] = None,
                  oversample: int = 8, key: Optional[jax.Array] = None):
    """``(U_r [m, r], S_r [r], Vt_r [r, n])`` of the ``rank`` largest (or smallest) singular triplets.

    ``niter=None`` uses the exact SVD. ``niter=q`` uses a randomized range
    finder with ``q`` subspace (power) iterations and ``oversample`` extra
    columns: ``Y = (W Wᵀ)^q W Ω``, ``Q = qr(Y)``, then the exact SVD of the small
    ``Qᵀ W``; cost ``O(m·n·(r+p)·(2q+2))`` instead of ``O(m·n·min(m, n))``.
    Computed in float32 whatever ``w``'s dtype; singular values descend. Compiled once per shape and
    settings (the range finder's dozen ops, eagerly, each compile apart).
    """
    w = w.astype(jnp.promote_types(w.dtype, jnp.float32))
    if niter is None:
        u, s, vt = jnp.linalg.svd(w, full_matrices=False)
        if smallest:
            return u[:, -rank:], s[-rank:], vt[-rank:]
        return u[:, :rank], s[:rank], vt[:rank]
    if smallest:
        raise ValueError("the randomized SVD finds the largest components only; use niter=None.")
    m, n = w.shape
    k = min(rank + oversample, m, n)
    key = jax.random.key(0) if key is None else key
    q, _ = jnp.linalg.qr(w @ jax.random.normal(key, (n, k), w.dtype))
    for _ in range(niter):
        z, _ = jnp.linalg.qr(w.T @ q)
        q, _ = jnp.linalg.qr(w @ z)
    ub, s, vt = jnp.linalg.svd(q.T @ w, full_matrices=False)
    return (q @ ub)[:, :rank], s[:rank], vt[:rank]
