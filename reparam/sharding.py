"""Sharding with JAX's own engine: a mesh, regex partition rules for the base, adapter specs derived from it.

    mesh = rp.sharding.mesh("data:4,model:2")                       # 8 devices
    plan = rp.plan([(r".*/(query|value)/kernel", rp.lora(8))], params)
    frozen, trainable = plan.init(key, params)
    specs = rp.sharding.specs(plan, mesh, frozen, trainable, optimizer=opt)   # rules=DEFAULT_RULES
    frozen = rp.sharding.put(frozen, specs.frozen, mesh)
    state = rp.sharding.put(rp.train.init_state(trainable, opt, key), specs.state, mesh)
    step = rp.sharding.make_train_step(plan, loss_fn, opt, mesh, specs)   # jit with in/out shardings
    for batch in batches:
        state, metrics = step(state, frozen, rp.sharding.shard_batch(batch, mesh))

What is sharded how:

* Mesh axes are named ``data`` (batch only), ``fsdp`` (batch and weights: ZeRO-3 style) and ``model``
  (tensor parallel). A PartitionSpec entry naming one of these that the mesh lacks is dropped, so one rule
  set serves ``"data:8"``, ``"data:4,model:2"`` and ``"fsdp:2,model:4"`` alike.
* Base weights: ``(regex, PartitionSpec)`` rules, first ``re.fullmatch`` on the '/'-joined path wins (as in
  big_vision and t5x); unmatched leaves are replicated. :data:`DEFAULT_RULES` shards 2-D kernels
  ``[d_in, d_out]`` as ``P("fsdp", "model")`` (column parallel), DenseGeneral q/k/v ``[d, heads, hd]`` with
  the heads over ``model``, attention outputs ``[heads, hd, d]`` (and 2-D ``o_proj``) row parallel, conv
  kernels on their channels.
* Adapter arrays follow their base (:func:`derive`), so ``W = f(frozen, trainable)`` is formed where the
  base lives: no all-gather of a whole base weight over ``model`` (``fsdp`` gathers a weight's ``fsdp``
  shards for its layer, as ZeRO-3 does). An array dim equal to the leaf's matrix-view ``d_in``
  (``d_out``) takes the base's input (output) spec -- LoRA ``A [d_in, r]`` is sharded like the base's rows,
  ``B [r, d_out]`` like its columns, DoRA's ``m`` and VeRA's ``b [d_out]`` like its columns; a view that
  flattens several kernel axes (``[d, heads, hd] -> [d, heads*hd]``) passes on the spec of the group's
  leading axis when the other axes of the group are unsharded; ``nn.scan`` batch axes keep the base's spec;
  an array of the kernel's own shape (a rewritten base, ``rp.full``'s ``w``) gets the base's spec; a
  quantised base (:mod:`reparam.quant`) shards its codes, scales and minimums as the weight, axis for axis
  (the train step dequantises each layer's shard where it lives).
  Kronecker factors, random-basis vectors and keys, sparse values and indices: replicated.
* Optimizer state follows the trainable specs (:func:`opt_specs`); step and rng are replicated.
* Batches: the leading dim over the ``data`` and ``fsdp`` axes of the mesh (:func:`data_axes`).

Correctness never depends on the specs (XLA inserts whatever collectives a layout needs); they decide
memory and communication. Many hosts: call :func:`initialize` first in every process, build the same mesh
over ``jax.devices()``, and feed each process's slice of the batch through :func:`global_batch`.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from reparam import quant, train
from reparam.core import ReparamError
from reparam.plan import Plan, path_str

PyTree = Any
AXES = ("data", "fsdp", "model")   # the mesh axis names this module knows
Rule = tuple[str, Union[P, dict]]   # (regex, spec) or (regex, {ndim: spec}) for one regex over several ranks

_QKV = r".*(^|/)(query|key|value|q|k|v|q_proj|k_proj|v_proj)/kernel"
_OUT = r".*(^|/)(out|o|o_proj|out_proj|down|down_proj)/kernel"
DEFAULT_RULES: tuple[Rule, ...] = (
    (_QKV, {3: P("fsdp", "model", None), 2: P("fsdp", "model")}),   # [d, heads, hd]: heads over model
    (_OUT, {3: P("model", None, "fsdp"), 2: P("model", "fsdp")}),   # [heads, hd, d]: row parallel
    (r"(.*/)?kernel", {2: P("fsdp", "model"), 3: P(None, "fsdp", "model"), 4: P(None, None, "fsdp", "model"),
                       5: P(None, None, None, "fsdp", "model")}),  # Dense: column parallel; conv: channels
)
"""Megatron-style defaults: q/k/v and 2-D kernels column parallel (``d_out`` over ``model``, ``d_in`` over
``fsdp``), attention outputs and MLP ``down`` projections row parallel, conv kernels ``[..., c_in, c_out]`` on
their channels; anything else (biases, norms, embeddings) replicated. Rank-keyed rules describe one layer: a
kernel the plan views with stacked layer axes (``nn.scan``, ``rp.on_axes(batch_axes=...)``) takes the rule of
its per-layer rank, its layer axes unsharded (q ``[layers, d, heads, hd]``: ``P(None, "fsdp", "model", None)``)."""


# --- mesh --------------------------------------------------------------------------------------------------
def mesh(spec: str, devices: Optional[Sequence] = None) -> Mesh:
    """A :class:`jax.sharding.Mesh` from ``"data:4,model:2"`` over ``devices`` (default ``jax.devices()``).

    Axis names come from ``data``, ``fsdp`` and ``model``, in the order written (the first is the major
    axis); one size may be ``-1`` (the devices left over). The axes are ``AxisType.Auto``: ``jax.jit``
    propagates shardings from the in/out specs.
    """
    devices = list(jax.devices() if devices is None else devices)
    names, sizes = [], []
    for item in [s for s in spec.replace(" ", "").split(",") if s]:
        m = re.fullmatch(r"([a-z_]+):(-1|\d+)", item)
        if m is None:
            raise ReparamError(f"mesh spec {spec!r}: item {item!r} is not 'name:size'; write e.g. "
                               f"'data:4,model:2' (one size may be -1).")
        name, size = m.group(1), int(m.group(2))
        if name not in AXES:
            raise ReparamError(f"mesh spec {spec!r}: unknown axis {name!r}; axes are {', '.join(AXES)}.")
        if name in names:
            raise ReparamError(f"mesh spec {spec!r}: axis {name!r} appears twice.")
        if size == 0:
            raise ReparamError(f"mesh spec {spec!r}: axis {name!r} has size 0; sizes are >= 1 or -1.")
        names.append(name)
        sizes.append(size)
    if not names:
        raise ReparamError(f"mesh spec {spec!r} names no axis; write e.g. 'data:{len(devices)}'.")
    if sizes.count(-1) > 1:
        raise ReparamError(f"mesh spec {spec!r}: at most one size may be -1.")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ReparamError(f"mesh spec {spec!r}: the fixed sizes multiply to {known}, which does not "
                               f"divide the {len(devices)} devices.")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ReparamError(f"mesh spec {spec!r}: axis sizes multiply to {math.prod(sizes)} but there are "
                           f"{len(devices)} devices; make the product {len(devices)} or use -1 for one size.")
    return jax.make_mesh(tuple(sizes), tuple(names), axis_types=(AxisType.Auto,) * len(names), devices=devices)


def data_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes a batch's leading dim is split over: ``data`` and ``fsdp``, those the mesh has."""
    return tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)


