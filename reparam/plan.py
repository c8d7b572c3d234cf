"""Rules -> plan: which leaf of a params pytree gets which transform.

    plan = rp.plan([(r".*/(query|value)/kernel", rp.lora(8, alpha=16)),
                    (r"head/.*", rp.full())], params)
    frozen, trainable = plan.init(key, params)
    params_now = plan.apply(frozen, trainable)      # inside the jitted loss
    merged = plan.merge(frozen, trainable)          # plain params, no inference cost
    merged_q = plan.merge(frozen, trainable, requantize=True)   # quantised bases: merged in their own formats
    print(plan.summary(trainable))

Paths are the '/'-joined key paths of the pytree (a linen variables dict or an
``nnx.State``: nnx's trailing ``value`` attribute is dropped). Rules are
``(regex, transform)`` pairs matched with ``re.fullmatch``, in order: the first
match wins, unmatched leaves stay frozen, a rule that matches nothing is an
error listing near misses. ``frozen`` and ``trainable`` have the params'
structure with, at each leaf, the dicts its transform returned.

A leaf may be a quantised array (:class:`reparam.quant.QArray`): the plan sees its logical shape and dtype,
each transform is initialised from the dequantised weight, and ``frozen`` keeps the base quantised (a
rewritten base, PiSSA's residual, is re-quantised in the same format: QPiSSA); ``apply`` / ``merge``
dequantise every quantised array in ``frozen`` where it is used (``merge(..., requantize=True)``: the merged
weights quantised again, each in its base's format).
"""
from __future__ import annotations

import difflib
import math
import re
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from reparam import quant, structure, views
from reparam.core import Reparam, ReparamError, check_finite

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


def _sig(x) -> str:
    """``float32[8, 2]``: an array's (or ShapeDtypeStruct's) dtype and shape."""
    dtype = x.dtype if hasattr(x, "dtype") else np.result_type(x)
    name = str(dtype) if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) else np.dtype(dtype).name
    return f"{name}{list(x.shape if hasattr(x, 'shape') else np.shape(x))}"


def sig_diff(want: dict, got: dict) -> list[str]:
    """What differs between two flat ``{entry: array or ShapeDtypeStruct}``: ``"'A': expected float32[8, 2], got
    float32[8, 4]"``, ``"unexpected entry 'C' ..."`` (in ``got`` only), ``"missing 'B' ..."`` (in ``want`` only)."""
    return ([f"'{k}': expected {_sig(w)}, got {_sig(got[k])}" for k, w in want.items()
             if k in got and _sig(got[k]) != _sig(w)]
            + [f"unexpected entry '{k}' {_sig(x)}" if k else f"a bare {_sig(x)} in place of the entries"
               for k, x in got.items() if k not in want]
            + [f"missing '{k}' {_sig(x)}" for k, x in want.items() if k not in got])


def _where(plan: Plan, leaf: Leaf) -> str:
    if leaf.rule is None:
        return f"parameter '{leaf.path}', not adapted by any rule"
    return f"parameter '{leaf.path}', rule {leaf.rule} ({plan.rules[leaf.rule][0]!r} -> {plan.rules[leaf.rule][1].name})"


