"""Matrix views: every transform sees a weight as ``[d_in, d_out]``.

A kernel of another rank is viewed as a matrix by grouping its axes into
``batch`` (leading stacked-layer axes from ``nn.scan``; the transform is
vmapped over them, one independent adapter per layer), ``in`` (flattened to
``d_in``) and ``out`` (flattened to ``d_out``):

    Dense          [d_in, d_out]            in=(0,)      out=(1,)
    DenseGeneral   [d, heads, hd] (q/k/v)   in=(0,)      out=(1, 2)
    DenseGeneral   [heads, hd, d] (out)     in=(0, 1)    out=(2,)
    Conv           [kh, kw, c_in, c_out]    in=(0, 1, 2) out=(3,)

2-D kernels and the cases above (recognised by the parameter's path) need no
declaration; anything else is declared with :func:`on_axes`.
"""
from __future__ import annotations

import math
import re
from typing import NamedTuple, Optional

import jax

from reparam.core import Reparam, ReparamError


class View(NamedTuple):
    """Which axes of a kernel are stacked layers (``batch``), inputs and outputs."""
    batch: tuple[int, ...]
    inp: tuple[int, ...]
    out: tuple[int, ...]

    def is_trivial(self) -> bool:
        return self == View((), (0,), (1,))


class Axes(NamedTuple):
    """A declaration: axes given as ``None`` are inferred from the remaining dims."""
    batch: tuple[int, ...] = ()
    inp: Optional[tuple[int, ...]] = None
    out: Optional[tuple[int, ...]] = None


def on_axes(t: Reparam, in_axes=None, out_axes=None, batch_axes=()) -> Reparam:
    """Declares how a non-2-D kernel is viewed as a matrix for transform ``t``.

    ``rp.on_axes(rp.lora(8), batch_axes=(0,))`` adapts each layer of an
    ``nn.scan``-stacked ``[layers, d_in, d_out]`` kernel independently;
    ``rp.on_axes(rp.lora(8), in_axes=(0, 1), out_axes=(2,))`` views ``[h, hd, d]``
    as ``[h*hd, d]``. Negative axes count from the end.
    """
    tup = lambda a: None if a is None else ((a,) if isinstance(a, int) else tuple(a))
    return t._replace(axes=Axes(tup(batch_axes) or (), tup(in_axes), tup(out_axes)))


_QKV = re.compile(r"(^|/)(query|key|value|q|k|v|q_proj|k_proj|v_proj)/kernel$", re.I)
_OUT = re.compile(r"(^|/)(out|o|o_proj|out_proj)/kernel$", re.I)
_CONV = re.compile(r"conv", re.I)