def data_spec(mesh: Mesh, axes: Optional[Sequence[str]] = None) -> P:
    """``P(("data", "fsdp"))`` restricted to ``mesh`` (or ``P(axes)``): the spec of a batch's leading dim."""
    axes = data_axes(mesh) if axes is None else tuple(axes)
    unknown = [a for a in axes if a not in mesh.axis_names]
    if unknown:
        raise ReparamError(f"data axes {unknown} are not axes of the mesh {dict(mesh.shape)}.")
    return P(axes if axes else None)


# --- partition rules -> base specs ---------------------------------------------------------------------------
def _entry(e, mesh, where: str):
    """A spec entry restricted to ``mesh``: standard axes it lacks are dropped; other unknown names fail."""
    names = (e,) if isinstance(e, str) else tuple(e or ())
    for n in names:
        if n not in mesh.axis_names and n not in AXES:
            raise ReparamError(f"{where}: mesh axis {n!r} is not in the mesh {dict(mesh.shape)} and is not "
                               f"one of {AXES}; fix the partition rule.")
    kept = tuple(n for n in names if n in mesh.axis_names)
    return None if not kept else kept[0] if len(kept) == 1 else kept


def _size(e, mesh) -> int:
    return 1 if e is None else math.prod(mesh.shape[n] for n in ((e,) if isinstance(e, str) else e))