def _check_tree(plan: Plan, which: str, tree: PyTree) -> None:
    """:meth:`Plan.check` of one tree: the params' structure, then each leaf's entries against ``plan.abstract``."""
    fix = (f"Pass the {which} tree that this plan's init returned (plan.init(key, params)); trees, checkpoints or "
           "adapters of another plan (method, rank, rules) do not fit it.")
    want = plan.abstract(which)
    try:
        parts = plan.treedef.flatten_up_to(tree)
    except (ValueError, TypeError) as e:
        index = {leaf.path: i for i, leaf in enumerate(plan.leaves)}

        def leaf_of(p):         # the plan leaf an entry lies under (nnx's '.value' may follow its path), or None
            while p and p not in index:
                p = p.rpartition("/")[0]
            return index.get(p)
        paths = [path_str(k) for k, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
        stray = [p for p in paths if leaf_of(p) is None]
        under = {leaf_of(p) for p in paths}
        absent = [leaf.path for i, leaf in enumerate(plan.leaves) if i not in under and want[i] != {}]
        raise ReparamError(f"{which} does not have the structure of this plan's params: entries under no parameter "
                           f"of the plan: {stray[:5]}; parameters with no entries: {absent[:5]} "
                           f"({str(e).splitlines()[0][:200]}). {fix}") from None
    problems = []
    for leaf, w, part in zip(plan.leaves, want, parts):
        got = jax.tree_util.tree_flatten_with_path(part, is_leaf=quant.is_quantized)[0]   # a QArray: its logical sig
        msgs = [] if w is None else sig_diff(w, {path_str(k): x for k, x in got})
        if msgs:
            problems.append(f"{_where(plan, leaf)}: " + ", ".join(msgs[:4])
                            + (f" (and {len(msgs) - 4} more)" if len(msgs) > 4 else ""))
    if problems:
        raise ReparamError(f"{which} does not fit this plan: " + "; ".join(problems[:6])
                           + (f"; and {len(problems) - 6} more parameters" if len(problems) > 6 else "") + f". {fix}")


def flat_diff(saved: dict, now: dict, ignore: Sequence[str] = ()) -> list[str]:
    """``"key: saved X, now Y"`` for every entry of two nested JSON dicts that differs (dotted keys; keys whose
    last part is in ``ignore`` skipped)."""
    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out
    a, b = flat(saved), flat(now)
    return [f"{k}: saved {a.get(k, '<absent>')!r}, now {b.get(k, '<absent>')!r}"
            for k in sorted(set(a) | set(b)) if k.split(".")[-1] not in set(ignore) and a.get(k) != b.get(k)]


def fingerprint_diff(saved: dict, now: dict) -> list[str]:
    """What differs between two :meth:`Plan.fingerprint` s, per adapted parameter: ``"'q/kernel'
    transform.hparams.alpha: saved 16, now 8"``, or a parameter adapted by only one. The rules' regexes are
    not compared: two plans that adapt the same leaves alike are the same plan."""
    out = [] if saved.get("trainable_dtype") == now.get("trainable_dtype") else \
        [f"trainable_dtype: saved {saved.get('trainable_dtype')!r}, now {now.get('trainable_dtype')!r}"]
    a, b = saved.get("leaves", {}), now.get("leaves", {})
    for p in sorted(set(a) | set(b)):
        if p not in b or p not in a:
            t = (a.get(p) or b.get(p))["transform"]
            out.append(f"'{p}': saved {'adapted by ' + repr(t['method']) if p in a else 'not adapted'}, "
                       f"now {'adapted by ' + repr(t['method']) if p in b else 'not adapted'}")
        else:
            out += [f"'{p}' {d}" for d in flat_diff(a[p], b[p])]
    return out


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
            t, q, w = leaf.transform, w, quant.dequantize(w)
            c = calib.get(leaf.path)
            if t.calib and c is None:
                raise _wrap_error(leaf, self.rules, ReparamError(
                    f"this transform needs calibration data ({t.calib}) and calib has none for this path; "
                    "pass calib=rp.capture_inputs(...) (or rp.capture_grads(...)) to plan.init."))
            try:
                check_finite(w, "the weight", "any adapter on it trains on inf/NaN outputs (and an "
                             "SVD-based init such as PiSSA's can hang on it); fix the pretrained weights (an overflow when they were saved?) or "
                             "leave this parameter out of the rule.")
                for k, v in (c or {}).items():
                    check_finite(v, f"calib[{k!r}]", "recompute the calibration statistics from finite batches "
                                 "(rp.capture_inputs / rp.capture_grads refuse non-finite ones).")
                f, tr = t.init(jax.random.fold_in(key, i), w, c)
            except ReparamError as e:
                raise _wrap_error(leaf, self.rules, e) from None
            f = quant.rebase(f, q, w, leaf.path)
            if i in owners.values():
                tr = {**tr, "shared": self.rules[leaf.rule][1].shared(jax.random.fold_in(key, len(self.leaves) + leaf.rule))}
            tr = jax.tree_util.tree_map(self._cast, tr)
            frozen.append(f)
            trainable.append(tr)
        return self.treedef.unflatten(frozen), self.treedef.unflatten(trainable)

    def _cast_dtype(self, dtype):
        """The dtype of a trainable that ``init`` produced as ``dtype``: floats in ``trainable_dtype``."""
        floating = self.trainable_dtype is not None and jnp.issubdtype(dtype, jnp.floating)
        return jnp.dtype(self.trainable_dtype if floating else dtype)

    def _cast(self, x):
        """A fresh buffer (train steps donate trainables; never the caller's params), in the trainable dtype."""
        return jnp.array(x, dtype=self._cast_dtype(x.dtype), copy=True)

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

    # --- the trees' shapes, checked at trace time ------------------------------------------------
    def abstract(self, which: str) -> list[Optional[dict]]:
        """Per leaf, ``{entry: ShapeDtypeStruct}`` of its ``which`` (``"frozen"`` or ``"trainable"``) dict as
        ``plan.init`` makes it (entries '/'-joined, trainables in ``trainable_dtype``); ``None`` for a
        data-driven leaf, whose shapes the calibration data decide."""
        out = []
        for leaf, s in zip(self.leaves, self._shapes):
            if leaf.transform is None:
                s = ({"base": jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)}, {})
            if s is None:
                out.append(None)
                continue
            tree = s[0] if which == "frozen" else jax.tree_util.tree_map(
                lambda x: jax.ShapeDtypeStruct(x.shape, self._cast_dtype(x.dtype)), s[1])
            out.append({path_str(k): x for k, x in jax.tree_util.tree_flatten_with_path(tree)[0]})
        return out

    def check(self, frozen: Optional[PyTree] = None, trainable: Optional[PyTree] = None) -> None:
        """Raises a :class:`ReparamError` unless ``frozen`` / ``trainable`` have the entries, shapes and dtypes
        ``plan.init`` gives them: the trees of another plan (another method, rank or rule), an entry too many or
        too few. Pure Python on shapes: under ``jit`` it runs once, at trace time (:meth:`apply`, :meth:`merge`
        and the train step call it). Data-driven leaves (CorDA, EVA), whose shapes the calibration data decide,
        are checked for their place in the tree only. Trees alike in every shape (a LoRA's and a PiSSA's of one
        rank) pass: a checkpoint's :meth:`fingerprint` tells those apart."""
        for which, tree in (("frozen", frozen), ("trainable", trainable)):
            if tree is not None:
                _check_tree(self, which, tree)

    def _entries(self, frozen: PyTree, trainable: PyTree) -> list:
        """``[(i, leaf, frozen entry, trainable entry, kwargs)]`` once both trees are checked (:meth:`check`)."""
        self.check(frozen, trainable)
        fl = self._frozen(frozen)
        return [(i, leaf, f, tr, kw) for i, (leaf, f, (tr, kw)) in
                enumerate(zip(self.leaves, fl, self._per_leaf(trainable)))]

    def apply(self, frozen: PyTree, trainable: PyTree, rng: Optional[jax.Array] = None) -> PyTree:
        """The effective params. ``rng`` drives stochastic transforms (DyLoRA); ``None`` = eval."""
        return self.treedef.unflatten(self.leaf_values(frozen, trainable, rng))

    def _frozen(self, frozen: PyTree) -> list:
        """Each leaf's frozen entry, quantised arrays dequantised (inside a jitted step XLA fuses it into the use)."""
        return [quant.dequantize(f) for f in self.treedef.flatten_up_to(frozen)]

    def leaf_values(self, frozen: PyTree, trainable: PyTree, rng: Optional[jax.Array] = None,
                    skip: Sequence[int] = ()) -> list:
        """The effective weight of each leaf (as :meth:`apply`, flat), ``None`` at the indices in ``skip``."""
        out = []
        for i, leaf, f, tr, kw in self._entries(frozen, trainable):
            t = leaf.transform
            out.append(None if i in skip else f["base"] if t is None else t.apply(f, tr, **self._kw(t, kw, rng, i)))
        return out

    @staticmethod
    def _kw(t: Reparam, kw: dict, rng, i: int) -> dict:
        if t.stochastic:
            return {**kw, "rng": None if rng is None else jax.random.fold_in(rng, i)}
        return kw

    def structures(self, frozen: PyTree, trainable: PyTree, rng: Optional[jax.Array] = None) -> list:
        """Per leaf, ``(base, s)`` where its transform declares a ΔW structure (:mod:`reparam.structure`):
        the frozen base as its ``[*stacked, d_in, d_out]`` matrix view and the structure (batched over
        stacked axes); ``None`` elsewhere. What the train step's routing (:mod:`reparam.route`) consumes. The
        base is a :class:`reparam.views.Matrix` where that defers work to the op, per layer (a quantised base
        dequantised there, a view that needs a transpose transposed there: :func:`reparam.views.matrix`), and
        the matrix itself otherwise (a quantised base whose stacked axes do not lead dequantised here)."""
        out = []
        stored = self.treedef.flatten_up_to(frozen)
        for i, leaf, f, tr, kw in self._entries(frozen, trainable):
            t = leaf.transform
            if t is None or t.structure is None or leaf.view is None:
                out.append(None)
            else:
                base = views.matrix(stored[i]["base"], leaf.view)
                base = views.to_matrix(leaf.view, f["base"]) if base is None else base
                out.append((base, t.structure(f, tr, **self._kw(t, kw, rng, i))))
        return out

    def merge(self, frozen: PyTree, trainable: PyTree, *, requantize: bool = False) -> PyTree:
        """Bakes every transform into plain params (eval mode): zero inference cost.

        Full-precision weights (each in its logical dtype), quantised bases dequantised. ``requantize=True``:
        each adapted leaf whose frozen base is quantised comes back quantised as that base is
        (:func:`reparam.quant.requantize`: its format, block, axis and double quantisation), so the merged
        model is held in the base's own bytes, within that format's error of the full-precision merge; a leaf
        no rule adapts keeps its quantised base as it is (no round trip), and a leaf trained in full (no frozen
        base) stays full precision."""
        merged = jax.jit(self.apply)(frozen, trainable)
        if not requantize:
            return merged
        out = []
        for leaf, w, f in zip(self.leaves, self.treedef.flatten_up_to(merged), self.treedef.flatten_up_to(frozen)):
            base = f.get("base")
            if not quant.is_quantized(base):
                out.append(w)
            else:
                out.append(base if leaf.transform is None else quant.requantize(w, base, leaf.path))
        return self.treedef.unflatten(out)

    def penalty(self, frozen: PyTree, trainable: PyTree):
        """Sum of the regularisers the transforms define (e.g. SORSA); 0.0 when none do."""
        return sum((leaf.transform.penalty(f, tr, **kw) for _, leaf, f, tr, kw in self._entries(frozen, trainable)
                    if leaf.transform is not None and leaf.transform.penalty is not None), jnp.float32(0))

    # --- fingerprint ------------------------------------------------------------------------
    def fingerprint(self) -> dict:
        """What this plan trains, JSON-able: its rules, and for each adapted leaf its transform's identity and
        hyperparameters (:meth:`reparam.core.Ident.fields`), shape, dtype and trainable entries. Saved with
        checkpoints (:mod:`reparam.checkpoint`) and PEFT exports; :func:`fingerprint_diff` compares two."""
        return {"format": 1, "rules": [{"regex": r, "transform": t.ident.fields()} for r, t in self.rules],
                "trainable_dtype": None if self.trainable_dtype is None else jnp.dtype(self.trainable_dtype).name,
                "leaves": {leaf.path: {"transform": leaf.transform.ident.fields(), "shape": list(leaf.shape),
                                       "dtype": np.dtype(leaf.dtype).name,
                                       **({} if a is None else {"trainable": {k: _sig(x) for k, x in a.items()}})}
                           for leaf, a in zip(self.leaves, self.abstract("trainable")) if leaf.rule is not None}}

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

    def crossovers(self, trainable: Optional[PyTree] = None) -> dict[str, Optional[int]]:
        """``{path: tokens}`` for every adapted leaf: below this many tokens per call the structured op's
        forward is factored, from it materialised (:func:`reparam.structure.crossover`, per layer for
        stacked kernels); ``None`` where the transform declares no ΔW structure (plain autodiff), ``-1``
        where the shapes are not known yet (a data-driven init before ``plan.init``)."""
        if trainable is None:
            trainable = self.treedef.unflatten([{} if s is None else s[1] for s in self._shapes])
        out = {}
        for leaf, s, (tr, kw) in zip(self.leaves, self._shapes, self._per_leaf(trainable)):
            t = leaf.transform
            if t is None:
                continue
            if t.structure is None or leaf.view is None:
                out[leaf.path] = None
            elif s is None or not tr:
                out[leaf.path] = -1
            else:
                st = jax.eval_shape(lambda f, x: t.structure(f, x, **kw), s[0], tr)
                nb = len(leaf.view.batch)
                st = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape[nb:], a.dtype), st)
                m = views.to_matrix(leaf.view, np.empty(leaf.shape, np.int8)).shape[-2:]
                out[leaf.path] = structure.crossover(st, m)
        return out

    def _matmul_cell(self, leaf: Leaf, routing) -> str:
        if leaf.transform.structure is None or leaf.view is None:
            return "autodiff (no ΔW structure)"
        if routing is None:
            return "structured (untraced)"
        return routing.cell(leaf.path)

    def summary(self, trainable: Optional[PyTree] = None, routing=None, frozen: Optional[PyTree] = None) -> str:
        """A table of adapted paths: shape, matrix view, transform, train-step matmul, trainable count; totals.

        The matmul column says how a train step computes each leaf's uses. Without ``routing``: ``autodiff (no
        ΔW structure)``, or ``structured (untraced)`` for a transform whose structure a step may route. With
        ``routing=step.routing`` (:class:`reparam.route.Routing`, filled when the step was traced): how many
        of the leaf's uses in the loss ran the structured op, with the forward each chose and its tokens
        per call, and the reason of each use that fell back to plain autodiff. With ``frozen``: a ``base`` column
        (each base's format -- a quantised one's, :mod:`reparam.quant` -- and bytes) and a line of the frozen
        tree's bytes per format.
        """
        counts = self.trainable_counts(trainable)
        bases = [()] * len(self.leaves) if frozen is None else \
            [(quant.describe(f["base"]) if "base" in f else "",) for f in self.treedef.flatten_up_to(frozen)]
        rows = [("path", "shape", "view", "transform", "matmul", "trainable") + (() if frozen is None else ("base",))]
        n_total = sum(math.prod(leaf.shape) for leaf in self.leaves)
        n_frozen_leaves = 0
        for leaf, c, base in zip(self.leaves, counts, bases):
            if leaf.transform is None:
                n_frozen_leaves += 1
                continue
            v = leaf.view
            view = "" if v is None or v.is_trivial() else f"b{v.batch} in{v.inp} out{v.out}"
            rows.append((leaf.path, "x".join(map(str, leaf.shape)), view, leaf.transform.name,
                         self._matmul_cell(leaf, routing), "?" if c is None else f"{c:,}") + base)
        n_train = sum(c or 0 for c in counts)
        widths = [max(len(r[j]) for r in rows) for j in range(len(rows[0]))]
        fmt = lambda r: "  ".join(x.rjust(w) if j >= 5 else x.ljust(w) for j, (x, w) in enumerate(zip(r, widths)))
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
        if frozen is not None:
            lines.append(quant.report(frozen))
        return "\n".join(lines)

    def __repr__(self):
        return self.summary()


