"""SVD-principal family: PiSSA, MiLoRA, SVFit, SORSA, CorDA, EVA.

All start from a truncated SVD ``W0 ≈ U_r S_r V_rᵀ`` (of ``W0`` itself, or
oriented by the input covariance ``C`` for CorDA/EVA), put the chosen
components in trainable form, and freeze the residual ``W_res = W0 - U_r S_r V_rᵀ``
so that a fresh adapter reproduces ``W0`` to float rounding.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from reparam.core import Reparam, ReparamError, additive, check_finite, check_hparams, check_rank, fmt_name
from reparam.linalg import truncated_svd
from reparam.lowrank import lora_scale, lowrank_structure
from reparam.structure import LowRank


def residual(w, part):
    """``W0 - part``, computed in f32 and returned in ``W0``'s dtype: the frozen base of a principal init."""
    return (w.astype(jnp.float32) - part).astype(w.dtype)


def split_factors(u, s, vt, scale: float):
    """Split ``U diag(S) Vᵀ = scale · A @ B`` evenly: ``A = U √(S/scale)``, ``B = √(S/scale) Vᵀ``."""
    root = jnp.sqrt(s / scale)
    return u * root, root[:, None] * vt


def _principal(rank, *, smallest=False, niter=None, oversample=8, alpha=None, method="pissa"):
    """Init of ``W_res + s·A@B`` from the top (or bottom) ``rank`` components of ``W0``."""
    s = lora_scale(rank, alpha, method=method)

    def init_fn(key, w, calib=None):
        check_rank(rank, w.shape, method)
        base, a, b = _principal_parts(key, w, rank=rank, smallest=smallest, niter=niter, oversample=oversample,
                                      scale=s)
        return {"base": base}, {"A": a, "B": b}
    return init_fn, lowrank_structure(s)


@functools.partial(jax.jit, static_argnames=("rank", "smallest", "niter", "oversample", "scale"))
def _principal_parts(key, w, *, rank, smallest, niter, oversample, scale):
    """``(W_res, A, B)`` of a principal init as one compiled program per weight shape (a module-level jit,
    so every plan shares it): eagerly, the range finder's dozen ops compiled one by one for each shape."""
    u, sv, vt = truncated_svd(w, rank, smallest=smallest, niter=niter, oversample=oversample, key=key)
    a, b = split_factors(u, sv, vt, scale)
    return residual(w, scale * (a @ b)), a, b


def pissa(rank: int, alpha: Optional[float] = None, *, niter: Optional[int] = None,
          oversample: int = 8) -> Reparam:
    """PiSSA (Meng et al. 2024): ``W = W_res + s · A @ B`` from the principal components of ``W0``.

    ``W0 = U S Vᵀ``; ``A = U_r √(S_r/s)``, ``B = √(S_r/s) V_rᵀ`` trained;
    ``W_res = W0 - s·A@B`` frozen (``s = α/r``, 1 by default). ``niter=None``: exact
    SVD (PEFT ``init_lora_weights="pissa"``); ``niter=q``: randomized SVD with
    ``q`` subspace iterations (PEFT ``"pissa_niter_q"``), seconds instead of minutes.
    """
    init_fn, delta = _principal(rank, niter=niter, oversample=oversample, alpha=alpha)
    return additive(fmt_name("pissa", r=rank, alpha=alpha, niter=niter), init_fn, structure=delta)


def milora(rank: int, alpha: Optional[float] = None) -> Reparam:
    """MiLoRA (Wang et al. 2024): PiSSA on the ``rank`` SMALLEST singular components (exact SVD)."""
    init_fn, delta = _principal(rank, smallest=True, alpha=alpha, method="milora")
    return additive(fmt_name("milora", r=rank, alpha=alpha), init_fn, structure=delta)


def svfit(rank: int, *, niter: Optional[int] = None) -> Reparam:
    """SVFit (Sun et al. 2024): ``W = W_res + U_r diag(σ_r + δ) V_rᵀ``; only ``δ [r]`` trained (init 0)."""
    def init_fn(key, w, calib=None):
        check_rank(rank, w.shape, "svfit")
        u, s, vt = truncated_svd(w, rank, niter=niter, key=key)
        return {"base": residual(w, (u * s) @ vt), "U": u, "S": s, "Vt": vt}, {"delta": jnp.zeros_like(s)}

    def structure(frozen, trainable):
        return LowRank(frozen["U"] * (frozen["S"] + trainable["delta"]), frozen["Vt"], frozen="r")
    return additive(fmt_name("svfit", r=rank, niter=niter), init_fn, structure=structure)


def sorsa(rank: int, *, gamma: float = 4e-4, niter: Optional[int] = None) -> Reparam:
    """SORSA (Cao 2024): ``W = W_res + U_p diag(S_p) V_pᵀ`` with ``U_p``, ``S_p``, ``V_pᵀ`` trained.

    Initialised from the principal ``rank`` components; ``plan.penalty`` adds
    the orthonormality regulariser ``γ (‖U_pᵀU_p − I‖_F² + ‖V_pᵀV_p − I‖_F²)``.
    """
    def init_fn(key, w, calib=None):
        check_rank(rank, w.shape, "sorsa")
        u, s, vt = truncated_svd(w, rank, niter=niter, key=key)
        return {"base": residual(w, (u * s) @ vt)}, {"U": u, "S": s, "Vt": vt}

    def structure(frozen, trainable):
        return LowRank(trainable["U"] * trainable["S"], trainable["Vt"])

    def penalty(frozen, trainable):
        u, vt = trainable["U"], trainable["Vt"]
        eye = jnp.eye(u.shape[-1], dtype=u.dtype)
        return gamma * (jnp.sum(jnp.square(u.T @ u - eye)) + jnp.sum(jnp.square(vt @ vt.T - eye)))
    return additive(fmt_name("sorsa", r=rank, gamma=gamma), init_fn, structure=structure, penalty=penalty)


