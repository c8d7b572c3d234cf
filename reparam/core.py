"""The one abstraction: a reparameterisation of ONE weight as a pair of pure functions.

    init(key, w, calib=None) -> (frozen, trainable)      # from the pretrained W0
    apply(frozen, trainable) -> w                         # the effective weight

Like optax's ``GradientTransformation``, a :class:`Reparam` is a NamedTuple of
functions; everything they return is a pytree of arrays. ``apply(*init(k, W0))``
reproduces ``W0`` (exactly, or to float rounding where an SVD is involved).

Additive methods, ``W = base + delta(frozen, trainable)``, are written as a
``delta`` through :func:`additive`; the base lives in ``frozen["base"]`` (the
original ``W0`` -- the same array, never a copy -- or a rewritten one such as
PiSSA's residual). :func:`add` sums the deltas of several additive transforms
on one weight. All transforms here see a weight as a matrix ``[d_in, d_out]``
(``y = x @ W``); the plan maps kernels of other ranks onto that view
(:mod:`reparam.views`).
"""
from __future__ import annotations

import math
import os
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from reparam.structure import InBasis, Sum, dense

Array = jax.Array
PyTree = Any


class ReparamError(ValueError):
    """Bad input to a transform or a plan; the message says what and how to fix it."""


class Reparam(NamedTuple):
    """A reparameterisation of one weight matrix ``[d_in, d_out]``.

    Fields:
      init: ``(key, w, calib) -> (frozen, trainable)``. ``calib`` is the
        calibration statistics of this weight for data-driven methods (CorDA,
        EVA, LoRA-SB), ``None`` otherwise.
      apply: ``(frozen, trainable) -> w``; pure and jittable. Stochastic
        transforms (DyLoRA) take an extra keyword ``rng`` (``None`` at eval).
      name: shown by ``plan.summary()``, e.g. ``"lora(r=8, alpha=16)"``.
      delta: for additive transforms, ``(frozen, trainable) -> ΔW`` with
        ``apply = frozen["base"] + delta``; ``None`` for the others.
      penalty: optional regulariser ``(frozen, trainable) -> scalar`` that the
        loss adds (SORSA's orthonormality).
      stochastic: ``apply`` takes ``rng=``.
      axes: an optional declared matrix view (:func:`reparam.views.on_axes`).
      calib: what calibration data ``init`` needs, or ``None``.
      shared: optional ``key -> pytree``: trainables shared by every leaf the
        rule matches (Compacter's ``S_i``). The plan stores them once, under
        ``"shared"`` in the trainable entry of the rule's first leaf, and
        passes them to ``apply``/``delta`` of every leaf as ``shared=``.
      structure: for additive transforms whose ``ΔW`` has a factored form,
        ``(frozen, trainable) -> LowRank | Kron | Sparse | Sum``
        (:mod:`reparam.structure`); the train step then computes the
        trainable gradient from the layer's input and output cotangent
        without forming ``dW`` (:mod:`reparam.matmul`). Same keywords as ``delta``.
    """
    init: Callable[..., tuple[PyTree, PyTree]]
    apply: Callable[..., Array]
    name: str = "custom"
    delta: Optional[Callable[[PyTree, PyTree], Array]] = None
    penalty: Optional[Callable[[PyTree, PyTree], Array]] = None
    stochastic: bool = False
    axes: Any = None
    calib: Optional[str] = None
    shared: Optional[Callable[[Array], PyTree]] = None
    structure: Optional[Callable[..., Any]] = None

    @property
    def ident(self) -> Ident:
        """The transform's identity (:class:`Ident`); a transform named by a plain string has no hparams."""
        return self.name if isinstance(self.name, Ident) else Ident(str(self.name), text=str(self.name))