def _normalize(spec: P, shape: tuple[int, ...], mesh, where: str) -> P:
    """``spec`` for an array of ``shape``: one entry per dim, restricted to the mesh, divisibility checked."""
    entries = [_entry(e, mesh, where) for e in tuple(spec)]
    if len(entries) > len(shape):
        raise ReparamError(f"{where}: spec {spec} has {len(entries)} entries but the array has {len(shape)} "
                           f"dims; shorten the spec or give per-rank specs as {{ndim: spec}}.")
    entries += [None] * (len(shape) - len(entries))
    used = [n for e in entries if e is not None for n in ((e,) if isinstance(e, str) else e)]
    if len(used) != len(set(used)):
        raise ReparamError(f"{where}: spec {spec} uses a mesh axis twice; each axis may shard one dim.")
    for d, (e, n) in enumerate(zip(entries, shape)):
        k = _size(e, mesh)
        if n % k:
            raise ReparamError(f"{where}: dim {d} (size {n}) is not divisible by mesh axis {e!r} of size {k}; "
                               f"change the rule's spec for this dim (e.g. None) or the mesh shape.")
    return P(*entries)


def rule_spec(path: str, shape: tuple[int, ...], rules: Sequence[Rule], mesh, stacked: Sequence[int] = ()) -> P:
    """The spec of one array: the first rule whose regex fullmatches ``path`` (and, for a
    ``{ndim: spec}`` rule, has an entry for its rank), normalized to ``shape``; ``P()`` (replicated) if none.
    ``stacked``: the array's layer axes; a ``{ndim: spec}`` rule then applies to the per-layer rank, with
    ``None`` inserted at those axes (a plain ``PartitionSpec`` rule spans the whole array)."""
    per_layer = len(shape) - len(stacked)
    for i, (regex, spec) in enumerate(rules):
        if not re.fullmatch(regex, path):
            continue
        if isinstance(spec, dict):
            if per_layer not in spec:
                continue
            spec = list(spec[per_layer]) + [None] * (per_layer - len(spec[per_layer]))
            for a in sorted(stacked):
                spec.insert(a, None)
            spec = P(*spec)
        where = f"parameter '{path}' {tuple(shape)}, partition rule {i} ({regex!r} -> {spec})"
        return _normalize(spec, tuple(shape), mesh, where)
    return P(*([None] * len(shape)))


def param_specs(params: PyTree, mesh, rules: Sequence[Rule] = DEFAULT_RULES) -> PyTree:
    """A pytree of PartitionSpecs for ``params`` (arrays or ShapeDtypeStructs) from the partition ``rules``.

    ``mesh`` may be a :class:`Mesh` or an ``AbstractMesh`` (only axis names and sizes are read). Raises
    ReparamError naming the path, dim and mesh axis when a sharded dim is not divisible by the axis size.
    """
    _check_rules(rules)
    return jax.tree_util.tree_map_with_path(lambda p, x: rule_spec(path_str(p), np.shape(x), rules, mesh),
                                            params)


def _check_rules(rules):
    for i, r in enumerate(rules):
        if not (isinstance(r, tuple) and len(r) == 2 and isinstance(r[0], str) and isinstance(r[1], (P, dict))):
            raise ReparamError(f"partition rule {i} must be (regex, PartitionSpec) or (regex, {{ndim: spec}}), "
                               f"e.g. (r'.*/kernel', P('fsdp', 'model')); got {r!r}.")


# --- specs of frozen / trainable / optimizer state, derived from the base -------------------------------------
def _group(base: tuple, axes: tuple[int, ...]):
    """Spec of a view's flattened axis group: the leading axis's, when the group's other axes are unsharded."""
    return base[axes[0]] if all(base[a] is None for a in axes[1:]) else None


