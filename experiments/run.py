"""The generic runner: pretrain an MLP on a source task, then adapt it to a target task with each method.

    python -m experiments.run --config=experiments/configs/digits.py
    python -m experiments.run --config=experiments/configs/digits.py --config.adapt_steps=50 \
        --config.methods=lora,pissa --config.output_dir=/tmp/digits

Flow: full training on digits 0-4; a fresh 5-way head for digits 5-9; for each
method, ``rp.plan(rules, params)`` -> (calibrate) -> ``plan.init`` -> adamw
steps from ``rp.train``. Writes ``metrics.jsonl`` (one line per step: method,
step, loss, and test loss/accuracy every ``eval_every`` steps),
``results.json`` and ``results.png`` into ``output_dir``, and prints a table.
Step time is the median wall time of the jitted step after ``timing_warmup``
steps, each one waited for with ``block_until_ready``.
"""
from __future__ import annotations

import math
import os
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import reparam as rp
from absl import app, flags, logging
from ml_collections import config_flags
from tqdm.auto import tqdm

from experiments import methods as M
from experiments import report
from experiments.data import digits
from experiments.models import MLP

if "config" not in flags.FLAGS:   # shared by the experiments CLIs, which import one another
    config_flags.DEFINE_config_file("config", None, "Path to a get_config() file.", lock_config=True)


def make_fns(model) -> tuple[Callable, Callable]:
    """``loss_fn(params, batch, rng=None) -> (loss, {"acc"})`` and ``metrics_fn(params, batch) -> {loss, acc}``."""
    def metrics_fn(params, batch):
        x, y = batch
        logits = model.apply({"params": params}, x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return {"loss": loss, "acc": jnp.mean(jnp.argmax(logits, -1) == y)}

    def loss_fn(params, batch, rng=None):
        m = metrics_fn(params, batch)
        return m["loss"], {"acc": m["acc"]}
    return loss_fn, metrics_fn


def train(name: str, plan: rp.Plan, frozen, trainable, loss_fn: Callable, metrics_fn: Callable,
          batches: Iterator, test, config: ml_collections.ConfigDict, steps: int, lr: float,
          log_path: str) -> tuple[Any, dict]:
    """``steps`` adamw steps on ``trainable``; returns it and a history (per-step loss, evals, step times)."""
    opt = optax.adamw(lr, weight_decay=config.weight_decay)
    state = rp.train.init_state(trainable, opt, jax.random.key(config.seed))
    step = rp.train.make_train_step(plan, loss_fn, opt)
    evaluate = rp.train.make_eval_step(plan, metrics_fn)
    test = jax.device_put(test)
    h = {"step": [], "loss": [], "eval_step": [], "acc": [], "times": []}
    records = []
    bar = tqdm(range(1, steps + 1), desc=f"{name:>10}", disable=not config.progress, dynamic_ncols=True)
    for i in bar:
        batch = jax.device_put(next(batches))
        t0 = time.perf_counter()
        state, m = step(state, frozen, batch)
        jax.block_until_ready(state)
        h["times"].append(time.perf_counter() - t0)
        rec = {"method": name, "step": i, "loss": float(m["loss"]), "train_acc": float(m["acc"])}
        if float(m["penalty"]):
            rec["penalty"] = float(m["penalty"])
        if i % config.eval_every == 0 or i == steps:
            ev = jax.device_get(evaluate(state.trainable, frozen, test))
            rec.update(test_loss=float(ev["loss"]), test_acc=float(ev["acc"]))
            h["eval_step"].append(i)
            h["acc"].append(rec["test_acc"])
            bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['test_acc']:.3f}")
        h["step"].append(i)
        h["loss"].append(rec["loss"])
        records.append(rec)
    report.append_jsonl(log_path, records)
    return state.trainable, h


def median_ms(times: list[float], warmup: int) -> float:
    """Median of ``times`` after the first ``warmup`` (compilation) entries, in ms."""
    return 1e3 * float(np.median(times[min(warmup, len(times) - 1):]))


