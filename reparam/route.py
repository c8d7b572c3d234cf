"""Routing: every contraction that consumes an adapted weight runs the structured op, however the model is written.

The train step does not need the model's cooperation. It traces the loss once per compilation
(``jax.make_jaxpr``), with each adapted weight that has a ΔW structure as an input, and evaluates that
jaxpr again with the weight replaced by a :class:`Weight`: the frozen base (as its ``[*stack, d_in,
d_out]`` matrix view) and the structure, never materialised unless something needs the array. The
evaluation re-binds every equation as it was, except where a :class:`Weight` flows:

- ``reshape`` / ``transpose`` / ``squeeze`` / ``broadcast_in_dim`` adding size-1 axes / ``convert_element_type`` /
  ``copy``:
  the :class:`Weight` follows them, tracking which kernel axes each of its axes holds;
  a static ``slice`` of one layer out of a stack slices the base and the structure;
- ``dot_general`` (``x @ W``, ``jnp.einsum``, ``nn.Dense`` / ``DenseGeneral`` / ``Einsum``, ``nnx.Linear`` /
  ``LinearGeneral`` / ``Einsum``, in either operand position): when the contracted kernel axes are the
  view's inputs, the kept ones its outputs and the dot's batch axes its stacked axes, it becomes
  :func:`reparam.matmul.structured_matmul` on ``x`` rearranged to ``[tokens, d_in]`` (vmapped over
  stacked axes), whose backward gives the structure's gradient from ``(x, g)`` and never forms ``xᵀg``;
- ``scan`` (``nn.scan``, ``nnx.scan``, ``jax.lax.scan``): a stacked weight scanned over its leading layer axis
  enters the new scan as its base and structure arrays, sliced per layer with the carry; the body is
  evaluated the same way, and by default (``scan_remat``) recomputed in the backward under a checkpoint
  policy that keeps the projections' outputs: the adapters' gradients need every layer's input ``x``,
  which a scan would otherwise stack (write, and zero-fill first) for the backward, and on XLA:CPU
  recomputing it costs less than that;
- nested ``jit`` is inlined, ``remat`` / ``jax.checkpoint`` is re-applied around the evaluated body with
  its own policy;
- anything else that consumes a :class:`Weight` (a ``gather`` -- an embedding lookup --, a ``while`` /
  ``cond``, a custom-derivative call, a contraction that disagrees with the view) gets the materialised
  weight ``W0 + ΔW`` and plain autodiff: correct, and recorded as a fallback with its reason.

Each use is recorded in a :class:`Routing` that belongs to the step (``step.routing``), and
``plan.summary(routing=step.routing)`` prints it: routed uses with the forward they chose and their
tokens, fallbacks with the primitive that took them.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from reparam import structure as S, views
from reparam.matmul import structured_matmul

Array = jax.Array

_FOLLOW = {"convert_element_type", "copy", "reshape", "transpose", "squeeze", "broadcast_in_dim", "slice"}


class Use(NamedTuple):
    """One use of an adapted weight in the traced loss."""
    route: str                      # "factored" | "materialised" (the structured op) | "autodiff"
    tokens: int = 0                 # rows of x per call (routed uses)
    layers: int = 1                 # calls per step from enclosing scans (their lengths' product)
    reason: str = ""                # why a use fell back
    remat: str = ""                 # the checkpoint policy the router put around an enclosing scan's body


class Routing:
    """``{path: {site: Use}}``: how each adapted weight's uses were computed in the program a step traced last
    (a retrace, e.g. for another batch shape, replaces the record)."""

    def __init__(self):
        self.uses: dict[str, dict[Any, Use]] = {}

    def add(self, path: str, site, use: Use) -> None:
        self.uses.setdefault(path, {})[site] = use

    def fallbacks(self) -> dict[str, list[str]]:
        """``{path: [reasons]}`` of weights with uses that fell back to autodiff."""
        out = {}
        for path, sites in self.uses.items():
            reasons = [u.reason for u in sites.values() if u.route == "autodiff"]
            if reasons:
                out[path] = reasons
        return out

    def cell(self, path: str) -> str:
        """One line for ``path``: ``"2/2 routed (materialised @ 512 tok)"``, ``"0/1 routed; autodiff: gather"``."""
        sites = list(self.uses.get(path, {}).values())
        if not sites:
            return "unused by the loss"
        routed = [u for u in sites if u.route != "autodiff"]
        kinds = sorted({f"{u.route} @ {u.tokens} tok" + (f" x{u.layers} layers" if u.layers > 1 else "")
                        + (f", scan body rematerialised: {u.remat}" if u.remat else "") for u in routed})
        text = f"{len(routed)}/{len(sites)} routed" + (f" ({', '.join(kinds)})" if kinds else "")
        reasons = sorted({u.reason for u in sites if u.route == "autodiff"})
        return text + (f"; autodiff: {', '.join(reasons)}" if reasons else "")

    def report(self) -> str:
        """A line per adapted weight the loss used."""
        if not self.uses:
            return "no adapted weight with a ΔW structure was traced"
        width = max(map(len, self.uses))
        return "\n".join(f"{p.ljust(width)}  {self.cell(p)}" for p in sorted(self.uses))


class Weight:
    """An adapted weight inside the traced loss, not materialised: ``base [*stack, d_in, d_out]`` (the frozen
    base's matrix view), its ΔW structure ``s`` (batched over the stack), and the layout of the array the
    model holds: ``groups[i]`` are the kernel axes (of ``shape``, the kernel's remaining axes) that its axis
    ``i`` holds, row-major; ``view`` is ``(stack, inp, out)`` over the kernel's axes."""

    def __init__(self, base, s, *, path, view, shape, groups, dtype, layers=1):
        self.base, self.s = base, s
        self.path, self.view, self.shape = path, view, tuple(shape)
        self.groups, self.dtype, self.layers = tuple(groups), jnp.dtype(dtype), layers
        self._dense = None

    def like(self, base=None, s=None, **kw):
        fields = dict(path=self.path, view=self.view, shape=self.shape, groups=self.groups, dtype=self.dtype,
                      layers=self.layers)
        fields.update(kw)
        return Weight(self.base if base is None else base, self.s if s is None else s, **fields)

    @property
    def current_shape(self) -> tuple[int, ...]:
        return tuple(math.prod(self.shape[a] for a in g) for g in self.groups)

    def dense(self) -> Array:
        """The array the model would hold: ``W0 + ΔW`` (or DoRA's ``(W0 + inner)·diag(c)``) in its layout."""
        if self._dense is None:
            f = lambda base, s: S.weight(views.materialise(base), s)
            for _ in self.view[0]:
                f = jax.vmap(f)
            stack, inp, out = self.view
            rest = tuple(a for a in range(len(self.shape)) if a not in stack + inp + out)   # size-1, no role
            w = views.from_matrix(views.View(stack, inp, out + rest), f(self.base, self.s), self.shape)
            order = [a for g in self.groups for a in g]
            rest = [a for a in range(len(self.shape)) if a not in order]      # squeezed size-1 axes
            self._dense = w.transpose(order + rest).reshape(self.current_shape).astype(self.dtype)
        return self._dense


# --- following layout ops ---------------------------------------------------------------------------
def _follow(eqn, w: Weight) -> Optional[Weight]:
    """The :class:`Weight` after a layout op, or None when it is not one the weight can follow."""
    name, p = eqn.primitive.name, eqn.params
    if name == "copy":
        return w
    if name == "convert_element_type":
        return w.like(dtype=p["new_dtype"])
    if name == "transpose":
        return w.like(groups=tuple(w.groups[i] for i in p["permutation"]))
    if name in ("reshape", "broadcast_in_dim", "squeeze"):
        new_shape = tuple(eqn.outvars[0].aval.shape)
        if math.prod(new_shape) != math.prod(w.current_shape):
            return None                                  # a real broadcast
        if name == "broadcast_in_dim" and list(p["broadcast_dimensions"]) != sorted(p["broadcast_dimensions"]):
            return None
        groups = views.regroup(w.groups, w.shape, new_shape)
        return None if groups is None else w.like(groups=groups)
    if name == "slice":
        return _slice_layer(w, p)
    return None


def _slice_layer(w: Weight, p) -> Optional[Weight]:
    """``W[i:i+1]`` along a stacked axis (``params[i]`` of a stack): the base and structure sliced alike."""
    if p.get("strides") not in (None, (1,) * len(w.groups)):
        return None
    cut = [(i, s, e) for i, (s, e, n) in enumerate(zip(p["start_indices"], p["limit_indices"], w.current_shape))
           if (s, e) != (0, n)]
    if len(cut) != 1:
        return None
    i, start, end = cut[0]
    stack = w.view[0]
    if len(w.groups[i]) != 1 or w.groups[i][0] not in stack:
        return None
    axis = w.groups[i][0]
    k = stack.index(axis)
    shape = list(w.shape)
    shape[axis] = end - start
    if end - start == 1:    # one layer: the axis leaves the stack (a size-1 axis of no role until squeezed)
        take = lambda a: jax.lax.index_in_dim(a, start, axis=k, keepdims=False)
        view = (tuple(a for a in stack if a != axis),) + tuple(w.view[1:])
    else:
        take = lambda a: jax.lax.slice_in_dim(a, start, end, axis=k)
        view = w.view
    sl = lambda t: jax.tree_util.tree_map(take, t)          # the base may be a quantised Matrix's arrays
    return w.like(base=sl(w.base), s=sl(w.s), shape=tuple(shape), view=view)


def _drop_leading_stack(w: Weight) -> Optional[Weight]:
    """The per-layer :class:`Weight` of a scan over the weight's axis 0, if that is its leading stacked axis."""
    stack, inp, out = w.view
    if not w.groups or len(w.groups[0]) != 1 or not stack or w.groups[0][0] != stack[0]:
        return None
    gone = stack[0]
    re = lambda axes: tuple(a - (a > gone) for a in axes if a != gone)
    return w.like(view=(re(stack), re(inp), re(out)), shape=tuple(n for a, n in enumerate(w.shape) if a != gone),
                  groups=tuple(re(g) for g in w.groups[1:]))


# --- the contraction -----------------------------------------------------------------------------
def _arrange(w: Weight, axes: Sequence[int], role: tuple[int, ...]) -> Optional[list[int]]:
    """The positions of ``axes`` (of the weight's current layout) ordered so their groups concatenate to
    ``role`` (the view's input or output axes, size-1 axes ignored); None when they cannot."""
    big = lambda g: tuple(a for a in g if w.shape[a] != 1)
    want = big(role)
    firsts = {}
    for j, i in enumerate(axes):
        g = big(w.groups[i])
        if g:
            if g[0] not in want:
                return None
            firsts[j] = want.index(g[0])
    order = sorted(firsts, key=firsts.get)
    if tuple(a for j in order for a in big(w.groups[axes[j]])) != want:
        return None
    return order + [j for j in range(len(axes)) if j not in firsts]


def _contract(eqn, x, w: Weight, w_lhs: bool, site, ctx: "_Ctx"):
    """``dot_general(x, W)`` (or ``(W, x)``) through the structured op, or None (with the reason) when the
    contraction does not match the weight's view."""
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    wc, xc, wb, xb = (lc, rc, lb, rb) if w_lhs else (rc, lc, rb, lb)
    stack, inp, out = w.view
    wfree = [i for i in range(len(w.groups)) if i not in wc and i not in wb]
    xfree = [i for i in range(np.ndim(x)) if i not in xc and i not in xb]
    big = lambda axes: tuple(a for a in axes if w.shape[a] != 1)
    kernel_axes = lambda axes: tuple(a for i in axes for a in w.groups[i])
    if big(kernel_axes(wb)) != big(stack) or any(len(big(w.groups[i])) > 1 for i in wb):
        return None, (f"dot_general with batch axes {tuple(wb)} on a weight viewed with stacked axes {stack}")
    c_order, f_order = _arrange(w, wc, inp), _arrange(w, wfree, out)
    if c_order is None or f_order is None:
        return None, (f"dot_general contracting kernel axes {kernel_axes(wc)} and keeping {kernel_axes(wfree)}, "
                      f"not the view's inputs {inp} and outputs {out}")
    xs = jnp.asarray(x)
    d_in, d_out = w.base.shape[-2:]
    nb = len(wb)
    perm = tuple(xb) + tuple(xfree) + tuple(xc[j] for j in c_order)
    lead = tuple(xs.shape[i] for i in xfree)
    tokens = math.prod(lead)
    one = jax.eval_shape(lambda s: jax.tree_util.tree_map(lambda a: a[(0,) * nb], s), w.s) if nb else w.s
    factored = S.prefer_factored(one, (d_in, d_out), tokens) if ctx.mode is None else ctx.mode
    op = lambda x_, b_, s_: structured_matmul(x_, b_, s_, factored=factored, in_scan=ctx.layers > 1)
    for _ in range(nb):
        op = jax.vmap(op)

    def f(x_, b_, s_):
        # x is rearranged to [*batch, tokens, d_in] in here, so the op's residual is the model's own array:
        # one residual for all the weights that contract the same activation (q, k, v), not a copy per use
        xt = jnp.transpose(x_, perm)
        return op(xt.reshape(xt.shape[:nb] + (tokens, d_in)), b_, s_)
    if ctx.layers > 1:
        # inside a scan: the op's residuals are its inputs (x, the layer's base, the structure), which JAX would
        # stack across layers -- a copy of every layer's base per step. Under a checkpoint that saves only dot
        # outputs the backward reads them from the scan's own inputs instead (XLA's peak: one base copy less).
        f = jax.checkpoint(f, prevent_cse=False, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    y = f(xs, w.base, w.s)
    # y [*batch, tokens, d_out] -> the weight's free axes in view order, then in the dot's order
    free_sizes = [w.current_shape[wfree[j]] for j in f_order]
    y = y.reshape(y.shape[:nb] + lead + tuple(free_sizes))
    back = [f_order.index(j) for j in range(len(wfree))]
    nx = len(lead)
    w_part = [nb + nx + k for k in back]
    x_part = list(range(nb, nb + nx))
    y = jnp.transpose(y, tuple(range(nb)) + tuple(w_part + x_part if w_lhs else x_part + w_part))
    aval = eqn.outvars[0].aval
    ctx.record.add(w.path, site, Use("factored" if factored else "materialised", tokens, ctx.layers, remat=ctx.remat))
    return y.reshape(aval.shape).astype(aval.dtype), None


# --- the evaluator -------------------------------------------------------------------------------
def _bind(eqn, args):
    """The equation as it was (as ``jax.core.eval_jaxpr`` binds it; JAX < 0.8 also returned sub-functions)."""
    params = eqn.primitive.get_bind_params(eqn.params)
    subfuns, params = params if isinstance(params, tuple) else ((), params)
    ctx = getattr(getattr(eqn, "ctx", None), "manager", None) or contextlib.nullcontext()
    with ctx:
        out = eqn.primitive.bind(*subfuns, *args, **params)
    return out if eqn.primitive.multiple_results else [out]


_REMAT = ("remat", "remat2", "checkpoint")
_REASONS = {"gather": "gather (embedding lookup)",
            "sharding_constraint": "sharding constraint on the effective weight (kept: it is materialised)",
            "dynamic_slice": "dynamic_slice (a traced index)",
            "while": "while loop", "cond": "cond", "custom_jvp_call": "custom_jvp function",
            "custom_vjp_call": "custom_vjp function", "conv_general_dilated": "convolution"}


class _Ctx(NamedTuple):
    mode: Optional[bool]
    record: Routing
    layers: int = 1
    scan_remat: Optional[Callable] = None     # the checkpoint policy for scan bodies (None: as written)
    remat: str = ""                           # its name, inside a body it applies to


def _materialise(v, ctx: _Ctx, reason: str, site):
    if isinstance(v, Weight):
        ctx.record.add(v.path, site, Use("autodiff", layers=ctx.layers, reason=reason))
        return v.dense()
    return v


def _eval(jaxpr, consts, args, ctx: _Ctx) -> list:
    env: dict = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    def write(vs, vals):
        for v, val in zip(vs, vals):
            if not isinstance(v, jcore.DropVar):
                env[v] = val

    write(jaxpr.constvars, consts)
    write(jaxpr.invars, args)
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        write(eqn.outvars, _rule(eqn, ins, ctx))
    return [_materialise(read(v), ctx, "returned by the loss", ("out", id(v))) for v in jaxpr.outvars]


def _rule(eqn, ins, ctx: _Ctx) -> list:
    weights = [i for i, v in enumerate(ins) if isinstance(v, Weight)]
    name = eqn.primitive.name
    if not weights:
        return _bind(eqn, ins)
    site = id(eqn)
    if name in _FOLLOW and len(weights) == 1 and weights[0] == 0:
        w = _follow(eqn, ins[0])
        if w is not None:
            return [w]
        return _bind(eqn, [_materialise(ins[0], ctx, f"{name} of the kernel", site)] + ins[1:])
    if name == "dot_general" and len(weights) == 1:
        w_lhs = weights[0] == 0
        w, x = (ins[0], ins[1]) if w_lhs else (ins[1], ins[0])
        y, reason = _contract(eqn, x, w, w_lhs, site, ctx)
        if y is not None:
            return [y]
        return _bind(eqn, [_materialise(v, ctx, reason, site) for v in ins])
    if name in ("jit", "pjit", "closed_call", "core_call"):
        inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
        if isinstance(inner, jcore.ClosedJaxpr):
            return _eval(inner.jaxpr, inner.consts, ins, ctx)
        return _eval(inner, [], ins, ctx)
    if name in _REMAT:
        return _remat(eqn, ins, ctx)
    if name == "scan":
        return _scan(eqn, ins, ctx)
    reason = _REASONS.get(name, name)
    return _bind(eqn, [_materialise(v, ctx, reason, site) for v in ins])


def _pack(vals):
    """Weights as ``(base, s)`` pytrees (what JAX transformations can carry) and a function that rebuilds them."""
    shells = [v if isinstance(v, Weight) else None for v in vals]
    flat = [(v.base, v.s) if isinstance(v, Weight) else v for v in vals]

    def unpack(flat_vals):
        return [sh.like(base=fv[0], s=fv[1]) if sh is not None else fv for sh, fv in zip(shells, flat_vals)]
    return flat, unpack


def _remat(eqn, ins, ctx: _Ctx) -> list:
    p = eqn.params
    flat, unpack = _pack(ins)

    def body(*flat_vals):
        return _eval(p["jaxpr"], [], unpack(flat_vals), ctx)
    return list(jax.checkpoint(body, prevent_cse=p["prevent_cse"], policy=p["policy"])(*flat))


def _has_remat(jaxpr) -> bool:
    """Whether ``jaxpr`` (or a jaxpr inside it) holds a ``remat`` / ``jax.checkpoint``."""
    return any(e.primitive.name in _REMAT or any(_has_remat(j) for j in jcore.jaxprs_in_params(e.params))
               for e in jaxpr.eqns)


def _scan(eqn, ins, ctx: _Ctx) -> list:
    p = eqn.params
    nc, nk, length = p["num_consts"], p["num_carry"], p["length"]
    site = id(eqn)
    consts, init, xs = ins[:nc], ins[nc:nc + nk], ins[nc + nk:]
    init = [_materialise(v, ctx, "scan carry", site) for v in init]
    sliced = []
    for v in xs:
        if isinstance(v, Weight):
            per_layer = _drop_leading_stack(v)
            if per_layer is None:
                v = _materialise(v, ctx, "scanned over an axis that is not its leading stacked axis", site)
            else:
                v = per_layer
        sliced.append(v)
    flat_xs, unpack = _pack(sliced)
    body = p["jaxpr"]
    # a body the model already checkpoints keeps the model's own policy
    policy = None if _has_remat(body.jaxpr) else ctx.scan_remat
    name = "" if policy is None else getattr(policy, "__name__", repr(policy))
    inner = ctx._replace(layers=ctx.layers * length, remat=name or ctx.remat)

    def f(carry, x):
        vals = unpack(x)
        outs = _eval(body.jaxpr, body.consts, list(consts) + list(carry) + vals, inner)
        return outs[:nk], outs[nk:]
    if policy is not None:
        f = jax.checkpoint(f, prevent_cse=False, policy=policy)
    carry, ys = jax.lax.scan(f, init, flat_xs, length=length, reverse=p["reverse"], unroll=p["unroll"])
    return list(carry) + list(ys)


def routed_call(fn: Callable, weights: dict[int, Weight], args: tuple, *, mode: Optional[bool],
                record: Routing, scan_remat: Optional[Callable] = None) -> Any:
    """``fn(*args)`` with the leaves of ``args`` at the flat positions in ``weights`` replaced by those
    :class:`Weight` s (``args`` holds an array of the effective weight's shape and dtype there, which is not
    read): traced once to a jaxpr, then evaluated with the weights routed as the module docstring says.
    ``scan_remat``: a ``jax.checkpoint`` policy put around the body of every scan an adapted weight enters
    (None: the body as written)."""
    flat, tree = jax.tree_util.tree_flatten(args)
    abstract = [jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)) if i in weights else a
                for i, a in enumerate(flat)]
    closed, out_shape = jax.make_jaxpr(lambda *xs: fn(*jax.tree_util.tree_unflatten(tree, xs)),
                                       return_shape=True)(*abstract)
    inputs = [weights.get(i, a) for i, a in enumerate(flat)]
    outs = _eval(closed.jaxpr, closed.consts, inputs, _Ctx(mode, record, scan_remat=scan_remat))
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)
