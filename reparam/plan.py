"""Rules -> plan: which leaf of a params pytree gets which transform.

    plan = rp.plan([(r".*/(query|value)/kernel", rp.lora(8, alpha=16)),
                    (r"head/.*", rp.full())], params)
    frozen, trainable = plan.init(key, params)
    params_now = plan.apply(frozen, trainable)      # inside the jitted loss
    merged = plan.merge(frozen, trainable)          # plain params, no inference cost
    print(plan.summary(trainable))

Paths are the '/'-joined key paths of the pytree (a linen variables dict or an
``nnx.State``: nnx's trailing ``value`` attribute is dropped). Rules are
``(regex, transform)`` pairs matched with ``re.fullmatch``, in order: the first
match wins, unmatched leaves stay frozen, a rule that matches nothing is an
error listing near misses. ``frozen`` and ``trainable`` have the params'
structure with, at each leaf, the dicts its transform returned.
"""
from __future__ import annotations

import difflib
import math
import re
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from reparam import matmul, structure, views
from reparam.core import Reparam, ReparamError

PyTree = Any


def path_str(path) -> str:
    """'/'-joined key path; nnx's trailing ``.value`` is dropped."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    if len(path) > 1 and isinstance(path[-1], jax.tree_util.GetAttrKey) and parts[-1] == "value":
        parts.pop()
    return "/".join(parts)


class Leaf(NamedTuple):
    path: str
    shape: tuple[int, ...]
    dtype: Any
    rule: Optional[int]             # index into the rules, None when frozen by default
    transform: Optional[Reparam]    # lifted to the leaf's shape; None when frozen by default
    view: Optional[views.View]


def _wrap_error(leaf: Leaf, rules, err: Exception) -> ReparamError:
    regex = rules[leaf.rule][0]
    return ReparamError(f"parameter '{leaf.path}' {leaf.shape}, rule {leaf.rule} ({regex!r} -> "
                        f"{rules[leaf.rule][1].name}): {err}")


def _owners(leaves: Sequence[Leaf]) -> dict[int, int]:
    """``{rule: index of its first leaf}`` for rules whose transform has shared trainables."""
    owners: dict[int, int] = {}
    for i, leaf in enumerate(leaves):
        if leaf.transform is not None and leaf.transform.shared is not None:
            owners.setdefault(leaf.rule, i)
    return owners


class Plan:
    """A static assignment of transforms to the leaves of one params structure."""

    def __init__(self, rules, leaves: Sequence[Leaf], treedef, trainable_dtype, shapes):
        self.rules, self.leaves, self.treedef = list(rules), tuple(leaves), treedef
        self.trainable_dtype = trainable_dtype
        self._shapes = shapes   # per leaf: (frozen, trainable) ShapeDtypeStructs or None (data-driven)
        self.routing: dict[str, tuple[str, int]] = {}   # filled when a train step traces: path -> (forward, tokens)

    # --- init / apply / merge -------------------------------------------------------------
    def init(self, key: jax.Array, params: PyTree, calib: Optional[dict] = None):
        """``(frozen, trainable)`` for ``params``; ``calib`` maps paths to calibration stats.

        Data-driven transforms (CorDA, EVA, LoRA-SB) read ``calib[path]``, made
        by :func:`reparam.calibrate.capture_inputs` or ``capture_grads`` over ``plan.calibrated()``.
        """
        flat = self.treedef.flatten_up_to(params)
        calib = dict(calib or {})
        known = {leaf.path for leaf in self.leaves if leaf.transform is not None}
        stray = sorted(set(calib) - known)
        if stray:
            raise ReparamError(f"calib has entries for paths no rule adapts: {stray[:5]}; calib keys "
                               f"must be adapted parameter paths, e.g. {sorted(known)[:3]}.")
        frozen, trainable = [], []
        owners = self._owners()
        for i, (leaf, w) in enumerate(zip(self.leaves, flat)):
            if leaf.transform is None:
                frozen.append({"base": w})
                trainable.append({})
                continue
            t = leaf.transform
            c = calib.get(leaf.path)
            if t.calib and c is None:
                raise _wrap_error(leaf, self.rules, ReparamError(
                    f"this transform needs calibration data ({t.calib}) and calib has none for this path; "
                    "pass calib=rp.capture_inputs(...) (or rp.capture_grads(...)) to plan.init."))
            try:
                f, tr = t.init(jax.random.fold_in(key, i), w, c)
            except ReparamError as e:
                raise _wrap_error(leaf, self.rules, e) from None
            if i in owners.values():
                tr = {**tr, "shared": self.rules[leaf.rule][1].shared(jax.random.fold_in(key, len(self.leaves) + leaf.rule))}
            tr = jax.tree_util.tree_map(self._cast, tr)
            frozen.append(f)
            trainable.append(tr)
        return self.treedef.unflatten(frozen), self.treedef.unflatten(trainable)

    def _cast(self, x):
        """A fresh buffer (train steps donate trainables; never the caller's params), in the trainable dtype."""
        floating = self.trainable_dtype is not None and jnp.issubdtype(x.dtype, jnp.floating)
        return jnp.array(x, dtype=self.trainable_dtype if floating else x.dtype, copy=True)

    def _owners(self) -> dict[int, int]:
        return _owners(self.leaves)

    def _per_leaf(self, trainable: PyTree):
        """``[(trainable without "shared", kwargs)]`` per leaf, ``kwargs`` carrying the rule's shared trainables."""
        tl = self.treedef.flatten_up_to(trainable)
        shared = {rule: tl[i]["shared"] for rule, i in self._owners().items()}
        out = []
        for leaf, tr in zip(self.leaves, tl):
            if leaf.rule in shared:
                out.append(({k: v for k, v in tr.items() if k != "shared"}, {"shared": shared[leaf.rule]}))
            else:
                out.append((tr, {}))
        return out

    def apply(self, frozen: PyTree, trainable: PyTree, rng: Optional[jax.Array] = None) -> PyTree:
        """The effective params. ``rng`` drives stochastic transforms (DyLoRA); ``None`` = eval."""
        return self.routed(frozen, trainable, rng, route=False)[0]

    def routed(self, frozen: PyTree, trainable: PyTree, rng: Optional[jax.Array] = None, *,
               route: bool = True) -> tuple[PyTree, dict]:
        """``(params, hot)``: the effective params (as :meth:`apply`) and, for each adapted leaf whose
        transform declares a ΔW structure on an un-stacked view, a :class:`reparam.matmul.Hot` keyed by
        the id of its array in ``params`` -- what :func:`reparam.matmul.intercept` routes."""
        fl = self.treedef.flatten_up_to(frozen)
        out, hot = [], {}
        for i, (leaf, f, (tr, kw)) in enumerate(zip(self.leaves, fl, self._per_leaf(trainable))):
            t = leaf.transform
            if t is None:
                out.append(f["base"])
                continue
            if t.stochastic:
                kw = {**kw, "rng": None if rng is None else jax.random.fold_in(rng, i)}
            w = t.apply(f, tr, **kw)
            out.append(w)
            if route and t.structure is not None and leaf.view is not None and not leaf.view.batch:
                hot[id(w)] = matmul.Hot(w, views.to_matrix(leaf.view, f["base"]), t.structure(f, tr, **kw),
                                        leaf.view, leaf.path)
        return self.treedef.unflatten(out), hot

    def merge(self, frozen: PyTree, trainable: PyTree) -> PyTree:
        """Bakes every transform into plain params (eval mode): zero inference cost."""
        return jax.jit(self.apply)(frozen, trainable)

    def penalty(self, frozen: PyTree, trainable: PyTree):
        """Sum of the regularisers the transforms define (e.g. SORSA); 0.0 when none do."""
        fl = self.treedef.flatten_up_to(frozen)
        return sum((leaf.transform.penalty(f, tr, **kw) for leaf, f, (tr, kw) in
                    zip(self.leaves, fl, self._per_leaf(trainable))
                    if leaf.transform is not None and leaf.transform.penalty is not None), jnp.float32(0))

    # --- inspection -------------------------------------------------------------------------
    def adapted(self) -> list[str]:
        """Paths that a rule matched."""
        return [leaf.path for leaf in self.leaves if leaf.transform is not None]

    def calibrated(self) -> dict[str, str]:
        """``{path: what}`` for transforms that need calibration in ``plan.init(..., calib=)``:
        ``"cov"`` (layer-input covariance, :func:`~reparam.calibrate.capture_inputs`) or ``"grad"``
        (full fine-tuning gradient, :func:`~reparam.calibrate.capture_grads`)."""
        return {leaf.path: leaf.transform.calib for leaf in self.leaves
                if leaf.transform is not None and leaf.transform.calib}

    def trainable_counts(self, trainable: Optional[PyTree] = None) -> list[Optional[int]]:
        """Trainable entries per leaf (from ``trainable`` or the plan's shapes)."""
        if trainable is not None:
            return [sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tr))
                    for tr in self.treedef.flatten_up_to(trainable)]
        return [None if s is None else sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(s[1]))
                for s in self._shapes]

    def matmul_routes(self, trainable: Optional[PyTree] = None) -> dict[str, Optional[int]]:
        """``{path: crossover}`` for every adapted leaf: the train step's forward is factored below
        ``crossover`` tokens per call and materialised above (:func:`reparam.structure.crossover`);
        ``None`` where the leaf trains by plain autodiff (no structure, or a stacked view), ``-1``
        where the shapes are not known yet (a data-driven init before ``plan.init``)."""
        if trainable is None:
            trainable = self.treedef.unflatten([{} if s is None else s[1] for s in self._shapes])
        out = {}
        for leaf, s, (tr, kw) in zip(self.leaves, self._shapes, self._per_leaf(trainable)):
            t = leaf.transform
            if t is None:
                continue
            if t.structure is None or leaf.view is None or leaf.view.batch:
                out[leaf.path] = None
            elif s is None or not tr:
                out[leaf.path] = -1
            else:
                st = jax.eval_shape(lambda f, x: t.structure(f, x, **kw), s[0], tr)
                m = views.to_matrix(leaf.view, np.empty(leaf.shape, np.int8)).shape
                out[leaf.path] = structure.crossover(st, m)
        return out

    def _matmul_cell(self, path: str, crossover: Optional[int]) -> str:
        if crossover is None:
            return "autodiff"
        rule = "custom-vjp" if crossover < 0 else f"custom-vjp, factored < {crossover} tok"
        if path in self.routing:
            mode, tokens = self.routing[path]
            return f"{mode} @ {tokens} tok ({rule})"
        return rule

    def summary(self, trainable: Optional[PyTree] = None) -> str:
        """A table of adapted paths: shape, matrix view, transform, train-step matmul, trainable count; totals.

        The matmul column says how the train step computes the leaf: ``autodiff`` (through the
        materialised weight) or ``custom-vjp`` with the token count below which its forward is
        factored; after a train step has been traced, the forward it chose at how many tokens.
        """
        counts = self.trainable_counts(trainable)
        routes = self.matmul_routes(trainable)
        rows = [("path", "shape", "view", "transform", "matmul", "trainable")]
        n_total = sum(math.prod(leaf.shape) for leaf in self.leaves)
        n_frozen_leaves = 0
        for leaf, c in zip(self.leaves, counts):
            if leaf.transform is None:
                n_frozen_leaves += 1
                continue
            v = leaf.view
            view = "" if v is None or v.is_trivial() else f"b{v.batch} in{v.inp} out{v.out}"
            rows.append((leaf.path, "x".join(map(str, leaf.shape)), view, leaf.transform.name,
                         self._matmul_cell(leaf.path, routes[leaf.path]), "?" if c is None else f"{c:,}"))
        n_train = sum(c or 0 for c in counts)
        widths = [max(len(r[j]) for r in rows) for j in range(6)]
        fmt = lambda r: "  ".join(x.rjust(w) if j == 5 else x.ljust(w) for j, (x, w) in enumerate(zip(r, widths)))
        lines = [fmt(rows[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows[1:]]
        lines.append(f"{n_frozen_leaves} other leaves frozen.")
        for i, (regex, t) in enumerate(self.rules):
            hits = [c for leaf, c in zip(self.leaves, counts) if leaf.rule == i]
            lines.append(f"rule {i}: {regex!r} -> {t.name}: {len(hits)} leaves, "
                         f"{sum(c or 0 for c in hits):,} trainable")
        pending = any(c is None for leaf, c in zip(self.leaves, counts) if leaf.transform is not None)
        unknown = " (data-driven leaves not yet initialised: pass trainable)" if pending else ""
        lines.append(f"total: {n_train:,} trainable of {n_total:,} base params "
                     f"({100.0 * n_train / max(n_total, 1):.4f}%){unknown}")
        return "\n".join(lines)

    def __repr__(self):
        return self.summary()


def plan(rules: Sequence[tuple[str, Reparam]], params: PyTree, *,
         trainable_dtype=jnp.float32) -> Plan:
    """Assigns each leaf of ``params`` the transform of the first rule whose regex fullmatches its path.

    Shapes are checked here, abstractly (``jax.eval_shape``), so a rank above
    ``min(d_in, d_out)`` or an undeclared matrix view fails before any work,
    with the path, the rule and the fix. Trainable arrays are cast to
    ``trainable_dtype`` (f32 by default, so a bf16 base trains f32 adapters;
    ``None`` keeps the dtype the transform produced).
    """
    for i, r in enumerate(rules):
        if not (isinstance(r, tuple) and len(r) == 2 and isinstance(r[0], str) and isinstance(r[1], Reparam)):
            raise ReparamError(f"rule {i} must be a (regex, transform) pair like "
                               f"(r'.*/query/kernel', rp.lora(8)); got {r!r}.")
    compiled = [re.compile(regex) for regex, _ in rules]
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    leaves, used = [], [0] * len(rules)
    for path, w in flat:
        p, shape = path_str(path), tuple(np.shape(w))
        dtype = getattr(w, "dtype", np.asarray(w).dtype)
        hit = next((i for i, c in enumerate(compiled) if c.fullmatch(p)), None)
        if hit is None:
            leaves.append(Leaf(p, shape, dtype, None, None, None))
            continue
        used[hit] += 1
        t = rules[hit][1]
        if len(shape) < 2 and t.name != "full":
            raise ReparamError(f"parameter '{p}' {shape}, rule {hit} ({rules[hit][0]!r} -> {t.name}): "
                               "a matrix transform needs a kernel with >= 2 dims; narrow the regex "
                               "(e.g. end it in '/kernel') or use rp.full() for biases and scales.")
        view = views.resolve(p, shape, t, rules[hit][0]) if len(shape) >= 2 else None
        lifted = views.viewed(t, view, shape) if view is not None else t
        leaves.append(Leaf(p, shape, dtype, hit, lifted, view))
    unused = [i for i, n in enumerate(used) if n == 0]
    if unused:
        paths = [leaf.path for leaf in leaves]
        msgs = []
        for i in unused:
            regex = rules[i][0]
            near = difflib.get_close_matches(regex, paths, n=3, cutoff=0.3)
            partial = [p for p in paths if re.search(regex, p)][:3]
            msgs.append(f"rule {i} ({regex!r} -> {rules[i][1].name}) matches no parameter path"
                        + (f"; it matches part of {partial} (rules use re.fullmatch: prefix with '.*/'?)"
                           if partial else "")
                        + (f"; near misses: {near}" if near else ""))
        raise ReparamError("; ".join(msgs) + f". Paths look like {paths[:3]}. Fix or remove the rule.")
    shapes, key = [], jax.random.key(0)
    for leaf in leaves:
        if leaf.transform is None or leaf.transform.calib:
            shapes.append(None)
            continue
        try:
            shapes.append(jax.eval_shape(leaf.transform.init, key, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)))
        except ReparamError as e:
            raise _wrap_error(leaf, rules, e) from None
    for rule, i in _owners(leaves).items():    # shared trainables count once, at the rule's first leaf
        if shapes[i] is not None:
            shapes[i] = (shapes[i][0], {**shapes[i][1], "shared": jax.eval_shape(rules[rule][1].shared, key)})
    return Plan(rules, leaves, treedef, trainable_dtype, shapes)