def pretrain(config, model, source, loss_fn, metrics_fn, log_path) -> tuple[dict, dict]:
    """Full training on the source task; returns params and ``{"acc", "params", "step_ms"}``."""
    x0 = source["train"][0][:1]
    params = model.init(jax.random.key(config.seed), x0)["params"]
    plan = rp.plan([(r".*", rp.full())], params)
    frozen, trainable = plan.init(jax.random.key(config.seed), params)
    batches = digits.batches(*source["train"], config.batch_size, config.seed)
    trainable, h = train("pretrain", plan, frozen, trainable, loss_fn, metrics_fn, batches, source["test"],
                         config, config.pretrain_steps, config.pretrain_lr, log_path)
    params = plan.merge(frozen, trainable)
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    return params, {"acc": h["acc"][-1], "params": n, "step_ms": median_ms(h["times"], config.timing_warmup)}


def adapt(name: str, config, model, params, target, loss_fn, metrics_fn, log_path, *, show_summary: bool):
    """Adapts ``params`` (fresh head) to the target task with method ``name``; returns (result, history)."""
    plan = rp.plan(M.METHODS[name](config), params)
    calib_batches = digits.batches(*target["train"], config.batch_size, config.seed + 1)
    calib = M.calibrate(name, plan, config, model=model, params=params,
                        batches=[next(calib_batches) for _ in range(config.calib_batches)],
                        loss_fn=lambda p, b: loss_fn(p, b)[0])
    frozen, trainable = plan.init(jax.random.key(config.seed), params, calib)
    if show_summary:
        print(f"\n[{name}] plan.summary():\n{plan.summary(trainable)}\n", flush=True)
    n_train = sum(plan.trainable_counts(trainable))
    n_total = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    batches = digits.batches(*target["train"], config.batch_size, config.seed)
    _, h = train(name, plan, frozen, trainable, loss_fn, metrics_fn, batches, target["test"], config,
                 config.adapt_steps, config.adapt_lr, log_path)
    transform = next((t.name for regex, t in plan.rules if regex == M.HIDDEN), plan.rules[0][1].name)
    result = {"transform": transform, "acc": h["acc"][-1], "trainable": n_train,
              "pct_trainable": 100.0 * n_train / n_total, "step_ms": median_ms(h["times"], config.timing_warmup)}
    return result, h


def run(config: ml_collections.ConfigDict) -> dict:
    """The whole experiment; returns the results dict (also written to ``output_dir``)."""
    names = M.names(config.methods)
    os.makedirs(config.output_dir, exist_ok=True)
    log_path = os.path.join(config.output_dir, "metrics.jsonl")
    open(log_path, "w").close()
    source, target = digits.tasks(digits.load(config.data_seed, config.test_fraction))
    model = MLP(hidden=tuple(config.hidden), n_classes=5)
    loss_fn, metrics_fn = make_fns(model)

    pretrained, pre = pretrain(config, model, source, loss_fn, metrics_fn, log_path)
    head = model.init(jax.random.key(config.seed + 1), source["train"][0][:1])["params"]["head"]
    params = {**pretrained, "head": head}                                   # a fresh 5-way head for 5-9
    untrained = float(jax.jit(metrics_fn)(params, target["test"])["acc"])
    print(f"pretrained on digits 0-4: test acc {pre['acc']:.4f}; untrained 5-9 head: test acc {untrained:.4f}",
          flush=True)

    results = {"pretrain": pre, "untrained_head_acc": untrained, "methods": {}, "config": config.to_dict()}
    history = {}
    first_adapter = next((n for n in names if n not in ("full", "head")), None)
    for name in names:
        results["methods"][name], history[name] = adapt(
            name, config, model, params, target, loss_fn, metrics_fn, log_path,
            show_summary=config.verbose or name == first_adapter)

    report.write_json(os.path.join(config.output_dir, "results.json"), results)
    print("\n" + report.table(results), flush=True)
    report.plot(os.path.join(config.output_dir, "results.png"), history, results)
    print(f"\nwrote {log_path}, results.json and results.png to {config.output_dir}", flush=True)
    return results


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)      # absl's INFO lines (e.g. backend probing) are noise here
    run(flags.FLAGS.config)


if __name__ == "__main__":
    app.run(main)
