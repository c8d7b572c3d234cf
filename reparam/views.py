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

import dataclasses
import functools
import math
import re
from typing import Any, NamedTuple, Optional

import jax
import numpy as np

from reparam import quant
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
    for what, axes in (("batch_axes", decl.batch), ("in_axes", decl.inp), ("out_axes", decl.out)):
        wrong = [a for a in axes or () if not -nd <= a < nd]
        if wrong:
            raise ReparamError(f"parameter '{path}' {shape} (rule {rule!r}): rp.on_axes {what}={tuple(axes)} names "
                               f"axis {wrong[0]}, but the kernel has {nd} axes ({-nd}..{nd - 1}). Count the axes on "
                               "the whole kernel, batch axes included.")
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
        elif len(rest) < 2:
            raise ReparamError(
                f"parameter '{path}' (rule {rule!r}) has a kernel of shape {shape}; batch_axes={batch} (stacked "
                f"layers) leaves {len(rest)} axis, and a matrix view needs an input and an output axis. A "
                f"{nd}-D weight that is not a stack of layers needs no batch_axes: drop them.")
        elif guess is None:
            raise ReparamError(
                f"parameter '{path}' (rule {rule!r}) has a kernel of shape {shape} whose matrix view "
                f"[d_in, d_out] cannot be inferred from its name (only 2-D, q/k/v and out DenseGeneral, and conv "
                f"kernels are). Pass model= (and example=) to rp.plan to read it from the model's own "
                f"contraction, or declare it: rp.on_axes(t, in_axes=(...), out_axes=(...)), adding "
                f"batch_axes=(...) only for axes that stack independent layers (each gets its own adapter).")
        else:
            inp, out = tuple(rest[i] for i in guess[0]), tuple(rest[i] for i in guess[1])
    if sorted(batch + inp + out) != list(range(nd)) or not inp or not out:
        raise ReparamError(
            f"parameter '{path}' (rule {rule!r}): axes batch={batch} in={inp} out={out} must split the "
            f"{nd} dims of shape {shape} exactly once each, with in and out non-empty. Fix the rp.on_axes "
            "declaration: name each axis in exactly one of batch_axes, in_axes, out_axes.")
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