def _check_trainable_dtype(trainable_dtype) -> None:
    """``trainable_dtype`` must be a floating dtype or ``None``: trainables are what the optimizer moves."""
    try:
        ok = trainable_dtype is None or jnp.issubdtype(jnp.dtype(trainable_dtype), jnp.floating)
    except TypeError:
        ok = False
    if not ok:
        raise ReparamError(f"plan: trainable_dtype={trainable_dtype!r} must be a floating dtype (e.g. "
                           "trainable_dtype=jnp.float32 or jnp.bfloat16), or None to keep each transform's dtype.")


def plan(rules: Sequence[tuple[str, Reparam]], params: PyTree, *,
         trainable_dtype=jnp.float32, model=None, example: Sequence = (),
         stacked: Optional[str] = None) -> Plan:
    """Assigns each leaf of ``params`` the transform of the first rule whose regex fullmatches its path.

    Shapes are checked here, abstractly (``jax.eval_shape``), so a rank above
    ``min(d_in, d_out)`` or an undeclared matrix view fails before any work,
    with the path, the rule and the fix. Trainable arrays are cast to
    ``trainable_dtype`` (f32 by default, so a bf16 base trains f32 adapters;
    ``None`` keeps the dtype the transform produced).

    ``model``: the function that uses the params, called as ``model(params, *example)`` (a loss
    ``(params, batch, rng)`` with ``example=(batch, rng)``; arrays or ``jax.ShapeDtypeStruct`` s). It is
    traced abstractly once, and each adapted kernel's matrix view is read from the contractions that
    consume it (:func:`reparam.views.derive`): contracted kernel axes are inputs, kept ones outputs, dot
    batch axes and axes scanned one layer at a time are stacked. Einsum / DenseGeneral / NNX kernels of any
    rank then need no :func:`~reparam.views.on_axes`; a declared view that contradicts the contraction, or
    a kernel contracted in two incompatible ways, is an error. Kernels the model does not contract keep
    the view from their declaration or name.

    ``stacked``: a regex of the paths whose leading axis stacks layers (``nn.scan`` / ``nnx.scan`` /
    ``lax.scan`` over ``[layers, ...]`` kernels), declared once for every rule instead of
    ``rp.on_axes(t, batch_axes=(0,))`` per rule: each layer gets its own adapter.
    """
    _check_trainable_dtype(trainable_dtype)
    for i, r in enumerate(rules):
        if not (isinstance(r, tuple) and len(r) == 2 and isinstance(r[0], str) and isinstance(r[1], Reparam)):
            raise ReparamError(f"rule {i} must be a (regex, transform) pair like "
                               f"(r'.*/query/kernel', rp.lora(8)); got {r!r}.")
    compiled = []
    for i, (regex, t) in enumerate(rules):
        try:
            compiled.append(re.compile(regex))
        except re.error as e:
            raise ReparamError(f"rule {i} ({regex!r} -> {t.name}): invalid regex: {e}. Fix the regex (Python re "
                               "syntax, matched with re.fullmatch against '/'-joined paths; re.escape() a literal "
                               "path).") from None
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=quant.is_quantized)
    derived = {}
    if model is not None:
        matched = {path_str(k) for k, _ in flat if any(c.fullmatch(path_str(k)) for c in compiled)}
        derived = views.derive(model, params, tuple(example), matched)
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
        if len(shape) < 2 and t.ident.method != "full":
            raise ReparamError(f"parameter '{p}' {shape}, rule {hit} ({rules[hit][0]!r} -> {t.name}): "
                               "a matrix transform needs a kernel with >= 2 dims; narrow the regex "
                               "(e.g. end it in '/kernel') or use rp.full() for biases and scales.")
        if t.ident.method != "frozen" and not jnp.issubdtype(dtype, jnp.floating):
            raise _wrap_error(Leaf(p, shape, dtype, hit, t, None), rules, ReparamError(
                f"{t.name} trains a floating-point weight, and this leaf is {np.dtype(dtype).name} (an integer "
                "or boolean leaf has no gradient); exclude it from the rule (narrow the regex, e.g. end it in "
                "'/kernel'), or give the plan float params."))
        whole = t.ident.method == "full"           # trains the leaf as is, whatever its rank: no matrix view
        if stacked is not None and not whole and re.fullmatch(stacked, p) and not (t.axes and t.axes.batch):
            t = t._replace(axes=views.Axes((0,), *(t.axes[1:] if t.axes else (None, None))))
        if len(shape) < 2 or whole:
            view = None
        elif p in derived:
            view = views.from_uses(p, shape, derived[p], rules[hit][0])
            views.check_declared(p, shape, t, view, rules[hit][0])
        else:
            view = views.resolve(p, shape, t, rules[hit][0])
        lifted = views.viewed(t, view, shape) if view is not None else t
        leaves.append(Leaf(p, shape, dtype, hit, lifted, view))
    unused = [i for i, n in enumerate(used) if n == 0]
    if unused:
        paths = [leaf.path for leaf in leaves]
        msgs = []
        for i in unused:
            regex = rules[i][0]
            hits = [leaf for leaf in leaves if compiled[i].fullmatch(leaf.path)]
            if hits:            # it matches, but an earlier rule took every path it matches
                firsts = sorted({leaf.rule for leaf in hits})
                msgs.append(f"rule {i} ({regex!r} -> {rules[i][1].name}) is shadowed: every path it matches "
                            f"({[leaf.path for leaf in hits[:3]]}) is taken by earlier rule(s) {firsts} (the first "
                            f"match wins); move rule {i} before them or narrow their regex")
                continue
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