class Ident(str):
    """A transform's name, ``"lora(r=8, alpha=16)"``, that carries its identity as fields: ``method`` (``"lora"``)
    and ``hparams`` (``{"r": 8, "alpha": 16}``, the constructor's arguments; None and False dropped).
    Code that needs the method or a hyperparameter (PEFT interop, sharding, the runner) reads the fields,
    never the text; the text is for people (``plan.summary()``, errors)."""
    method: str
    hparams: dict

    def __new__(cls, method: str, *, text: Optional[str] = None, **hparams):
        hp = {k: v for k, v in hparams.items() if v is not None and v is not False}
        check_hparams(method, hp)
        if text is None:
            text = f"{method}(" + ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                                            for k, v in hp.items()) + ")"
        self = super().__new__(cls, text)
        self.method, self.hparams = method, hp
        return self

    def fields(self) -> dict:
        """``{"method": ..., "hparams": {...}}``, JSON-able: nested identities (``add``'s parts, ``in_basis``'s
        inner) as fields too, numpy scalars as numbers, anything else as its text."""
        def js(v):
            if isinstance(v, Ident):
                return v.fields()
            if isinstance(v, (list, tuple)):
                return [js(x) for x in v]
            if isinstance(v, dict):
                return {str(k): js(x) for k, x in v.items()}
            if isinstance(v, (np.generic,)):
                return v.item()
            return v if v is None or isinstance(v, (bool, int, float, str)) else str(v)
        return {"method": self.method, "hparams": js(self.hparams)}