@functools.partial(jax.tree_util.register_dataclass, data_fields=("w",), meta_fields=("inp", "out"))
@dataclasses.dataclass(frozen=True)
class Matrix:
    """A kernel ``w [*stack, *rest]`` (an array or a quantised :class:`reparam.quant.QArray`) seen as the matrix
    ``[*stack, d_in, d_out]``, its ``rest`` axes ``inp`` grouped into ``d_in`` and ``out`` into ``d_out``
    (positions within ``rest``), formed only where it is used: the base the train step's structured op
    receives (:mod:`reparam.matmul`), one layer at a time -- a quantised base dequantised there, a view that
    needs a transpose (a fused ``[2, d, ffn]`` gate/up) transposed there -- never a copy of a whole stack of
    layers or of the whole model. Its stacked axes are ``w``'s leading ones (the codes' and scales' for a
    ``QArray``), so slicing, vmapping and scanning over layers treat it as the arrays it holds."""
    w: Any
    inp: tuple
    out: tuple

    @property
    def shape(self) -> tuple[int, ...]:
        shape = tuple(self.w.shape)
        lead, rest = shape[:len(shape) - len(self.inp) - len(self.out)], shape[len(shape) - len(self.inp) - len(self.out):]
        return lead + (math.prod(rest[a] for a in self.inp), math.prod(rest[a] for a in self.out))

    @property
    def dtype(self):
        return self.w.dtype

    @property
    def sizes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The sizes of the input and of the output axes, in view order."""
        rest = tuple(self.w.shape)[len(self.w.shape) - len(self.inp) - len(self.out):]
        return tuple(rest[a] for a in self.inp), tuple(rest[a] for a in self.out)

    def grouped(self):
        """The kernel ``[*stack, *inp sizes, *out sizes]``: transposed into view order, not flattened. A sharded
        axis that a flattened group would hold as its minor factor (a fused ``[2, d, ffn]`` gate/up sharded on
        ``ffn``) stays sharded in this layout; flattening it would make XLA gather the weight."""
        w = quant.dequantize(self.w)
        nb = w.ndim - len(self.inp) - len(self.out)
        perm = tuple(range(nb)) + tuple(nb + a for a in self.inp + self.out)
        return w if perm == tuple(range(w.ndim)) else w.transpose(perm)

    def array(self):
        return self.grouped().reshape(self.shape)


def matrix(w, view: View) -> Optional[Matrix]:
    """``w``'s :class:`Matrix` under ``view`` when its stacked axes lead (``w`` quantised: and its blocks do not
    run along one of them); None otherwise, and for a plain array that the view only reshapes (nothing to
    defer: :func:`to_matrix` is free)."""
    nb = len(view.batch)
    if view.batch != tuple(range(nb)) or (quant.is_quantized(w) and w.axis + w.ndim < nb):
        return None
    if not quant.is_quantized(w) and view.inp + view.out == tuple(range(nb, len(w.shape))):
        return None
    return Matrix(w, tuple(a - nb for a in view.inp), tuple(a - nb for a in view.out))


def materialise(base):
    """The array of a hot-path base: a :class:`Matrix` formed, an array as it is."""
    return base.array() if isinstance(base, Matrix) else base


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


# --- views from the model's own contractions ---------------------------------------------------------
def regroup(groups: tuple, shape: tuple[int, ...], new_shape: tuple[int, ...]) -> Optional[tuple]:
    """The kernel axes each axis holds after a reshape to ``new_shape``, given ``groups`` (the kernel axes of
    ``shape`` each current axis holds, row-major); None when the reshape splits a kernel axis other than back
    into its own axes, or mixes axes in any way a relabelling cannot say. Size-1 axes hold no kernel axis."""
    size = lambda g: math.prod(shape[a] for a in g)
    big_old = [(tuple(a for a in g if shape[a] != 1), size(g)) for g in groups if size(g) != 1]
    big_new = [(i, n) for i, n in enumerate(new_shape) if n != 1]
    out: list = [()] * len(new_shape)
    i = j = 0
    while i < len(big_old) or j < len(big_new):
        if i >= len(big_old) or j >= len(big_new):
            return None
        i2, j2, po, pn = i + 1, j + 1, big_old[i][1], big_new[j][1]
        while po != pn:
            if po < pn:
                if i2 >= len(big_old):
                    return None
                po *= big_old[i2][1]
                i2 += 1
            else:
                if j2 >= len(big_new):
                    return None
                pn *= big_new[j2][1]
                j2 += 1
        olds, news = big_old[i:i2], big_new[j:j2]
        if len(news) == 1:
            out[news[0][0]] = tuple(a for g, _ in olds for a in g)
        elif len(olds) == 1 and [shape[a] for a in olds[0][0]] == [n for _, n in news]:
            for (k, _), a in zip(news, olds[0][0]):
                out[k] = (a,)
        else:
            return None
        i, j = i2, j2
    return tuple(out)


class _Track(NamedTuple):
    """A kernel as it flows through a jaxpr: its axes' kernel axes, its current kernel-axis sizes, and the
    kernel axes already taken one layer at a time (a scan over them, a slice of one layer)."""
    path: str
    groups: tuple
    sizes: tuple
    stacked: tuple


def _uses(jaxpr, tracks: dict, out: dict) -> None:
    """Records, for each tracked kernel, ``(stacked, contracted, kept)`` kernel axes of every ``dot_general``
    that consumes it, through layout ops and into scan / jit / remat / custom-derivative bodies."""
    from jax.extend import core as jcore
    for eqn in jaxpr.eqns:
        ins = [tracks.get(v) if not isinstance(v, jcore.Literal) else None for v in eqn.invars]
        if not any(ins):
            continue
        name, p = eqn.primitive.name, eqn.params
        t = ins[0]
        if name in ("convert_element_type", "copy") and t:
            tracks[eqn.outvars[0]] = t
        elif name == "transpose" and t:
            tracks[eqn.outvars[0]] = t._replace(groups=tuple(t.groups[i] for i in p["permutation"]))
        elif name in ("reshape", "broadcast_in_dim", "squeeze") and t:
            new_shape = tuple(eqn.outvars[0].aval.shape)
            g = regroup(t.groups, t.sizes, new_shape) if math.prod(new_shape) == math.prod(t.sizes) else None
            if g is not None:
                tracks[eqn.outvars[0]] = t._replace(groups=g)
        elif name == "slice" and t:
            cut = [(i, s, e) for i, (s, e) in enumerate(zip(p["start_indices"], p["limit_indices"]))
                   if (s, e) != (0, math.prod(t.sizes[a] for a in t.groups[i]))]
            if len(cut) == 1 and cut[0][2] - cut[0][1] == 1 and len(t.groups[cut[0][0]]) == 1:
                a = t.groups[cut[0][0]][0]          # one layer of a stack
                sizes = tuple(1 if k == a else n for k, n in enumerate(t.sizes))
                tracks[eqn.outvars[0]] = t._replace(sizes=sizes, stacked=t.stacked + (a,))
        elif name == "dot_general":
            (lc, rc), (lb, rb) = p["dimension_numbers"]
            for t, c, b in ((ins[0], lc, lb), (ins[1] if len(ins) > 1 else None, rc, rb)):
                if t:
                    axes = lambda idx: tuple(sorted(a for i in idx for a in t.groups[i] if t.sizes[a] != 1))
                    kept = [i for i in range(len(t.groups)) if i not in c and i not in b]
                    out.setdefault(t.path, []).append((tuple(sorted(t.stacked + axes(b))), axes(c), axes(kept)))
        elif name == "scan":
            nc, nk = p["num_consts"], p["num_carry"]
            body = p["jaxpr"].jaxpr
            inner = {}
            for k, (v, t) in enumerate(zip(body.invars, ins)):
                if t is None or nc <= k < nc + nk:
                    continue
                if k >= nc + nk:                     # scanned over its leading axis: one layer per step
                    if not t.groups or len(t.groups[0]) != 1:
                        continue
                    a = t.groups[0][0]
                    t = t._replace(groups=t.groups[1:], stacked=t.stacked + (a,),
                                   sizes=tuple(1 if k2 == a else n for k2, n in enumerate(t.sizes)))
                inner[v] = t
            _uses(body, inner, out)
        else:
            sub = p.get("jaxpr", p.get("call_jaxpr"))
            sub = getattr(sub, "jaxpr", sub)
            if sub is not None and hasattr(sub, "eqns") and len(sub.invars) == len(ins):
                _uses(sub, {v: t for v, t in zip(sub.invars, ins) if t}, out)


def derive(fn, params, example: tuple, paths) -> dict[str, list[tuple]]:
    """``{path: [(stacked, inputs, outputs), ...]}``: the kernel axes each ``dot_general`` of ``fn(params,
    *example)`` treats as stacked layers (dot batch axes, scanned or sliced one layer at a time), contracts
    and keeps, for the leaves at ``paths``, from an abstract trace (nothing runs)."""
    flat, tree = jax.tree_util.tree_flatten_with_path(params, is_leaf=quant.is_quantized)   # a QArray: its logical array
    from reparam.plan import path_str            # (plan imports views)
    abstract = [jax.ShapeDtypeStruct(tuple(getattr(x, "shape", np.shape(x))), getattr(x, "dtype", np.asarray(x).dtype))
                for _, x in flat]
    closed = jax.make_jaxpr(lambda ps, *ex: fn(jax.tree_util.tree_unflatten(tree, ps), *ex))(abstract, *example)
    jaxpr = closed.jaxpr
    tracks = {}
    for v, (kp, x) in zip(jaxpr.invars, flat):
        p = path_str(kp)
        if p in paths:
            nd = len(np.shape(x))
            tracks[v] = _Track(p, tuple((a,) for a in range(nd)), tuple(np.shape(x)), ())
    out: dict = {}
    _uses(jaxpr, tracks, out)
    return out


def from_uses(path: str, shape: tuple[int, ...], uses: list[tuple], rule: str) -> View:
    """The one :class:`View` all of a kernel's contractions agree on, or an error naming two that disagree."""
    distinct = list(dict.fromkeys(uses))
    if len(distinct) > 1:
        fmt = lambda u: f"stacked {u[0]}, contracted {u[1]}, kept {u[2]}"
        raise ReparamError(f"parameter '{path}' {shape} (rule {rule!r}) is used by the model in two incompatible "
                           f"ways: {fmt(distinct[0])} and {fmt(distinct[1])}; one transform sees one matrix "
                           "view. Adapt it in one way only (e.g. untie the weights), or leave it frozen.")
    stacked, inp, out = distinct[0]
    extra = [a for a in range(len(shape)) if a not in stacked + inp + out]
    if not inp or not out or any(shape[a] != 1 for a in extra):
        raise ReparamError(f"parameter '{path}' {shape} (rule {rule!r}): the model contracts kernel axes {inp} "
                           f"and keeps {out} (stacked {stacked}): no [d_in, d_out] matrix view.")
    return View(tuple(stacked), tuple(inp), tuple(sorted(out + tuple(extra))))


def check_declared(path: str, shape: tuple[int, ...], t: Reparam, view: View, rule: str) -> None:
    """Raises when ``t``'s :func:`on_axes` declaration contradicts ``view``, the one the model's contraction gives."""
    decl = t.axes
    if decl is None:
        return
    nd = len(shape)
    norm = lambda axes: None if axes is None else tuple(sorted(a % nd for a in axes))
    for what, declared, derived in (("batch_axes", norm(decl.batch), view.batch), ("in_axes", norm(decl.inp), view.inp),
                                    ("out_axes", norm(decl.out), view.out)):
        if declared is not None and (declared or what != "batch_axes") and declared != tuple(sorted(derived)):
            raise ReparamError(
                f"parameter '{path}' {shape} (rule {rule!r}): rp.on_axes declares {what}={declared}, but the "
                f"model's contraction gives batch {view.batch}, in {view.inp}, out {view.out}. With model= the "
                "view comes from the contraction: drop the on_axes declaration (or make it agree).")