def _quantised(q: quant.QArray, base: P, mesh) -> quant.QArray:
    """The specs of a quantised array's arrays (a :class:`reparam.quant.QArray` of PartitionSpecs) from the
    spec ``base`` of its logical array: ``codes [*rest, n_blocks, bytes]`` and ``scales`` / ``mins
    [*rest, n_blocks]`` take the spec of the logical axes they hold (the blocked axis's on ``n_blocks``, where
    it divides); double-quantised scales (a flat ``u8`` array per layer stack) are replicated."""
    b = tuple(base) + (None,) * (q.ndim - len(base))
    blocked = q.axis + q.ndim
    rest = [b[i] for i in range(q.ndim) if i != blocked]

    def fit(entries, shape):
        return P(*[e if n % _size(e, mesh) == 0 else None for e, n in zip(entries, shape)])
    rep = lambda x: P(*([None] * np.ndim(x)))
    scales = (jax.tree_util.tree_map(rep, q.scales) if quant.is_quantized(q.scales)
              else fit(rest + [b[blocked]], np.shape(q.scales)))
    return dataclasses.replace(q, codes=fit(rest + [b[blocked], None], np.shape(q.codes)), scales=scales,
                               mins=None if q.mins is None else fit(rest + [b[blocked]], np.shape(q.mins)))


def _derived(leaf, base: P, x, mesh) -> P:
    """The spec of one array in a leaf's frozen/trainable entry (see :func:`derive`); for a quantised base, a
    :class:`reparam.quant.QArray` of its arrays' specs (:func:`_quantised`)."""
    if quant.is_quantized(x):
        if tuple(x.shape) == tuple(leaf.shape):
            return _quantised(x, base, mesh)
        return _quantised(x, P(), mesh)
    shape, dtype = tuple(np.shape(x)), x.dtype
    rep = P(*([None] * len(shape)))
    if jnp.issubdtype(dtype, jax.dtypes.prng_key):
        return rep
    if shape == tuple(leaf.shape):
        return base
    v = leaf.view
    if v is None or not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.complexfloating)):
        return rep
    b = tuple(base)
    nb = len(v.batch)
    lead = [b[a] for a in v.batch] if shape[:nb] == tuple(leaf.shape[a] for a in v.batch) else []
    rest = shape[len(lead):]
    d_in, d_out = math.prod(leaf.shape[a] for a in v.inp), math.prod(leaf.shape[a] for a in v.out)
    s_in, s_out = _group(b, v.inp), _group(b, v.out)
    if len(rest) == 2:
        tail = [s_in if rest[0] == d_in else None, s_out if rest[1] == d_out else None]
    elif len(rest) == 1:
        tail = [s_out if rest[0] == d_out else s_in if rest[0] == d_in else None]
    else:
        tail = [None] * len(rest)
    entries = lead + tail
    used = [n for e in entries if e is not None for n in ((e,) if isinstance(e, str) else e)]
    if len(used) != len(set(used)) or any(n % _size(e, mesh) for e, n in zip(entries, shape)):
        return rep
    return P(*entries)


def derive(plan: Plan, base_specs: PyTree, frozen: PyTree, trainable: PyTree, mesh) -> tuple[PyTree, PyTree]:
    """``(frozen_specs, trainable_specs)`` from the base's specs, per leaf of the plan.

    ``frozen``/``trainable`` may be arrays or ShapeDtypeStructs (``jax.eval_shape(plan.init, key, params)``).
    For each array of a leaf's entries: a PRNG key is replicated; an array of the kernel's shape (the frozen
    base, PiSSA's residual, ``rp.full``'s ``w``) gets the base's spec; a float array whose dims (after the
    stacked batch dims, which keep the base's) are ``[d_in, ·]`` / ``[·, d_out]`` / ``[d_out]`` / ``[d_in]``
    of the leaf's matrix view takes the base's input / output spec on those dims (LoRA ``A``, ``B``, DoRA
    ``m``, VeRA ``b``, LoRA-XS ``U``, ``Vt``, S²FT blocks); everything else (Kronecker factors, vectors of
    another length, integer indices) is replicated. A flattened view dim gets the spec of its group's
    leading kernel axis when only that axis is sharded. A quantised base (:mod:`reparam.quant`) has its codes,
    scales and minimums sharded as the logical weight is, axis for axis.
    """
    bl = plan.treedef.flatten_up_to(base_specs)
    fl, tl = plan.treedef.flatten_up_to(frozen), plan.treedef.flatten_up_to(trainable)
    fs = [jax.tree_util.tree_map(lambda x, leaf=leaf, s=s: _derived(leaf, s, x, mesh), f, is_leaf=quant.is_quantized)
          for leaf, s, f in zip(plan.leaves, bl, fl)]
    ts = [jax.tree_util.tree_map(lambda x, leaf=leaf, s=s: _derived(leaf, s, x, mesh), t)
          for leaf, s, t in zip(plan.leaves, bl, tl)]
    return plan.treedef.unflatten(fs), plan.treedef.unflatten(ts)