# What the common hyperparameters must be, checked once when a constructor names its transform (every
# constructor does, through Ident): (test, what it must be, an example).
_HPARAMS = {
    "r": (lambda v: _is_int(v) and v >= 1, "a positive int", "8"),
    "k": (lambda v: _is_int(v) and v >= 1, "a positive int", "1000"),
    "n": (lambda v: _is_int(v) and v >= 1, "a positive int", "1000"),
    "num_a": (lambda v: _is_int(v) and v >= 1, "a positive int", "64"),
    "num_b": (lambda v: _is_int(v) and v >= 1, "a positive int", "64"),
    "alpha": (lambda v: _is_real(v) and math.isfinite(v) and v > 0, "a finite number > 0", "16"),
    "density": (lambda v: _is_real(v) and 0 < v <= 1, "in (0, 1]", "0.01"),
    "niter": (lambda v: _is_int(v) and v >= 0, "an int >= 0 (power iterations), or None for the exact SVD", "4"),
    "gamma": (lambda v: _is_real(v) and math.isfinite(v) and v >= 0, "a finite number >= 0", "4e-4"),
    "d_init": (lambda v: _is_real(v) and math.isfinite(v), "a finite number", "0.1"),
    "s": (lambda v: _is_real(v) and math.isfinite(v) and v != 0, "a finite non-zero number (the scale)", "1.0"),
    "scale": (lambda v: _is_real(v) and math.isfinite(v) and v != 0, "a finite non-zero number", "1.0"),
    "rank": (lambda v: _is_int(v) and v >= 1, "a positive int", "8"),
    "rslora": (lambda v: isinstance(v, (bool, np.bool_)), "True or False", "True"),
    "rho": (lambda v: _is_real(v) and math.isfinite(v) and v >= 1, "a finite number >= 1 (1 keeps the rank "
            "everywhere)", "2.0"),
}


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_real(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def check_hparams(method: str, hparams: dict) -> None:
    """Raises a :class:`ReparamError` naming the argument and the fix when a common hyperparameter (rank ``r``,
    ``k``, ``n``, ``alpha``, ``density``, ``niter``, ``gamma``, a scale ``s``, ...) is out of range or of the wrong
    type; ``True`` is not a rank."""
    for name, value in hparams.items():
        rule = _HPARAMS.get(name)
        if rule is not None and not rule[0](value):
            raise ReparamError(f"{method}: {name}={value!r} must be {rule[1]} (e.g. {name}={rule[2]}).")


fmt_name = Ident        # the constructors' spelling: rp.lora's name is fmt_name("lora", r=rank, alpha=alpha)


def additive(name: str, init: Callable, delta: Optional[Callable] = None, *,
             structure: Optional[Callable] = None, **fields) -> Reparam:
    """Makes ``W = frozen["base"] + delta(frozen, trainable)`` from ``init`` and ``delta``.

    Give ``structure`` instead of ``delta`` when ``ΔW`` has a factored form
    (:mod:`reparam.structure`): ``delta`` is then its dense matrix, and the
    train step's hot path uses the structure.

    ``init(key, w, calib) -> (frozen, trainable)`` must put the base in
    ``frozen["base"]``: ``w`` itself (no copy) or a rewrite of it. The sum is
    formed in the wider dtype of base and delta and cast back to the base's
    dtype, so a bf16 base with f32 adapters gives bf16 weights whose gradient
    reaches the f32 adapters.
    """
    if delta is None:
        if structure is None:
            raise ReparamError(f"additive({name!r}) needs a delta or a structure.")

        def delta(frozen, trainable, **kw):
            return dense(structure(frozen, trainable, **kw), frozen["base"].shape[-2:])

    def apply(frozen, trainable, **kw):
        base = frozen["base"]
        return (base + delta(frozen, trainable, **kw)).astype(base.dtype)
    return Reparam(init=init, apply=apply, name=name, delta=delta, structure=structure, **fields)


def full() -> Reparam:
    """Full fine-tuning of the leaf: ``W = θ``, θ trainable, initialised to ``W0``."""
    return Reparam(init=lambda key, w, calib=None: ({}, {"w": w}),
                   apply=lambda frozen, trainable: trainable["w"], name=Ident("full", text="full"))


def frozen() -> Reparam:
    """Leaves the weight as it is: ``W = W0``, nothing trained."""
    return additive(Ident("frozen", text="frozen"), lambda key, w, calib=None: ({"base": w}, {}),
                    lambda frozen, trainable: jnp.zeros((), frozen["base"].dtype))


def add(*transforms: Reparam) -> Reparam:
    """``W = W0 + Σ_i ΔW_i``: the sum of several additive transforms on one weight.

    Each part is initialised from ``W0``; a part that rewrites the base (PiSSA's
    residual ``W0 - A@B``) contributes its rewrite, so the combined base is
    ``W0 + Σ_i (base_i - W0)`` and a fresh sum still equals ``W0``. Used for
    sparse + low-rank (SLTrain, LOST). Trainable state is a tuple, one entry per part.
    """
    if not transforms:
        raise ReparamError("add() needs at least one transform, e.g. add(rp.lora(8), rp.pissa(4)).")
    for t in transforms:
        if t.shared is not None:
            raise ReparamError(f"add(): {t.name} has trainables shared across layers, which add() does not "
                               "support yet; give it its own rule.")
        if t.delta is None:
            raise ReparamError(f"add(): {t.name} is not additive (it has no delta), so it cannot be "
                               "summed with others; apply it on its own rule instead.")
    stochastic = any(t.stochastic for t in transforms)

    def init(key, w, calib=None):
        keys = jax.random.split(key, len(transforms))
        base, parts, trainables = w, [], []
        for t, k in zip(transforms, keys):
            f, tr = t.init(k, w, calib)
            f = dict(f)
            b = f.pop("base")
            if b is not w:
                base = base + (b - w)
            parts.append(f)
            trainables.append(tr)
        return {"base": base, "parts": tuple(parts)}, tuple(trainables)

    def delta(frozen, trainable, rng=None):
        keys = [None] * len(transforms) if rng is None else list(jax.random.split(rng, len(transforms)))
        total = 0.0
        for t, f, tr, k in zip(transforms, frozen["parts"], trainable, keys):
            f = {**f, "base": frozen["base"]}
            total = total + (t.delta(f, tr, rng=k) if t.stochastic else t.delta(f, tr))
        return total

    def penalty(frozen, trainable):
        return sum(t.penalty({**f, "base": frozen["base"]}, tr)
                   for t, f, tr in zip(transforms, frozen["parts"], trainable) if t.penalty is not None)

    def structure(frozen, trainable, rng=None):
        keys = [None] * len(transforms) if rng is None else list(jax.random.split(rng, len(transforms)))
        return Sum(tuple(t.structure({**f, "base": frozen["base"]}, tr, **({"rng": k} if t.stochastic else {}))
                         for t, f, tr, k in zip(transforms, frozen["parts"], trainable, keys)))

    calibs = {t.calib for t in transforms if t.calib}
    return additive(Ident("add", parts=tuple(t.ident for t in transforms),
                          text="add(" + ", ".join(t.name for t in transforms) + ")"), init, delta,
                    structure=structure if all(t.structure for t in transforms) else None,
                    penalty=penalty if any(t.penalty for t in transforms) else None,
                    stochastic=stochastic, calib=",".join(sorted(calibs)) or None)


def check_rank(rank: int, shape: tuple[int, ...], method: str) -> None:
    """Raises a :class:`ReparamError` unless ``1 <= rank <= min(d_in, d_out)``."""
    d_in, d_out = shape[-2:]
    if not isinstance(rank, int) or rank < 1:
        raise ReparamError(f"{method}: rank must be a positive int, got {rank!r}.")
    if not min(d_in, d_out):
        raise ReparamError(f"{method}: the {d_in}x{d_out} weight is empty; exclude it from the rule.")
    if rank > min(d_in, d_out):
        raise ReparamError(f"{method}: rank {rank} exceeds min(d_in, d_out) = {min(d_in, d_out)} of a "
                           f"{d_in}x{d_out} weight; use rank <= {min(d_in, d_out)} or exclude this "
                           "weight from the rule.")


def check_confined(directory: str, what: str) -> None:
    """Raises a :class:`ReparamError` when a file or folder under ``directory`` is a symlink that resolves
    outside it: reading ``what`` (a checkpoint, an adapter) must never read another place's files."""
    root = os.path.realpath(directory)
    for d, names, files in os.walk(directory):
        for n in names + files:
            p = os.path.join(d, n)
            if os.path.islink(p) and os.path.commonpath([root, os.path.realpath(p)]) != root:
                raise ReparamError(f"{what}: {p} is a symlink to {os.path.realpath(p)}, outside {directory}; "
                                   "nothing is read from outside it. Copy the file in if it belongs there.")


def check_finite(x, what: str, fix: str) -> None:
    """Raises a :class:`ReparamError` naming ``what``, the first bad entry and ``fix`` when a concrete float
    array holds inf or NaN. One host-side reduction, meant for init and calibration time, never a step;
    skipped for tracers (``plan()``'s abstract shapes, a jitted init)."""
    dtype = getattr(x, "dtype", type(x) if isinstance(x, (int, float)) else None)
    if isinstance(x, jax.core.Tracer) or dtype is None or not jnp.issubdtype(dtype, jnp.inexact):
        return
    x = jnp.asarray(x)
    bad = ~jnp.isfinite(x)
    n = int(jnp.sum(bad))
    if n:
        i = int(jnp.argmax(bad.reshape(-1)))
        at = f" at {list(map(int, np.unravel_index(i, x.shape)))}" if x.ndim else ""
        raise ReparamError(f"{what} has {n} non-finite entr{'y' if n == 1 else 'ies'} (inf/NaN), the first{at} "
                           f"= {float(x.reshape(-1)[i])}: {fix}")


class Basis(NamedTuple):
    """A linear change of basis for weight matrices: ``coeffs = forward(W)``, ``W = inverse(coeffs)``.

    Coefficients have the weight's shape (periodized wavelets, orthonormal DCT,
    DFT); ``inverse`` returns real arrays and ``inverse(forward(W)) == W``.
    Orthogonal bases also preserve norms (Parseval).

    ``along``, for a separable basis, is ``(t, t_adj)``: its 1-D transform of the last axis of an
    array of rows, ``t(v) = v @ T`` and ``t_adj(v) = v @ Tᵀ`` for a ``d x d`` matrix ``T`` (maybe
    complex) of that axis's length, such that ``inverse(C) = Re(T_in C T_outᵀ)``. With it the train
    step takes the coefficients' gradient from the transformed layer input and output cotangent
    (:class:`reparam.structure.InBasis`) instead of the full weight gradient ``xᵀg``.

    ``adjoint``, optional with ``along``: ``G ↦ Re(T_inᵀ G T_out)`` for a real ``G``, the adjoint of
    ``inverse`` on real coefficients (a sparse coefficient matrix's gradient is it at the weight's
    gradient, read at the support). ``None``: computed with ``t`` along both axes. A basis gives it where
    a 2-D transform does it faster (``forward`` for an orthogonal basis; a real FFT for the DFT).

    ``half``, optional with a complex ``along``: for a Hermitian ``t`` (a real row's ``t(v)[d - u] =
    conj(t(v)[u])``, as the DFT's), ``v ↦ (h, c)`` with ``t(v)[..., u] = c·conj(h[..., u])`` for
    ``u ≤ d//2``: the half spectrum, ``d//2 + 1`` complex columns (a real FFT for the DFT). A sparse
    coefficient matrix then samples its gradient from the half spectra of ``x`` and ``g``.
    """
    forward: Callable[[Array], Array]
    inverse: Callable[[Array], Array]
    name: str
    along: Optional[tuple[Callable[[Array], Array], Callable[[Array], Array]]] = None
    adjoint: Optional[Callable[[Array], Array]] = None
    half: Optional[Callable[[Array], tuple[Array, float]]] = None


def in_basis(basis: Basis, inner: Reparam, scale: float = 1.0) -> Reparam:
    """``W = W0 + s · basis.inverse(ΔC)``: the inner transform's delta lives in another basis.

    ``inner`` is initialised on the coefficients ``basis.forward(W0)`` (so a
    data-dependent support, e.g. by magnitude, is chosen in that basis) and
    must be additive; its delta ``ΔC`` is mapped back by the linear inverse.
    WaveFT = ``in_basis(wavelet, sparse)``, weight-space WaRA =
    ``in_basis(wavelet, lora)``, FourierFT = ``in_basis(fourier, sparse)``.
    """
    if inner.delta is None:
        raise ReparamError(f"in_basis(): {inner.name} is not additive (it has no delta); use an additive "
                           "inner transform such as rp.lora or rp.sparse.random.")

    def init(key, w, calib=None):
        c = basis.forward(w)
        f, t = inner.init(key, c, calib)
        f = dict(f)
        fb = f.pop("base")
        if c.shape != w.shape:
            raise ReparamError(f"in_basis({basis.name}): coefficients of shape {c.shape} for a weight of shape "
                               f"{w.shape}; in_basis needs a shape-preserving basis (periodized wavelets, DCT, DFT).")
        base = w if fb is c else (w + basis.inverse(fb - c).astype(w.dtype))
        return {"base": base, "inner": f}, t

    def inner_frozen(frozen):
        # coefficients have the weight's shape, so the inner transform may read its shape from the base
        return {**frozen["inner"], "base": frozen["base"]}

    def delta(frozen, trainable, **kw):
        return scale * basis.inverse(inner.delta(inner_frozen(frozen), trainable, **kw))

    structure = None
    if basis.along is not None and inner.structure is not None:
        def structure(frozen, trainable, **kw):
            return InBasis(inner.structure(inner_frozen(frozen), trainable, **kw), scale, basis)

    penalty = None
    if inner.penalty is not None:       # the inner transform's regulariser, on its own trainables (SORSA's)
        def penalty(frozen, trainable, **kw):
            return inner.penalty(inner_frozen(frozen), trainable, **kw)

    return additive(Ident("in_basis", basis=basis.name, inner=inner.ident, s=scale if scale != 1.0 else None,
                          text=f"in_basis({basis.name}, {inner.name}{', s=%g' % scale if scale != 1.0 else ''})"),
                    init, delta, structure=structure, penalty=penalty, stochastic=inner.stochastic,
                    calib=inner.calib, shared=inner.shared)