def _infer(path: str, nd: int) -> Optional[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(in, out) axes of an un-stacked kernel with ``nd`` dims, or None when ambiguous."""
    if nd == 2:
        return (0,), (1,)
    if nd == 3 and _QKV.search(path):
        return (0,), (1, 2)
    if nd == 3 and _OUT.search(path):
        return (0, 1), (2,)
    if nd in (3, 4, 5) and _CONV.search(path):
        return tuple(range(nd - 1)), (nd - 1,)
    return None


def resolve(path: str, shape: tuple[int, ...], t: Reparam, rule: str) -> View:
    """The :class:`View` of a kernel at ``path``, from ``t``'s declaration or inferred."""
    decl = t.axes or Axes()
    nd = len(shape)
    norm = lambda axes: tuple(a % nd for a in axes) if axes is not None else None
    batch = norm(decl.batch)
    inp, out = norm(decl.inp), norm(decl.out)
    if inp is None or out is None:
        rest = [a for a in range(nd) if a not in batch]
        guess = _infer(path, len(rest)) if nd > len(batch) else None
        if inp is None and out is not None:
            inp = tuple(a for a in rest if a not in out)
        elif out is None and inp is not None:
            out = tuple(a for a in rest if a not in inp)
        elif guess is None:
            hint = ("rp.on_axes(t, batch_axes=(0,))" if nd == 3 else
                    "rp.on_axes(t, in_axes=(...), out_axes=(...), batch_axes=(...))")
            raise ReparamError(
                f"parameter '{path}' (rule {rule!r}) has a kernel of shape {shape} whose matrix view "
                f"[d_in, d_out] cannot be inferred (only 2-D, q/k/v and out DenseGeneral, and conv "
                f"kernels are). Declare it, e.g. {hint}.")
        else:
            inp, out = tuple(rest[i] for i in guess[0]), tuple(rest[i] for i in guess[1])
    if sorted(batch + inp + out) != list(range(nd)) or not inp or not out:
        raise ReparamError(
            f"parameter '{path}' (rule {rule!r}): axes batch={batch} in={inp} out={out} must split the "
            f"{nd} dims of shape {shape} exactly once each, with in and out non-empty.")
    return View(batch, inp, out)


def to_matrix(view: View, w):
    """``w`` -> ``[*batch_dims, prod(in_dims), prod(out_dims)]``."""
    perm = view.batch + view.inp + view.out
    w = w if perm == tuple(range(w.ndim)) else w.transpose(perm)
    nb, ni = len(view.batch), len(view.inp)
    return w.reshape(w.shape[:nb] + (math.prod(w.shape[nb:nb + ni]), math.prod(w.shape[nb + ni:])))


def from_matrix(view: View, m, shape: tuple[int, ...]):
    """Inverse of :func:`to_matrix` for a kernel of original ``shape``."""
    perm = view.batch + view.inp + view.out
    w = m.reshape(tuple(shape[a] for a in perm))
    inv = tuple(perm.index(a) for a in range(len(shape)))
    return w if inv == tuple(range(len(shape))) else w.transpose(inv)


WEIGHT_SHAPED = ("grad", "diff")   # calibration kinds with the kernel's own shape (capture_grads, sparse.diffs)


def viewed(t: Reparam, view: View, shape: tuple[int, ...]) -> Reparam:
    """``t`` lifted from matrices to kernels of ``shape``: reshape, and vmap over stacked axes.

    The frozen base stays in the kernel's own layout (the caller's array, not a
    copy, when the transform does not rewrite it); it is viewed as a matrix
    inside ``apply``, where the reshape is free.
    """
    if view.is_trivial():
        return t
    nb = len(view.batch)

    def lift(f):
        for _ in range(nb):
            f = jax.vmap(f)
        return f

    def init(key, w, calib=None):
        m = to_matrix(view, w)
        if calib is not None:   # weight-shaped statistics follow the weight into its matrix view
            calib = {k: to_matrix(view, v) if k in WEIGHT_SHAPED and v.shape == w.shape else v
                     for k, v in calib.items()}
        keys = jax.random.split(key, m.shape[:nb]) if nb else key
        fr, tr = lift(t.init)(keys, m, calib)
        if "base" in fr:
            fr = {**fr, "base": w if fr["base"] is m else from_matrix(view, fr["base"], shape)}
        return fr, tr

    def as_matrix(fr):
        return {**fr, "base": to_matrix(view, fr["base"])} if "base" in fr else fr

    def apply(fr, tr, **kw):
        out = lift(lambda f, x: t.apply(f, x, **kw))(as_matrix(fr), tr)
        return from_matrix(view, out, shape)

    def penalty(fr, tr, **kw):
        return lift(lambda f, x: t.penalty(f, x, **kw))(as_matrix(fr), tr).sum()

    def structure(fr, tr, **kw):      # stacked views: one structure per layer, batched over the stacked axes
        return lift(lambda f, x: t.structure(f, x, **kw))(as_matrix(fr), tr)

    return t._replace(init=init, apply=apply, delta=None,
                      penalty=penalty if t.penalty is not None else None,
                      structure=structure if t.structure is not None else None)
