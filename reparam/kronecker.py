"""Kronecker family: KronA, LoKr, Compacter (PHM), SoKA; the vec-trick product ``x @ (A ⊗ B)``.

A kernel ``[d_in, d_out]`` is a Kronecker product of ``A [a1, a2]`` and ``B [b1, b2]``
when ``d_in = a1·b1`` and ``d_out = a2·b2``: ``(A ⊗ B)[i·b1 + k, j·b2 + l] = A[i, j] · B[k, l]``.
PEFT stores ``[out, in]``; as ``(A ⊗ B)ᵀ = Aᵀ ⊗ Bᵀ``, transposing each factor maps
between the two layouts (PEFT's ``lokr_w1`` is our ``A.T``, ``lokr_w2`` our ``B.T``).
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from reparam.core import Reparam, ReparamError, additive, check_rank, fmt_name
from reparam.linalg import truncated_svd
from reparam.lowrank import init_a, lora_scale
from reparam.structure import Kron, matvec
from reparam.svd import split_factors, residual


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """PEFT/LyCORIS LoKr's split of ``dim`` into two factors ``(m, n)`` with ``m·n = dim``.

    ``factor > 0`` dividing ``dim``: ``(factor, dim // factor)`` as given (not sorted).
    Otherwise ``m`` is the largest divisor of ``dim`` that is at most ``factor`` (no
    bound for ``factor=-1``) and at most ``c``, the smallest divisor with ``c² >= dim``;
    the pair is returned ascending. So ``factor=-1`` gives the divisor pair nearest
    ``√dim`` (256 -> (16, 16), 128 -> (8, 16), 127 -> (1, 127)) and ``factor=4``
    gives 128 -> (4, 32).
    """
    if not isinstance(dim, int) or dim < 1:
        raise ReparamError(f"factorization: dim must be a positive int, got {dim!r}.")
    if not isinstance(factor, int) or not (factor == -1 or factor > 0):
        raise ReparamError(f"factorization: factor must be -1 (near √dim) or a positive int, got {factor!r}.")
    if factor > 0 and dim % factor == 0:
        return factor, dim // factor
    divs = _divisors(dim)
    c = next(d for d in divs if d * d >= dim)
    m = max(d for d in divs if d <= c and (factor == -1 or d <= factor))
    return min(m, dim // m), max(m, dim // m)


def _factor_shapes(shape, a_shape, factor: int, method: str):
    """``((a1, a2), (b1, b2))`` for a ``[d_in, d_out]`` weight, from ``a_shape`` or :func:`factorization`."""
    d_in, d_out = shape[-2:]
    if a_shape is None:
        (a1, b1), (a2, b2) = factorization(d_in, factor), factorization(d_out, factor)
        return (a1, a2), (b1, b2)
    a1, a2 = a_shape
    if d_in % a1 or d_out % a2:
        raise ReparamError(
            f"{method}: factor A of shape {tuple(a_shape)} does not divide the {d_in}x{d_out} weight "
            f"(need a1 | d_in = {d_in} and a2 | d_out = {d_out}); choose a1 from {_divisors(d_in)} and "
            f"a2 from {_divisors(d_out)}, or leave a_shape=None to use factorization().")
    return (a1, a2), (d_in // a1, d_out // a2)


def kron_sum(a, b):
    """``Σ_k a[k] ⊗ b[k]`` for ``a [K, a1, a2]``, ``b [K, b1, b2]``: a ``[a1·b1, a2·b2]`` matrix."""
    _, a1, a2 = a.shape
    _, b1, b2 = b.shape
    return jnp.einsum("kij,kpq->ipjq", a, b).reshape(a1 * b1, a2 * b2)


def rearrange(w, a_shape):
    """Van Loan–Pitsianis ``R(W) [a1·a2, b1·b2]``, with ``R(A ⊗ B) = vec(A) vec(B)ᵀ`` (row-major vec)."""
    (a1, a2), (b1, b2) = _factor_shapes(w.shape, a_shape, -1, "rearrange")
    return w.reshape(a1, b1, a2, b2).transpose(0, 2, 1, 3).reshape(a1 * a2, b1 * b2)


def kron_svd(w, a_shape, rank: int, *, niter: Optional[int] = None, key=None):
    """Kronecker SVD (Van Loan & Pitsianis 1993): ``W ≈ Σ_{k<rank} A_k ⊗ B_k`` from the SVD of ``R(W)``.

    Returns ``(A [rank, a1, a2], B [rank, b1, b2], σ [rank])`` with ``√σ_k`` in each
    factor; exact at the full Kronecker rank ``min(a1·a2, b1·b2)``. ``niter``: a
    randomized SVD (see :func:`reparam.linalg.truncated_svd`).
    """
    (a1, a2), (b1, b2) = _factor_shapes(w.shape, a_shape, -1, "kron_svd")
    u, s, vt = truncated_svd(rearrange(w, a_shape), rank, niter=niter, key=key)
    fa, fb = split_factors(u, s, vt, 1.0)
    return fa.T.reshape(-1, a1, a2), fb.reshape(-1, b1, b2), s


def energy_rank(s, total: float, energy: float, cap: int) -> int:
    """The fewest leading terms whose ``Σ σ_k²`` reaches ``energy · total`` (at most ``cap``)."""
    cum = np.cumsum(np.square(np.asarray(s, np.float64)))
    hit = np.nonzero(cum >= energy * total * (1 - 1e-6))[0]
    return int(min(cap, hit[0] + 1 if hit.size else cap))


def kron_matmul(x, a, b):
    """``x @ (A ⊗ B)`` for ``x [..., a1·b1]`` without forming ``A ⊗ B`` (the vec trick).

    ``x`` is viewed as ``[..., a1, b1]`` and contracted with ``A`` and ``B`` in
    turn, in the cheaper order (:func:`reparam.structure.matvec` of a
    :class:`~reparam.structure.Kron`, which the train step's hot path uses).
    """
    (a1, a2), (b1, b2) = a.shape, b.shape
    if x.shape[-1] != a1 * b1:
        raise ReparamError(f"kron_matmul: x has {x.shape[-1]} features, A ⊗ B expects a1·b1 = {a1 * b1}.")
    y = matvec(Kron(a[None], b[None]), x.reshape(-1, a1 * b1))
    return y.reshape(x.shape[:-1] + (a2 * b2,))


def kron_flops(tokens: int, a_shape, b_shape) -> tuple[int, int]:
    """Multiply-adds of ``x @ (A ⊗ B)`` for ``tokens`` rows: ``(vec trick, materialised)``.

    Vec trick: ``tokens · min(a1·b1·b2 + a1·a2·b2, a1·b1·a2 + a2·b1·b2)``;
    materialised: ``d_in·d_out`` to form ``A ⊗ B`` plus ``tokens · d_in·d_out``.
    """
    (a1, a2), (b1, b2) = a_shape, b_shape
    trick = tokens * min(a1 * b1 * b2 + a1 * a2 * b2, a1 * b1 * a2 + a2 * b1 * b2)
    n = a1 * a2 * b1 * b2
    return trick, n + tokens * n


def kron_matmul_cheaper(tokens: int, a_shape, b_shape) -> bool:
    """Whether :func:`kron_matmul` costs fewer FLOPs than forming ``A ⊗ B`` and multiplying."""
    trick, dense = kron_flops(tokens, a_shape, b_shape)
    return trick < dense


def krona(a_shape=None, scale: float = 1.0, *, factor: int = -1, zero: str = "B") -> Reparam:
    """KronA (Edalati et al. 2022): ``W = W0 + s · (A ⊗ B)``, ``A [a1, a2]``, ``B [b1, b2]`` trained.

    ``a1·b1 = d_in``, ``a2·b2 = d_out``; ``a_shape=(a1, a2)`` or, by default,
    :func:`factorization` of ``d_in`` and ``d_out`` (``factor``), the smaller factor
    in ``A``. Trains ``a1·a2 + b1·b2`` parameters. Init: as LoRA, one factor zero
    (``zero="B"``, default, or ``"A"``), the other kaiming-uniform ``U(±1/√rows)``.
    """
    if zero not in ("A", "B"):
        raise ReparamError(f"krona: zero must be 'A' or 'B' (the factor that starts at 0), got {zero!r}.")

    def init_fn(key, w, calib=None):
        sa, sb = _factor_shapes(w.shape, a_shape, factor, "krona")
        rand, zeros = (sa, sb) if zero == "B" else (sb, sa)
        r = init_a(key, rand[0], rand[1], "peft")
        z = jnp.zeros(zeros, jnp.float32)
        return {"base": w}, ({"A": r, "B": z} if zero == "B" else {"A": z, "B": r})

    return additive(fmt_name("krona", a=a_shape, factor=None if factor == -1 else factor,
                             s=None if scale == 1.0 else scale),
                    init_fn, structure=lambda f, t: Kron(scale * t["A"][None], t["B"][None]))


def lokr(rank: int, alpha: Optional[float] = None, *, factor: int = -1,
         decompose_both: bool = False) -> Reparam:
    """LoKr (LyCORIS; PEFT ``LoKrConfig``): ``W = W0 + s · (A ⊗ (B1 @ B2))``, ``s = α/r``.

    Factor shapes as PEFT: ``d_in = m_i·n_i``, ``d_out = m_o·n_o`` by
    :func:`factorization` (``factor``); ``A [m_i, m_o]``, ``B [n_i, n_o] = B1 [n_i, r] @ B2 [r, n_o]``.
    Like PEFT, a factor is kept full when ``r >= max(its dims)/2`` (``B`` alone, or
    ``A``/``A1 @ A2`` too with ``decompose_both``). Init = PEFT ``init_weights=True``:
    ``A`` (or ``A2``) zero, the rest kaiming-uniform ``U(±1/√rows)`` (torch's
    ``kaiming_uniform_(a=√5)`` on PEFT's transposed layout).
    PEFT names: ``A = lokr_w1ᵀ``, ``A1 = lokr_w1_bᵀ``, ``A2 = lokr_w1_aᵀ``,
    ``B = lokr_w2ᵀ``, ``B1 = lokr_w2_bᵀ``, ``B2 = lokr_w2_aᵀ``.
    """
    if not isinstance(rank, int) or rank < 1:
        raise ReparamError(f"lokr: rank must be a positive int, got {rank!r}.")
    s = lora_scale(rank, alpha)

    def init_fn(key, w, calib=None):
        (mi, mo), (ni, no) = _factor_shapes(w.shape, None, factor, "lokr")
        ka, kb1, kb2 = jax.random.split(key, 3)
        if decompose_both and rank < max(mi, mo) / 2:
            tr = {"A1": init_a(ka, mi, rank, "peft"), "A2": jnp.zeros((rank, mo), jnp.float32)}
        else:
            tr = {"A": jnp.zeros((mi, mo), jnp.float32)}
        if rank < max(ni, no) / 2:
            tr.update(B1=init_a(kb1, ni, rank, "peft"), B2=init_a(kb2, rank, no, "peft"))
        else:
            tr.update(B=init_a(kb1, ni, no, "peft"))
        return {"base": w}, tr

    def structure(frozen, t):
        a = t["A"] if "A" in t else t["A1"] @ t["A2"]
        b = t["B"] if "B" in t else t["B1"] @ t["B2"]
        return Kron(s * a[None], b[None])

    return additive(fmt_name("lokr", r=rank, alpha=alpha, factor=None if factor == -1 else factor,
                             decompose_both=decompose_both), init_fn, structure=structure)


def compacter(n: int = 4, rank: int = 1, *, scale: float = 1.0) -> Reparam:
    """Compacter / PHM (Karimi Mahabadi et al. 2021): ``W = W0 + s · Σ_{i<n} S_i ⊗ (u_i v_iᵀ)``.

    ``S_i [n, n]`` are SHARED by every weight the rule matches (``Reparam.shared``:
    the plan stores them once, under ``"shared"``, and passes them as ``shared=``);
    ``u_i [d_in/n, r]`` and ``v_i [r, d_out/n]`` are per weight: ``r·(d_in + d_out)``
    per weight plus ``n³`` per rule. Needs ``n | d_in`` and ``n | d_out``. Init:
    ``S ~ N(0, 1/n)`` (so ``Σ_i S_i ⊗ X_i`` keeps the scale of ``X``), ``u_i``
    kaiming-uniform, ``v_i = 0``: a fresh adapter is ``W0``.
    """
    if not isinstance(n, int) or n < 1:
        raise ReparamError(f"compacter: n must be a positive int, got {n!r}.")

    def init_fn(key, w, calib=None):
        d_in, d_out = w.shape
        if d_in % n or d_out % n:
            raise ReparamError(f"compacter: n={n} must divide both dims of the {d_in}x{d_out} weight; use an n "
                               f"from the common divisors {sorted(set(_divisors(d_in)) & set(_divisors(d_out)))}.")
        check_rank(rank, (d_in // n, d_out // n), f"compacter(n={n}) per-block u_i v_iᵀ")
        u = jax.vmap(lambda k: init_a(k, d_in // n, rank, "peft"))(jax.random.split(key, n))
        return {"base": w}, {"u": u, "v": jnp.zeros((n, rank, d_out // n), jnp.float32)}

    def structure(frozen, t, shared):
        return Kron(scale * shared["S"], t["u"], t["v"])          # blocks u_i v_iᵀ kept factored

    return additive(fmt_name("compacter", n=n, r=rank, s=None if scale == 1.0 else scale), init_fn,
                    structure=structure,
                    shared=lambda key: {"S": jax.random.normal(key, (n, n, n), jnp.float32) / math.sqrt(n)})


def soka(energy: Optional[float] = 0.9, max_rank: Optional[int] = None, *, a_shape=None, factor: int = -1,
         niter: Optional[int] = None) -> Reparam:
    """SoKA (Chong & Qu 2025): ``W = W_res + Σ_{k<K} A_k ⊗ B_k`` from a Kronecker SVD of ``W0``.

    :func:`kron_svd` of ``W0`` (factor shapes as :func:`krona`) gives the principal
    terms ``A_k [a1, a2]``, ``B_k [b1, b2]``, trained; ``W_res = W0 − Σ_k A_k ⊗ B_k``
    is frozen (as PiSSA), so a fresh adapter is ``W0`` to rounding. ``K`` is the
    fewest terms holding ``energy`` of ``‖W0‖_F²`` (SoKA's energy threshold; its
    elbow criterion is not implemented), at most ``max_rank`` (and at most the full
    Kronecker rank ``min(a1·a2, b1·b2)``); ``energy=None`` keeps ``max_rank`` terms.
    ``K`` depends on ``W0``'s values: where they are abstract (``plan()``'s shape
    check, a jitted init, ``nn.scan``-stacked kernels under vmap) ``K`` is the cap,
    so ``plan.summary()`` before init shows that upper bound.
    """
    if energy is not None and not 0.0 < energy <= 1.0:
        raise ReparamError(f"soka: energy must be in (0, 1] (the fraction of ‖W0‖² kept), got {energy}.")
    if energy is None and max_rank is None:
        raise ReparamError("soka: give an energy threshold, a max_rank, or both.")
    if max_rank is not None and (not isinstance(max_rank, int) or max_rank < 1):
        raise ReparamError(f"soka: max_rank must be a positive int (or None), got {max_rank!r}.")

    def init_fn(key, w, calib=None):
        sa, sb = _factor_shapes(w.shape, a_shape, factor, "soka")
        cap = min(sa[0] * sa[1], sb[0] * sb[1], max_rank or math.inf)
        a, b, s = kron_svd(w, sa, cap, niter=niter, key=key)
        if energy is not None and not isinstance(s, jax.core.Tracer):
            total = float(jnp.sum(jnp.square(w.astype(jnp.float32))))
            k = energy_rank(s, total, energy, cap)
            a, b = a[:k], b[:k]
        return {"base": residual(w, kron_sum(a, b))}, {"A": a, "B": b}

    return additive(fmt_name("soka", energy=energy, max_rank=max_rank, a=a_shape,
                             factor=None if factor == -1 else factor, niter=niter),
                    init_fn, structure=lambda f, t: Kron(t["A"], t["B"]))
