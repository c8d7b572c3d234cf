"""Bases for :func:`reparam.core.in_basis` and the methods that train in them: WaveFT, WaRA, FourierFT.

A :class:`~reparam.core.Basis` maps a ``[d_in, d_out]`` weight to coefficients
of the same shape and back. Three are provided:

- :func:`wavelet_basis`: the orthonormal 2-D discrete wavelet transform with
  periodization (Haar/db1 ... db4), multi-level in the standard Mallat layout
  -- the layout of ``pywt.coeffs_to_array(pywt.wavedec2(W, w, "periodization", L))``;
- :func:`dct_basis`: the orthonormal 2-D DCT-II;
- :func:`fourier_basis`: the (unnormalised, complex) 2-D DFT, as FourierFT uses it.

The wavelet transform is computed by filtering (``O(F·d_in·d_out)`` for a
filter of ``F`` taps), never as a dense matrix, so it is cheap inside a train
step; it is differentiable and works on stacked (vmapped) weights. ``forward``
and ``inverse`` are jitted (one compiled call per shape when run eagerly,
inlined under an outer ``jit``).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.fft import dct, dctn, idct, idctn

from reparam import sparse
from reparam.core import Basis, Reparam, ReparamError, check_hparams, fmt_name, in_basis
from reparam.lowrank import lora

# Orthonormal Daubechies scaling filters h (Σh = √2; Daubechies 1992, Table 6.1), as PyWavelets' rec_lo.
_SCALING = {
    "db1": (0.7071067811865476, 0.7071067811865476),
    "db2": (0.48296291314453416, 0.8365163037378079, 0.2241438680420134, -0.12940952255126037),
    "db3": (0.33267055295008263, 0.8068915093110925, 0.45987750211849154, -0.13501102001025458,
            -0.08544127388202666, 0.03522629188570953),
    "db4": (0.2303778133088965, 0.7148465705529157, 0.6308807679298589, -0.027983769416859854,
            -0.18703481171909309, 0.030841381835560764, 0.0328830116668852, -0.010597401785069032),
}
_ALIASES = {"haar": "db1"}


def wavelet_filters(wavelet: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The analysis filters ``(dec_lo, dec_hi)`` of an orthogonal wavelet, as PyWavelets names them.

    ``dec_lo = h[::-1]`` and ``dec_hi[k] = (-1)^(k+1) h[k]`` for the scaling filter ``h``.
    """
    h = _SCALING.get(_ALIASES.get(wavelet, wavelet))
    if h is None:
        raise ReparamError(f"unknown wavelet {wavelet!r}; use one of {sorted(_SCALING) + sorted(_ALIASES)}, "
                           "or rp.dct_basis() / rp.fourier_basis().")
    return h[::-1], tuple((-1) ** (k + 1) * c for k, c in enumerate(h))


