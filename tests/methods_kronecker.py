"""Kronecker family under the shared laws: KronA, LoKr (PEFT's full/low-rank factor rule), SoKA, Compacter."""
from __future__ import annotations

import reparam.kronecker as kr
from reparam.kronecker import factorization


def _ab(i, o):
    """Default factor shapes ``((a1, a2), (b1, b2))`` of a ``i x o`` weight."""
    (a1, b1), (a2, b2) = factorization(i), factorization(o)
    return (a1, a2), (b1, b2)


def krona_count(i, o, r):
    (a1, a2), (b1, b2) = _ab(i, o)
    return a1 * a2 + b1 * b2


def lokr_count(i, o, r, decompose_both=False):
    """PEFT's LoKr: a factor ``[p, q]`` is ``p·q`` when full, ``r·(p + q)`` when ``r < max(p, q)/2``."""
    (a1, a2), (b1, b2) = _ab(i, o)
    size = lambda p, q, low: r * (p + q) if low and r < max(p, q) / 2 else p * q
    return size(a1, a2, decompose_both) + size(b1, b2, True)


def soka_count(i, o, r):
    (a1, a2), (b1, b2) = _ab(i, o)
    return min(r, a1 * a2, b1 * b2) * (a1 * a2 + b1 * b2)


METHODS = {
    "krona": (lambda r: kr.krona(), krona_count, 0.0),
    "lokr": (lambda r: kr.lokr(r, alpha=2 * r), lokr_count, 0.0),
    "lokr_both": (lambda r: kr.lokr(r, decompose_both=True), lambda i, o, r: lokr_count(i, o, r, True), 0.0),
    "lokr_r1_both": (lambda r: kr.lokr(1, decompose_both=True), lambda i, o, r: lokr_count(i, o, 1, True), 0.0),
    "soka": (lambda r: kr.soka(None, max_rank=r), soka_count, 1e-5),
    "compacter": (lambda r: kr.compacter(2, r), lambda i, o, r: r * (i + o) + 8, 0.0,
                  lambda i, o, r: i % 2 == 0 and o % 2 == 0 and r <= min(i, o) // 2),
}
