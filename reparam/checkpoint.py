"""Checkpoints of a training run with orbax: trainable params, optimizer state, step, rng and the run's config.

    mgr = rp.checkpoint.manager("runs/x/ckpt", max_to_keep=3)
    rp.checkpoint.save(mgr, state, config)                    # config: a JSON-able dict
    state = rp.checkpoint.restore(mgr, like=state, config=config)   # None when there is none yet

The frozen base is never saved: it is rebuilt from the pretrained weights by
``plan.init`` (deterministic for a fixed key). Orbax writes each step into a
temporary directory and renames it when complete, so a run killed during a
save still restores from the previous checkpoint. Restoring takes shapes,
dtypes and shardings from ``like``, so a checkpoint written on one mesh
restores onto another. A checkpoint written under a different config is
refused with the keys that differ.
"""
from __future__ import annotations

import json
from typing import Any, Iterable, Optional

import jax
import orbax.checkpoint as ocp

from reparam.core import ReparamError
from reparam.train import TrainState

# config keys that do not change what a run computes, so a resume may change them
VOLATILE = ("resume", "progress", "verbose", "output_dir", "checkpoint_every", "keep_checkpoints")


def manager(directory: str, *, max_to_keep: int = 3) -> ocp.CheckpointManager:
    """An orbax ``CheckpointManager`` keeping the newest ``max_to_keep`` steps under ``directory``."""
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                                                                  create=True))


def _payload(state: TrainState) -> dict:
    # typed PRNG keys are stored as their raw uint32 data
    return {"step": state.step, "trainable": state.trainable, "opt_state": state.opt_state,
            "rng": jax.random.key_data(state.rng)}


def _jsonable(config: Any) -> dict:
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.loads(json.dumps(config, default=str))


def save(mgr: ocp.CheckpointManager, state: TrainState, config: Any, *, wait: bool = True) -> None:
    """Saves ``state`` at its step with the run's ``config`` (an ml_collections ConfigDict or a dict)."""
    mgr.save(int(state.step), args=ocp.args.Composite(state=ocp.args.StandardSave(_payload(state)),
                                                       config=ocp.args.JsonSave(_jsonable(config))))
    if wait:
        mgr.wait_until_finished()


def config_diff(saved: dict, current: dict, ignore: Iterable[str] = VOLATILE) -> list[str]:
    """``"key: saved X, now Y"`` for every config entry that differs (dotted keys; ``ignore`` skipped)."""
    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out
    a, b = flat(saved), flat(current)
    skip = set(ignore)
    return [f"{k}: saved {a.get(k, '<absent>')!r}, now {b.get(k, '<absent>')!r}"
            for k in sorted(set(a) | set(b)) if k.split(".")[-1] not in skip and a.get(k) != b.get(k)]


def restore(mgr: ocp.CheckpointManager, *, like: TrainState, config: Any, step: Optional[int] = None,
            ignore: Iterable[str] = VOLATILE) -> Optional[TrainState]:
    """The state saved at ``step`` (default: the latest), or ``None`` if the directory holds none.

    ``like`` gives the structure, dtypes and shardings to restore onto (e.g.
    a fresh ``init_state``, possibly on another mesh). Raises a
    :class:`ReparamError` if the saved config differs from ``config`` outside
    ``ignore``, or if the saved arrays do not fit ``like``.
    """
    step = mgr.latest_step() if step is None else step
    if step is None:
        return None
    saved = mgr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    diff = config_diff(saved, _jsonable(config), ignore)
    if diff:
        raise ReparamError(f"checkpoint {mgr.directory} (step {step}) was written under another config: "
                           + "; ".join(diff[:8]) + ". Resume with the run's own config, or use a fresh "
                           "output directory to start a new run.")
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), _payload(like))
    try:
        got = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    except (ValueError, KeyError, TypeError) as e:
        raise ReparamError(f"checkpoint {mgr.directory} (step {step}) does not fit this run's trainable state "
                           f"({type(e).__name__}: {str(e).splitlines()[0][:300]}); was it written by another "
                           "plan?") from e
    return TrainState(got["step"], got["trainable"], got["opt_state"],
                      jax.random.wrap_key_data(got["rng"], impl=jax.random.key_impl(like.rng)))