def opt_specs(optimizer: optax.GradientTransformation, trainable: PyTree, trainable_specs: PyTree,
              mesh) -> PyTree:
    """Specs for ``optimizer.init(trainable)``: param-shaped parts (Adam's ``mu``, ``nu``) copy the trainable
    specs (``optax.tree_map_params``), the rest (counts) is replicated. An optimizer whose state does not
    mirror the params gets, per array, the spec of a trainable array of the same shape when all such agree,
    else replicated; a spec that does not fit its array is replaced by replication."""
    abstract = jax.eval_shape(optimizer.init, trainable)
    is_spec = lambda s: isinstance(s, P)

    def fit(s, x):
        ok = len(s) <= len(x.shape) and all(n % _size(e, mesh) == 0 for e, n in zip(tuple(s), x.shape))
        return s if ok else P()

    try:
        mapped = optax.tree_map_params(optimizer, lambda _, s: s, abstract, trainable_specs,
                                       transform_non_params=lambda _: P())
        return jax.tree_util.tree_map(fit, mapped, abstract, is_leaf=is_spec)
    except (ValueError, TypeError, KeyError):   # a state that does not mirror the params: match by shape
        by_shape: dict = {}
        for x, s in zip(jax.tree_util.tree_leaves(trainable), jax.tree_util.tree_leaves(trainable_specs,
                                                                                       is_leaf=is_spec)):
            by_shape.setdefault(tuple(np.shape(x)), set()).add(s)
        return jax.tree_util.tree_map(
            lambda x: fit(next(iter(by_shape[x.shape])), x) if len(by_shape.get(x.shape, ())) == 1 else P(),
            abstract)


class Specs(NamedTuple):
    """PartitionSpec pytrees: ``base`` (params structure), ``frozen`` and ``trainable`` (the plan's), and
    ``state`` (a :class:`~reparam.train.TrainState` of specs; ``None`` when built without an optimizer)."""
    base: PyTree
    frozen: PyTree
    trainable: PyTree
    state: Optional[train.TrainState]


def specs(plan: Plan, mesh, frozen: PyTree, trainable: PyTree, rules: Sequence[Rule] = DEFAULT_RULES, *,
          optimizer: Optional[optax.GradientTransformation] = None) -> Specs:
    """All specs of a run: base specs from ``rules`` over the plan's paths and shapes, the frozen and
    trainable specs :func:`derive`\\ d from them, and with ``optimizer`` the TrainState's (step and rng
    replicated, optimizer state by :func:`opt_specs`)."""
    _check_rules(rules)
    base = plan.treedef.unflatten([rule_spec(leaf.path, leaf.shape, rules, mesh,
                                             stacked=leaf.view.batch if leaf.view is not None else ())
                                   for leaf in plan.leaves])
    fs, ts = derive(plan, base, frozen, trainable, mesh)
    state = (None if optimizer is None else
             train.TrainState(P(), ts, opt_specs(optimizer, trainable, ts, mesh), P()))
    return Specs(base, fs, ts, state)


# --- placement -----------------------------------------------------------------------------------------------
def shardings(tree_specs: PyTree, mesh: Mesh) -> PyTree:
    """PartitionSpecs -> NamedShardings on ``mesh``."""
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), tree_specs,
                                  is_leaf=lambda s: isinstance(s, P))


def _put_global(x, sharding: NamedSharding):
    """One array onto a sharding spanning several processes, each of which holds the same value."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):   # raw key data, sharded like the key, then re-wrapped
        data = _put_global(jax.random.key_data(x), NamedSharding(sharding.mesh, P(*sharding.spec, None)))
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def _put_local(x, sharding: NamedSharding):
    # a fresh buffer first: device_put may reuse the source's buffer as one shard, and train steps donate
    return jax.device_put(jnp.array(x, copy=True) if isinstance(x, jax.Array) else x, sharding)


def put(tree: PyTree, tree_specs: PyTree, mesh: Mesh) -> PyTree:
    """``tree`` placed on ``mesh`` with ``tree_specs`` (a pytree prefix of ``tree``, e.g. ``specs.frozen`` or
    ``specs.state``) as new arrays. One process: by one jitted identity (one small program), or by
    ``device_put`` when arrays are committed to devices outside the mesh. Several processes: every process
    must pass the same values (same key, same pretrained weights); each keeps only its devices' shards."""
    shs = shardings(tree_specs, mesh)
    if jax.process_count() > 1:
        return jax.tree_util.tree_map(_put_global, tree, shs)
    try:
        return jax.jit(lambda t: t, out_shardings=shs)(tree)
    except ValueError:   # "incompatible devices": inputs committed elsewhere
        return jax.tree_util.tree_map(_put_local, tree, shs)