def _covariance(calib, w, method):
    """The ``[d_in, d_in]`` input second moment from ``calib["cov"]``, checked against ``w``."""
    c = None if calib is None else calib.get("cov")
    if c is None or c.shape != (w.shape[0], w.shape[0]):
        raise ReparamError(f"{method} needs calib['cov'] of shape {(w.shape[0],) * 2} (the layer input's "
                           f"second moment) and got {None if c is None else tuple(c.shape)}: the calibration "
                           "batches do not match this layer; build calib with rp.capture_inputs(...) on "
                           "the same model and params.")
    return c.astype(jnp.float32)


def corda(rank: int, alpha: Optional[float] = None, *, mode: str = "ipm", damp: float = 1e-5) -> Reparam:
    """CorDA (Yang et al. 2024): context-oriented SVD ``C W0 = U S Vᵀ`` (``C`` = input covariance).

    ``W0 = C⁻¹ U S Vᵀ``; the adapter takes ``A = C⁻¹ U_r √(S_r/s)``, ``B = √(S_r/s) V_rᵀ``
    and ``W_res = W0 − s·A@B`` is frozen. ``mode="ipm"`` (instruction-previewed)
    adapts the LARGEST ``r`` components, ``"kpm"`` (knowledge-preserved) the
    SMALLEST. ``C`` is damped by ``damp · mean(diag C)`` before inversion.
    Needs ``calib[path]["cov"]`` from :func:`reparam.calibrate.capture_inputs`.
    """
    if mode not in ("ipm", "kpm"):
        raise ReparamError(f"corda mode must be 'ipm' or 'kpm', got {mode!r}.")
    s = lora_scale(rank, alpha, method="corda")

    def init_fn(key, w, calib=None):
        check_rank(rank, w.shape, "corda")
        c = _covariance(calib, w, "corda")
        c = c + damp * jnp.mean(jnp.diag(c)) * jnp.eye(c.shape[0], dtype=c.dtype)
        u, sv, vt = truncated_svd(c @ w.astype(jnp.float32), rank, smallest=(mode == "kpm"))
        a, b = split_factors(jnp.linalg.solve(c, u), sv, vt, s)
        return {"base": residual(w, s * (a @ b))}, {"A": a, "B": b}
    return additive(fmt_name("corda", r=rank, alpha=alpha, mode=mode), init_fn,
                    structure=lowrank_structure(s), calib="cov")


def eva(rank: int, alpha: Optional[float] = None) -> Reparam:
    """EVA (Paischer et al. 2024): LoRA with ``A`` = the top right-singular vectors of the layer input.

    ``A [d_in, r_l]`` = top eigenvectors of ``C = XᵀX/N``, ``B = 0`` -- a fresh
    adapter is exactly ``W0``. ``r_l = calib["rank"]`` when :func:`eva_allocate`
    redistributed ranks across layers by explained variance, else ``rank``; the
    scale is ``α / rank`` for every layer.
    """
    s = lora_scale(rank, alpha, method="eva")

    def init_fn(key, w, calib=None):
        c = _covariance(calib, w, "eva")
        r = int(calib.get("rank", rank))
        check_rank(r, w.shape, "eva")
        _, vecs = jnp.linalg.eigh(c)
        return {"base": w}, {"A": vecs[:, ::-1][:, :r], "B": jnp.zeros((r, w.shape[1]), jnp.float32)}
    return additive(fmt_name("eva", r=rank, alpha=alpha), init_fn, structure=lowrank_structure(s),
                    calib="cov")


def eva_allocate(calib: dict, rank: int, rho: float = 2.0) -> dict:
    """EVA's rank redistribution: a budget of ``rank`` per layer goes to the largest explained-variance ratios.

    Each layer offers its top ``⌊ρ·rank⌋`` components with ratio ``λ_i / Σλ``; the
    ``rank · n_layers`` largest ratios over all layers are kept and each layer's
    rank is how many of its own were kept (at least 1). Returns ``calib`` with a
    ``"rank"`` entry per path.
    """
    check_hparams("eva_allocate", {"rank": rank, "rho": rho})
    cap = max(1, int(rho * rank))
    ratios = []
    for path, c in calib.items():
        check_finite(c["cov"], f"eva_allocate: calib['{path}']['cov']", "recompute it from finite batches "
                     "with rp.capture_inputs.")
        lam = np.clip(np.linalg.eigvalsh(np.asarray(c["cov"], np.float64))[::-1], 0, None)
        ratios += [(float(v), path) for v in (lam / max(lam.sum(), 1e-30))[:cap]]
    ratios.sort(key=lambda t: -t[0])
    ranks = {path: 0 for path in calib}
    for _, path in ratios[:rank * len(calib)]:
        ranks[path] += 1
    return {path: {**c, "rank": max(1, ranks[path])} for path, c in calib.items()}