def _analysis(x, lo, hi, axis):
    """One periodized DWT level along ``axis``: ``[approx; detail]``, each half the length.

    ``a[k] = Σ_j lo[j] · x[(2k + F/2 - j) mod n]`` (PyWavelets' ``mode="periodization"``),
    computed on the even/odd phases of ``x`` so every roll is of a half-length array.
    """
    axis %= x.ndim
    phases = tuple(x[(slice(None),) * axis + (slice(p, None, 2),)] for p in (0, 1))
    a = d = 0.0
    for j, (l, h) in enumerate(zip(lo, hi)):
        s = len(lo) // 2 - j
        v = jnp.roll(phases[s % 2], -(s // 2), axis)
        a, d = a + l * v, d + h * v
    return jnp.concatenate([a, d], axis)


def _synthesis(c, lo, hi, axis):
    """The adjoint of :func:`_analysis`, which is its inverse: the periodized transform is orthogonal."""
    axis %= c.ndim
    a, d = jnp.split(c, 2, axis)
    phases = [0.0, 0.0]
    for j, (l, h) in enumerate(zip(lo, hi)):
        s = len(lo) // 2 - j
        phases[s % 2] = phases[s % 2] + jnp.roll(l * a + h * d, s // 2, axis)
    return jnp.stack(phases, axis + 1).reshape(c.shape)


def _float(x):
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def wavelet_basis(wavelet: str = "haar", levels: int = 1) -> Basis:
    """Orthonormal 2-D DWT with periodization, ``levels`` deep: ``C = DWT2(W)``, ``W = IDWT2(C)``.

    Each level filters both axes of the current approximation block (the
    top-left ``d_in/2^l x d_out/2^l``) into ``[[LL, LH], [HL, HH]]``, ``L``/``H``
    the low/high-pass halves along rows then columns: the Mallat layout of
    ``pywt.coeffs_to_array(pywt.wavedec2(W, wavelet, mode="periodization", level=levels))``.
    Orthogonal, so ``‖C‖ = ‖W‖``. Both dimensions must be divisible by ``2**levels``.
    ``wavelet``: ``"haar"`` (= ``"db1"``), ``"db2"``, ``"db3"``, ``"db4"``.
    """
    lo, hi = wavelet_filters(wavelet)
    if not isinstance(levels, int) or levels < 1:
        raise ReparamError(f"wavelet_basis: levels must be a positive int, got {levels!r}.")
    name = f"wavelet({wavelet}" + (f", levels={levels})" if levels != 1 else ")")

    def check(shape):
        m, n = shape[-2:]
        if m % 2 ** levels or n % 2 ** levels:
            fit = min((m & -m).bit_length(), (n & -n).bit_length()) - 1    # trailing zeros: the most that fit
            fix = f"use levels <= {fit}" if fit else "both dimensions must be even for any level"
            raise ReparamError(f"{name}: a {m}x{n} weight is not divisible by 2**levels = {2 ** levels} in "
                               f"both dimensions; {fix}, or use another basis (rp.dct_basis(), "
                               "rp.fourier_basis()) or exclude this weight from the rule.")
        return m, n

    def forward(w):
        m, n = check(w.shape)
        c = _float(w)
        for lvl in range(levels):
            bm, bn = m >> lvl, n >> lvl
            block = _analysis(_analysis(c[..., :bm, :bn], lo, hi, -2), lo, hi, -1)
            c = block if lvl == 0 else c.at[..., :bm, :bn].set(block)
        return c

    def inverse(c):
        m, n = check(c.shape)
        w = _float(c)
        for lvl in reversed(range(levels)):
            bm, bn = m >> lvl, n >> lvl
            block = _synthesis(_synthesis(w[..., :bm, :bn], lo, hi, -1), lo, hi, -2)
            w = block if lvl == 0 else w.at[..., :bm, :bn].set(block)
        return w

    # one level is separable (rows, then columns); deeper Mallat levels re-filter only the LL block
    along = (lambda v: _analysis(_float(v), lo, hi, -1), lambda v: _synthesis(v, lo, hi, -1)) \
        if levels == 1 else None
    return Basis(jax.jit(forward), jax.jit(inverse), name, along, adjoint=jax.jit(forward))   # orthogonal


def dct_basis() -> Basis:
    """Orthonormal 2-D DCT-II: ``C = D_in W D_outᵀ`` (``norm="ortho"``), ``‖C‖ = ‖W‖``; any shape."""
    forward = jax.jit(lambda w: dctn(_float(w), type=2, axes=(-2, -1), norm="ortho"))
    return Basis(forward, jax.jit(lambda c: idctn(_float(c), type=2, axes=(-2, -1), norm="ortho")), "dct",
                 (lambda v: dct(_float(v), type=2, axis=-1, norm="ortho"),
                  lambda v: idct(v, type=2, axis=-1, norm="ortho")), adjoint=forward)         # orthogonal


def _re_ifft2(c):
    """``Re(ifft2(C))``; for a real ``C`` by one real-output FFT: ``Re(ifft2(C)) = ifft2((C + C̃)/2)``,
    and ``(C + C̃)/2`` is real and even, so Hermitian: ``irfft2`` of its first ``n//2 + 1`` columns
    (about half the complex ``ifft2``'s time for a 384x1536 ``C`` on CPU)."""
    if jnp.iscomplexobj(c):
        return jnp.real(jnp.fft.ifft2(c, axes=(-2, -1)))
    c = _float(c)
    m, n = c.shape[-2:]
    h = n // 2 + 1
    negated = c[..., (-np.arange(m) % m)[:, None], (-np.arange(h) % n)[None, :]]     # C̃[u, v] = C[-u, -v]
    return jnp.fft.irfft2(0.5 * (c[..., :h] + negated), s=(m, n), axes=(-2, -1))


def _re_ifft2_adjoint(g):
    """``Re(ifft2(G))`` for a real ``G`` -- the adjoint of :func:`_re_ifft2` on real arrays -- from one
    ``rfft2``: ``Re(ifft2(G)) = Re(fft2(G))/(m·n)``, and column ``v > n/2`` of ``Re(fft2(G))`` is column
    ``n - v`` of its frequency-negated half (Hermitian symmetry)."""
    g = _float(g)
    m, n = g.shape[-2:]
    half = jnp.real(jnp.fft.rfft2(g, axes=(-2, -1))) / (m * n)              # columns 0 .. n//2
    mirrored = jnp.roll(jnp.flip(half, -2), 1, axis=-2)[..., 1: n - n // 2][..., ::-1]
    return jnp.concatenate([half, mirrored], axis=-1)


def fourier_basis() -> Basis:
    """2-D DFT as FourierFT uses it: ``C = fft2(W)`` (complex), ``W = Re(ifft2(C))``; any shape.

    Linear but NOT orthogonal: ``ifft2`` carries the ``1/(d_in·d_out)`` factor,
    so ``‖fft2(W)‖ = √(d_in·d_out)·‖W‖`` and a single real coefficient ``c``
    gives ``ΔW`` entries of size ``c/(d_in·d_out)`` -- why FourierFT scales by
    ``s ~ 100-300``. ``Re(ifft2(fft2(W))) = W`` for real ``W``; a real
    coefficient matrix ``C`` maps to ``Re(ifft2(C))``, the even part of its
    inverse DFT, and ``Re(ifft2(Cᵀ)) = Re(ifft2(C))ᵀ``. Real coefficients go
    through real FFTs (``irfft2``, ``rfft2``), forward and backward.
    """
    return Basis(jax.jit(lambda w: jnp.fft.fft2(_float(w), axes=(-2, -1))), jax.jit(_re_ifft2), "fourier",
                 (lambda v: jnp.fft.ifft(v, axis=-1),) * 2,             # T = F⁻¹ is symmetric
                 adjoint=jax.jit(_re_ifft2_adjoint),
                 half=lambda v: (jnp.fft.rfft(_float(v), axis=-1), 1.0 / v.shape[-1]))   # ifft = conj(fft)/d


def waveft(k: Optional[int] = None, density: Optional[float] = None, *, wavelet: str = "haar",
           levels: int = 1, scale: float = 1.0) -> Reparam:
    """WaveFT (Bilican et al. 2025, "Exploring Sparsity for PEFT Using Wavelets"): ``W = W0 + s·IDWT2(C)``.

    ``C`` is zero except at ``k`` (or ``density·d_in·d_out``) coefficient positions
    drawn uniformly once at init; their values (init 0) are trained: ``k``
    parameters. = ``in_basis(wavelet_basis(wavelet, levels), sparse.random(k), s)``.

    PEFT (``WaveFTConfig``, default ``scaling=25``, ``wavelet_family="db1"``) is
    reproduced exactly for Haar, one level and even ``d_in``, ``d_out``: its
    ``[out, in]`` spectrum ``[[A, B], [C, D]]`` (2x2 blocks) is our ``[in, out]``
    coefficient matrix ``[[Aᵀ, Bᵀ], [Cᵀ, Dᵀ]]`` -- each block transposed in
    place, because PEFT's reconstruction takes its top-right block as the
    row-high-pass band. PEFT's db2+ (and odd sizes) zero-pad, reconstruct
    without periodization and crop: a rank-deficient map, not a basis, which
    is not reproduced here.
    """
    check_hparams("waveft", {n: v for n, v in (("k", k), ("density", density)) if v is not None})
    return in_basis(wavelet_basis(wavelet, levels), sparse.random(k=k, density=density), scale)._replace(
        name=fmt_name("waveft", k=k, density=density, wavelet=wavelet, levels=levels if levels != 1 else None,
                      s=scale if scale != 1.0 else None))


def wara(rank: int, alpha: Optional[float] = None, *, wavelet: str = "haar", levels: int = 1) -> Reparam:
    """Weight-space WaRA (Heidari et al. 2025, "WaRA: Wavelet Low Rank Adaptation"): ``W = W0 + IDWT2(s·A@B)``.

    LoRA's factors in the wavelet domain: ``A [d_in, r]`` (kaiming-uniform),
    ``B [r, d_out]`` (zero), ``s = α/r``; ``r·(d_in + d_out)`` parameters. A
    low-rank coefficient update maps back to a generally full-rank ``ΔW``.
    = ``in_basis(wavelet_basis(wavelet, levels), lora(rank, alpha))``.
    """
    check_hparams("wara", {"r": rank, **({} if alpha is None else {"alpha": alpha})})
    return in_basis(wavelet_basis(wavelet, levels), lora(rank, alpha))._replace(
        name=fmt_name("wara", r=rank, alpha=alpha, wavelet=wavelet, levels=levels if levels != 1 else None))


def fourierft(n: int, scale: float = 150.0) -> Reparam:
    """FourierFT (Gao et al. 2024, "Parameter-Efficient Fine-Tuning with Discrete Fourier Transform").

    ``W = W0 + s·Re(ifft2(C))``, ``C [d_in, d_out]`` zero except ``n`` frequencies
    drawn uniformly once at init; their real values (init 0) are trained: ``n``
    parameters. ``s = 150`` is PEFT's default (``FourierFTConfig.scaling``).
    = ``in_basis(fourier_basis(), sparse.random(k=n), s)``.

    PEFT builds the spectrum ``S [out, in]`` and ``ΔW_torch = s·Re(ifft2(S))``;
    since ``ifft2(Sᵀ) = ifft2(S)ᵀ``, our ``C = Sᵀ``: PEFT's entry ``(o, i)`` is our
    flat index ``i·d_out + o``. PEFT initialises the spectrum to N(0, 1) unless
    ``init_weights=True``; ours starts at 0 so a fresh adapter is a no-op.
    """
    check_hparams("fourierft", {"n": n, "s": scale})
    return in_basis(fourier_basis(), sparse.random(k=n), scale)._replace(
        name=fmt_name("fourierft", n=n, s=scale))
