"""Checkpoints of a training run with orbax: trainable params, optimizer state, step, rng and the run's config.

    mgr = rp.checkpoint.manager("runs/x/ckpt", max_to_keep=3)
    rp.checkpoint.save(mgr, state, config, plan=plan)          # config: a JSON-able dict
    state = rp.checkpoint.restore(mgr, like=state, config=config, plan=plan)   # None when there is none yet

The frozen base is never saved: it is rebuilt from the pretrained weights by
``plan.init`` (deterministic for a fixed key). Orbax writes each step into a
temporary directory and renames it when complete, so a run killed during a
save still restores from the previous checkpoint. Restoring takes shapes,
dtypes and shardings from ``like``, so a checkpoint written on one mesh
restores onto another. A checkpoint written under a different config is
refused with the keys that differ; one written by another plan (another method,
rank, alpha, ... on some parameter; :meth:`reparam.Plan.fingerprint`, saved with
it) with the parameters and fields that differ, even when the configs match. A
damaged file is reported as such, by name.
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Any, Iterable, Optional

import jax
import orbax.checkpoint as ocp

from reparam.core import ReparamError, check_confined
from reparam.plan import Plan, fingerprint_diff, flat_diff, path_str, sig_diff
from reparam.train import TrainState

# config keys that do not change what a run computes, so a resume may change them
VOLATILE = ("resume", "progress", "verbose", "output_dir", "checkpoint_every", "keep_checkpoints")


def manager(directory: str, *, max_to_keep: int = 3) -> ocp.CheckpointManager:
    """An orbax ``CheckpointManager`` keeping the newest ``max_to_keep`` steps under ``directory``."""
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                                                                  create=True),
                                 item_handlers={"state": ocp.StandardCheckpointHandler(),    # its metadata reads
                                                "config": ocp.JsonCheckpointHandler(),      # before a restore
                                                "plan": ocp.JsonCheckpointHandler()})


def _payload(state: TrainState) -> dict:
    # typed PRNG keys are stored as their raw uint32 data
    return {"step": state.step, "trainable": state.trainable, "opt_state": state.opt_state,
            "rng": jax.random.key_data(state.rng)}


def _jsonable(config: Any) -> dict:
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.loads(json.dumps(config, default=str))


def save(mgr: ocp.CheckpointManager, state: TrainState, config: Any, *, plan: Optional[Plan] = None,
         wait: bool = True) -> None:
    """Saves ``state`` at its step with the run's ``config`` (an ml_collections ConfigDict or a dict) and, given
    the ``plan``, its :meth:`~reparam.Plan.fingerprint`, which :func:`restore` checks."""
    items = {"state": ocp.args.StandardSave(_payload(state)), "config": ocp.args.JsonSave(_jsonable(config))}
    if plan is not None:
        items["plan"] = ocp.args.JsonSave(plan.fingerprint())
    mgr.save(int(state.step), args=ocp.args.Composite(**items))
    if wait:
        mgr.wait_until_finished()


def config_diff(saved: dict, current: dict, ignore: Iterable[str] = VOLATILE) -> list[str]:
    """``"key: saved X, now Y"`` for every config entry that differs (dotted keys; ``ignore`` skipped)."""
    return flat_diff(saved, current, tuple(ignore))


def _damaged(mgr: ocp.CheckpointManager, step: int, item: str, err: Exception) -> ReparamError:
    """The error for an item of a step that orbax cannot read although it fits: its files are damaged. Names the
    JSON file that does not parse, or else the item's array data files (orbax's OCDBT layout)."""
    step_dir = os.path.join(str(mgr.directory), str(step))          # our manager's default step naming
    where = os.path.join(step_dir, item)
    files = sorted(os.path.relpath(os.path.join(r, f), where) for r, _, fs in os.walk(where) for f in fs)
    data = [f for f in files if f.startswith("d" + os.sep) or f == "manifest.ocdbt"]
    bad = []
    for f in files:
        if f in data or f.startswith("ocdbt.") or f == "commit_success.txt":
            continue                    # binary array data and its index; orbax's marker
        try:
            with open(os.path.join(where, f)) as fh:
                json.load(fh)
        except (ValueError, OSError):
            bad.append(os.path.join(where, f))
    what = (f"{', '.join(bad)} does not parse" if bad else
            f"its array data ({', '.join(os.path.join(where, f) for f in data[:4])}) cannot be read")
    first = str(err).splitlines()[0][:200] if str(err) else ""
    return ReparamError(f"checkpoint {step_dir} is damaged: {what} ({type(err).__name__}: {first}). Restore an "
                        f"earlier step (restore(..., step=N); steps here: {mgr.all_steps()}), or delete {step_dir} "
                        "so that the run resumes from the step before.")


def _read_json(mgr: ocp.CheckpointManager, step: int, item: str) -> Any:
    try:
        return mgr.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item]
    except Exception as e:          # a JSON item that exists but does not read back is damaged
        raise _damaged(mgr, step, item, e) from e


def _check_plan(mgr: ocp.CheckpointManager, step: int, plan: Plan) -> None:
    where = f"checkpoint {mgr.directory} (step {step})"
    if not os.path.isdir(os.path.join(str(mgr.directory), str(step), "plan")):
        warnings.warn(f"{where} holds no plan fingerprint (saved without save(..., plan=), or by an older reparam): "
                      "restoring it without checking that this plan wrote it.", stacklevel=3)
        return
    diff = fingerprint_diff(_read_json(mgr, step, "plan"), json.loads(json.dumps(plan.fingerprint())))
    if diff:
        raise ReparamError(f"{where} was written by another plan: " + "; ".join(diff[:8])
                           + (f"; and {len(diff) - 8} more" if len(diff) > 8 else "") + ". Restore it with the plan "
                           "of the run that wrote it (same rules, methods and hyperparameters), or use a fresh "
                           "output directory to start a new run.")


def restore(mgr: ocp.CheckpointManager, *, like: TrainState, config: Any, plan: Optional[Plan] = None,
            step: Optional[int] = None, ignore: Iterable[str] = VOLATILE) -> Optional[TrainState]:
    """The state saved at ``step`` (default: the latest), or ``None`` if the directory holds none.

    ``like`` gives the structure, dtypes and shardings to restore onto (e.g.
    a fresh ``init_state``, possibly on another mesh). Raises a
    :class:`ReparamError` if the saved config differs from ``config`` outside
    ``ignore``; if ``plan`` is given and the checkpoint was written by another
    plan (:meth:`~reparam.Plan.fingerprint`; a checkpoint saved without one
    restores with a warning); if the saved arrays do not fit ``like`` (the
    entries and shapes that differ); or if a file of the checkpoint is damaged
    (naming it).
    """
    step = mgr.latest_step() if step is None else step
    if step is None:
        return None
    check_confined(str(mgr.directory), f"checkpoint {mgr.directory} (step {step})")
    diff = config_diff(_read_json(mgr, step, "config"), _jsonable(config), ignore)
    if diff:
        raise ReparamError(f"checkpoint {mgr.directory} (step {step}) was written under another config: "
                           + "; ".join(diff[:8]) + ". Resume with the run's own config, or use a fresh "
                           "output directory to start a new run.")
    if plan is not None:
        _check_plan(mgr, step, plan)
    payload = _payload(like)
    try:
        saved = mgr.item_metadata(step)["state"]
        saved = getattr(saved, "tree", saved)
    except Exception as e:
        raise _damaged(mgr, step, "state", e) from e
    flat = lambda tree: {path_str(k): x for k, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
    misfit = sig_diff(flat(payload), flat(saved))
    if misfit:
        raise ReparamError(f"checkpoint {mgr.directory} (step {step}) does not fit this run's state (expected: this "
                           "run's, got: the checkpoint's): " + "; ".join(misfit[:8])
                           + (f"; and {len(misfit) - 8} more" if len(misfit) > 8 else "") + ". Was it written by "
                           "another plan (method, rank, rules) or optimizer? Restore it with that run's plan and "
                           "optimizer, or use a fresh output directory.")
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), payload)
    try:
        got = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    except Exception as e:          # the entries fit (checked above): what does not read back is damaged
        raise _damaged(mgr, step, "state", e) from e
    return TrainState(got["step"], got["trainable"], got["opt_state"],
                      jax.random.wrap_key_data(got["rng"], impl=jax.random.key_impl(like.rng)))
