"""Low-rank family: LoRA (and rsLoRA), DoRA, LoRA-XS / LoRA-SB, DyLoRA.

Kernels are ``[d_in, d_out]`` and ``y = x @ W``; PEFT stores ``[out, in]``, so
PEFT's ``lora_A.weight`` is our ``A.T`` and ``lora_B.weight`` our ``B.T``.
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from reparam.core import Reparam, ReparamError, additive, check_hparams, check_rank, fmt_name
from reparam.linalg import truncated_svd
from reparam.structure import LowRank, Scaled


def lora_scale(rank: int, alpha: Optional[float], rslora: bool = False, method: str = "lora") -> float:
    """``s = α/r`` (LoRA) or ``α/√r`` (rsLoRA, Kalajdzievski 2023); ``α = r`` when ``alpha`` is None.
    Checks ``rank`` and ``alpha`` first (an error names ``method``)."""
    check_hparams(method, {"r": rank, "rslora": rslora, **({} if alpha is None else {"alpha": alpha})})
    alpha = rank if alpha is None else alpha
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def lowrank_delta(frozen, trainable, scale: float = 1.0):
    """``ΔW = s · A @ B``."""
    return scale * (trainable["A"] @ trainable["B"])


def lowrank_structure(scale: float = 1.0):
    """``(frozen, trainable) -> LowRank(s·A, B)``: the factored form of ``ΔW = s · A @ B``."""
    return lambda frozen, trainable: LowRank(scale * trainable["A"], trainable["B"])


def init_a(key, d_in: int, rank: int, how: str, dtype=jnp.float32):
    """LoRA's ``A [d_in, r]``: ``"peft"`` = kaiming-uniform(a=√5) = U(±1/√d_in), as torch/PEFT;
    ``"gaussian"`` = N(0, 1/r²) as PEFT's ``init_lora_weights="gaussian"``."""
    if how == "peft":
        bound = 1.0 / math.sqrt(d_in)
        return jax.random.uniform(key, (d_in, rank), dtype, -bound, bound)
    if how == "gaussian":
        return jax.random.normal(key, (d_in, rank), dtype) / rank
    raise ReparamError(f"unknown LoRA init {how!r}; use 'peft' (kaiming-uniform) or 'gaussian'.")


def _lora_init(rank: int, init: str, method: str):
    def f(key, w, calib=None):
        check_rank(rank, w.shape, method)
        d_in, d_out = w.shape
        return {"base": w}, {"A": init_a(key, d_in, rank, init), "B": jnp.zeros((rank, d_out), jnp.float32)}
    return f


def lora(rank: int, alpha: Optional[float] = None, *, rslora: bool = False, init: str = "peft") -> Reparam:
    """LoRA (Hu et al. 2021): ``W = W0 + s · A @ B``, ``s = α/r`` (``rslora``: ``α/√r``).

    Trains ``A [d_in, r]`` (random, see :func:`init_a`) and ``B [r, d_out]`` (zero):
    ``r·(d_in + d_out)`` parameters; ``α`` defaults to ``r`` (``s = 1``).
    """
    s = lora_scale(rank, alpha, rslora, "rslora" if rslora else "lora")
    return additive(fmt_name("rslora" if rslora else "lora", r=rank, alpha=alpha),
                    _lora_init(rank, init, "lora"), structure=lowrank_structure(s))


def col_norm(v):
    """``‖V‖`` per output column of a ``[d_in, d_out]`` kernel (PEFT: per row of ``[out, in]``)."""
    return jnp.sqrt(jnp.sum(jnp.square(v.astype(jnp.float32)), axis=0))


def dora(rank: int, alpha: Optional[float] = None, *, rslora: bool = False, init: str = "peft",
         detach_norm: bool = True) -> Reparam:
    """DoRA (Liu et al. 2024): ``W = m ⊙ V / ‖V‖_col`` with ``V = W0 + s · A @ B``.

    Trains the magnitude ``m [d_out]`` (init ``‖W0‖_col``) and LoRA's ``A``, ``B``.
    ``detach_norm`` treats ``‖V‖`` as a constant in the backward pass (paper
    §4.3; what PEFT does). Structure: ``Scaled(LowRank(s·A, B), m / ‖V‖)``, so the
    train step never forms the full ``xᵀg`` (only ``‖V‖`` needs ``V``: ``d_in·d_out·r``).
    """
    s = lora_scale(rank, alpha, rslora, "dora")
    lora_init = _lora_init(rank, init, "dora")

    def init_fn(key, w, calib=None):
        f, t = lora_init(key, w)
        return f, {**t, "m": col_norm(w)}

    def scale(frozen, trainable):
        n = col_norm(frozen["base"] + lowrank_delta(frozen, trainable, s))
        return trainable["m"] / (jax.lax.stop_gradient(n) if detach_norm else n)

    def apply(frozen, trainable):
        base = frozen["base"]
        return ((base + lowrank_delta(frozen, trainable, s)) * scale(frozen, trainable)).astype(base.dtype)

    def structure(frozen, trainable):
        return Scaled(lowrank_structure(s)(frozen, trainable), scale(frozen, trainable))

    return Reparam(init_fn, apply, fmt_name("dora", r=rank, alpha=alpha, rslora=rslora), structure=structure)