def shard_batch(batch: PyTree, mesh: Mesh, axes: Optional[Sequence[str]] = None) -> PyTree:
    """The global ``batch`` (every leaf with a leading batch dim) split over the data axes: one process."""
    s = NamedSharding(mesh, data_spec(mesh, axes))
    return jax.tree_util.tree_map(lambda x: jax.device_put(x, s), batch)


def global_batch(local_batch: PyTree, mesh: Mesh, axes: Optional[Sequence[str]] = None) -> PyTree:
    """One global batch from each process's ``local_batch`` (its consecutive slice of the rows, in process
    order) via ``jax.make_array_from_process_local_data``; with one process the same as :func:`shard_batch`."""
    s = NamedSharding(mesh, data_spec(mesh, axes))
    return jax.tree_util.tree_map(lambda x: jax.make_array_from_process_local_data(s, np.asarray(x)),
                                  local_batch)


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, *, cpu_collectives: Optional[str] = "gloo", **kwargs) -> None:
    """``jax.distributed.initialize`` for many hosts; call it first in every process, before any JAX op.

    ``cpu_collectives`` sets ``jax_cpu_collectives_implementation`` (``"gloo"``, ``"mpi"``) so that CPU
    processes can run collectives together; ``None`` leaves it. Arguments left ``None`` are detected from
    the cluster environment (SLURM, Cloud TPU, ...) as in JAX.
    """
    if cpu_collectives is not None:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(coordinator_address, num_processes, process_id, **kwargs)


# --- the sharded train step ----------------------------------------------------------------------------------
def make_train_step(plan: Plan, loss_fn: Callable, optimizer: optax.GradientTransformation, mesh: Mesh,
                    specs: Specs, *, data_axes: Optional[Sequence[str]] = None, donate: bool = True,
                    constrain: bool = False, **train_kwargs) -> Callable:
    """``step(state, frozen, batch) -> (state, metrics)`` of :func:`reparam.train.make_train_step` (which
    gets ``train_kwargs``: ``remat``, ``matmul``, ``scan_remat``), jitted with ``in_shardings=(specs.state, specs.frozen,
    batch over data_axes)`` and ``out_shardings=(specs.state, replicated metrics)``; the state is donated.

    Every batch leaf has a leading batch dim, split over ``data_axes`` (default: the mesh's ``data`` and
    ``fsdp``); batches may be host arrays (placed by jit) or arrays from :func:`shard_batch` /
    :func:`global_batch`. The specs alone make XLA form each effective weight where its base lives.
    ``constrain=True`` also pins each effective weight to its base's spec (``with_sharding_constraint``
    on the params the loss sees); the constrained weights are materialised, so the structured-matmul hot path
    is then off for them (plain autodiff, reported in ``step.routing``).
    """
    if specs.state is None:
        raise ReparamError("make_train_step needs the TrainState's specs; build them with "
                           "rp.sharding.specs(plan, mesh, frozen, trainable, rules, optimizer=optimizer).")
    weights = shardings(specs.base, mesh)

    def pinned_loss(params, batch, rng):
        return loss_fn(jax.lax.with_sharding_constraint(params, weights), batch, rng)

    step = train.make_train_step(plan, pinned_loss if constrain else loss_fn, optimizer, jit=False,
                                 **train_kwargs)
    state_sh = shardings(specs.state, mesh)
    return train.TrainStep(jax.jit(step, in_shardings=(state_sh, shardings(specs.frozen, mesh),
                                                       NamedSharding(mesh, data_spec(mesh, data_axes))),
                                   out_shardings=(state_sh, NamedSharding(mesh, P())),
                                   donate_argnums=(0,) if donate else ()), step.routing)