def lora_xs(rank: int, *, basis: str = "weight", lr: float = 1e-3) -> Reparam:
    """LoRA-XS / LoRA-SB: ``W = W_base + U_r R V_rᵀ``, only the core ``R [r, r]`` trained (r² params).

    ``basis="weight"`` (LoRA-XS, Bałazy et al. 2024): ``U_r Σ_r``, ``V_rᵀ`` from the
    truncated SVD of ``W0``, ``R = 0``, ``W_base = W0``.
    ``basis="gradient"`` (LoRA-SB, Ponkshe et al. 2024): from the SVD of the
    first full fine-tuning update ``-lr · ∇W = U Σ Vᵀ``: bases ``U_r``, ``V_rᵀ``
    and ``R = Σ_r``, so the first step approximates full fine-tuning; the base
    becomes ``W0 - U_r R V_rᵀ`` so the model starts unchanged. Needs
    ``calib[path]["grad"]`` from :func:`reparam.calibrate.capture_grads`.
    """
    if basis not in ("weight", "gradient"):
        raise ReparamError(f"lora_xs basis must be 'weight' or 'gradient', got {basis!r}.")
    method = "lora_xs" if basis == "weight" else "lora_sb"

    def init_fn(key, w, calib=None):
        check_rank(rank, w.shape, method)
        if basis == "weight":
            u, s, vt = truncated_svd(w, rank)
            return {"base": w, "U": u * s, "Vt": vt}, {"R": jnp.zeros((rank, rank), jnp.float32)}
        g = calib["grad"] if calib is not None and "grad" in calib else None
        if g is None or g.shape != w.shape:
            raise ReparamError(f"lora_sb needs calib['grad'] of the weight's shape {w.shape}, got "
                               f"{None if g is None else g.shape}; use rp.capture_grads(...).")
        u, s, vt = truncated_svd(-lr * g, rank)
        r0 = jnp.diag(s)
        base = (w - (u @ r0 @ vt).astype(w.dtype)).astype(w.dtype)
        return {"base": base, "U": u, "Vt": vt}, {"R": r0}

    def structure(frozen, trainable):
        return LowRank(frozen["U"] @ trainable["R"], frozen["Vt"], frozen="r")

    return additive(fmt_name(method, r=rank), init_fn, structure=structure,
                    calib="grad" if basis == "gradient" else None)


def dylora(rank: int, alpha: Optional[float] = None, *, init: str = "peft",
           eval_rank: Optional[int] = None) -> Reparam:
    """DyLoRA (Valipour et al. 2023): LoRA trained on a random prefix rank ``b ~ U{1..r}`` each step.

    ``ΔW = (α/b) · A[:, :b] @ B[:b]`` -- one run serves every rank ``<= r``.
    Stochastic: ``plan.apply(..., rng=key)`` samples ``b`` in training; with
    ``rng=None`` (eval, merge) it uses ``eval_rank`` (default ``r``).
    """
    check_hparams("dylora", {"r": rank, **({} if alpha is None else {"alpha": alpha})})
    alpha = rank if alpha is None else alpha
    eval_rank = rank if eval_rank is None else eval_rank
    if not 1 <= eval_rank <= rank:
        raise ReparamError(f"dylora: eval_rank must be in [1, {rank}], got {eval_rank}.")

    def structure(frozen, trainable, rng=None):
        b = eval_rank if rng is None else jax.random.randint(rng, (), 1, rank + 1)
        mask = (jnp.arange(rank) < b).astype(trainable["A"].dtype)
        return LowRank((alpha / b) * (trainable["A"] * mask), trainable["B"])

    return additive(fmt_name("dylora", r=rank, alpha=alpha), _lora_init(rank, init, "dylora"), structure=structure,
                    stochastic=True)
