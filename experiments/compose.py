"""Composable sparse fine-tuning (LT-SFT, Ansell et al. 2022) on digits: two task diffs, alone and summed.

    python -m experiments.compose --config=experiments/configs/compose.py
    python -m experiments.compose --config=experiments/configs/compose.py --config.density=0.02 \
        --config.output_dir=/tmp/compose

Flow: one MLP with a 10-way head (digits keep their own labels) is fully
trained on the source digits 0-4 (``θ0``). For each of two tasks, A = digits
5-7 and B = digits 8-9, LT-SFT:

  phase 1  full fine-tuning ``θ0 -> θ1`` (``rp.full()`` on every leaf);
  phase 2  ``rp.sparse.lt_sft(density)`` on every kernel, head included, with
           ``calib=rp.sparse.diffs(θ0, θ1, paths)``: only the ``density``
           fraction of each kernel that moved most in phase 1 is trained, from
           ``θ0`` again. Biases stay frozen at ``θ0`` (``lt_sft`` needs a matrix,
           and a diff that is sparse everywhere composes cleanly).

Both phases see the same batches, half the task's digits and half a replay of
the source digits (``config.replay``): without the replay a task's diff
learns "everything is 5, 6 or 7" and erases 0-4. The two tasks never see each
other's digits. As in the paper, both phases add ``l1 · mean|θ − θ0|`` to the
loss (``config.l1``), which keeps each diff small so that two of them add up
with less interference.

With ``masked_loss`` (default), each phase's softmax runs over the classes it
trains on only (pretraining: 0-4; task A: 0-7 without 8, 9; task B: 0-4, 8, 9),
the usual label masking of class-incremental learning, so a task's diff has no
opinion on the other task's classes. With a plain 10-way softmax, task A
pushes the logits of 8 and 9 far down (they are negatives in every batch) and
task B those of 5-7, and the sum's gains on A and B largely cancel (without
the L1 term, completely). Evaluation is always 10-way.

Evaluated: the pretrained model; the full fine-tunings ``θ1`` of A and of B,
and their dense sum ``θ0 + (θ1A − θ0) + (θ1B − θ0)`` (task arithmetic, a
reference); the sparse diffs ``θ0 + ΔA``, ``θ0 + ΔB`` and
``θ0 + ΔA + ΔB = rp.merge_adapters([(plan_a, frozen_a, trained_a), (plan_b, ...)], θ0)``.
Accuracy is 10-way (argmax over all ten logits) on the test images of the
source digits, A, B, A∪B and all ten digits. Writes ``metrics.jsonl`` (one
line per training step as :mod:`experiments.run`, the loss including the L1
term and the accuracy over the phase's classes), ``results.json`` and
``results.png`` to ``output_dir`` and prints the table.

Checks, as in :mod:`experiments.run`: an unknown ``--config.<key>`` is listed with its near matches
(``parse_flags``) and keys out of range are refused (:func:`check_config`) before anything runs; a non-finite
training loss stops the run naming the phase and step. The CLI then exits 1 with the message.
"""
from __future__ import annotations

import functools
import math
import os
import sys
import time
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import reparam as rp
from absl import app, flags, logging
from ml_collections import config_flags

from experiments import report
from experiments.data import digits
from experiments.models import MLP
from experiments.run import RANGES, check_ranges, make_fns, median_ms, parse_flags, pretrain, train

if "config" not in flags.FLAGS:      # experiments.run, imported above, defines the same --config flag
    config_flags.DEFINE_config_file("config", None, "Path to a get_config() file.", lock_config=True)

KERNELS = r"(hidden_\d+|head)/kernel"
# the runner's ranges, and this experiment's keys ranged like the runner's of the same kind
COMPOSE_RANGES = {**RANGES, "full_steps": RANGES["pretrain_steps"], "sparse_steps": RANGES["pretrain_steps"],
                  "full_lr": RANGES["pretrain_lr"], "sparse_lr": RANGES["pretrain_lr"], "l1": RANGES["weight_decay"],
                  "replay": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1,
                             "in [0, 1) (the fraction of each fine-tuning batch replayed from the source digits)")}
SETS = ("source", "a", "b", "ab", "all")       # test sets, in table order
PLOTTED = ("source", "a", "b", "all")
TAGS = {"source": "", "a": "A ", "b": "B ", "ab": "A+B ", "all": ""}


def pick(split: digits.Split, classes: Sequence[int]) -> digits.Split:
    """The examples of ``classes``, keeping their own labels (one 10-way head for all tasks)."""
    x, y = split
    keep = np.isin(y, list(classes))
    return x[keep], y[keep]


class Restricted:
    """``model`` whose logits outside ``classes`` are -1e9: the softmax (loss, accuracy) over ``classes`` only.

    Duck-types the ``init`` / ``apply`` that :func:`experiments.run.make_fns` and
    :func:`~experiments.run.pretrain` call. The masked logits get zero gradient,
    so a task's diff leaves alone the head columns of the classes it does not train on.
    """
    def __init__(self, model, classes: Sequence[int], n_classes: int = 10):
        self.model = model
        self.active = jnp.isin(jnp.arange(n_classes), jnp.asarray(list(classes)))

    def init(self, *args, **kwargs):
        return self.model.init(*args, **kwargs)

    def apply(self, variables, x):
        return jnp.where(self.active, self.model.apply(variables, x), -1e9)


def join(*splits: digits.Split) -> digits.Split:
    return np.concatenate([s[0] for s in splits]), np.concatenate([s[1] for s in splits])


def mixed_batches(task: digits.Split, replay: digits.Split, batch_size: int, fraction: float,
                  seed: int) -> Iterator[digits.Split]:
    """Batches of ``batch_size``: ``round(fraction · batch_size)`` replayed examples, the rest from ``task``."""
    n_replay = int(round(fraction * batch_size))
    n_task = batch_size - n_replay
    if n_task < 1:
        raise ValueError(f"replay={fraction} leaves no room for task examples in a batch of {batch_size}.")
    it_task = digits.batches(*task, n_task, seed)
    if n_replay == 0:
        yield from it_task
        return
    it_replay = digits.batches(*replay, n_replay, seed + 1)
    while True:
        yield join(next(it_task), next(it_replay))


def label(classes: Sequence[int]) -> str:
    """``(0, 1, 2, 3, 4)`` -> ``"0-4"``, ``(8, 9)`` -> ``"8,9"``."""
    c = sorted(classes)
    if len(c) > 2 and c == list(range(c[0], c[-1] + 1)):
        return f"{c[0]}-{c[-1]}"
    return ",".join(map(str, c))


def n_params(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def n_changed(params, base) -> int:
    """Entries of ``params`` that differ from ``base``: the size of a (sparse) diff."""
    return int(sum(jnp.sum(p != b) for p, b in zip(jax.tree.leaves(params), jax.tree.leaves(base))))


def l1_to(loss_fn: Callable, params0, lam: float) -> Callable:
    """``loss + lam · mean|θ − θ0|`` over every entry: LT-SFT's regulariser toward the pretrained model."""
    if not lam:
        return loss_fn
    n = n_params(params0)

    def regularised(params, batch, rng=None):
        loss, metrics = loss_fn(params, batch, rng)
        # |d| as d·sign(d): its gradient is sign(d), 0 where an entry has not moved (jnp.abs' gives 1 at 0,
        # which would push every untouched entry off θ0, even those with no data gradient)
        dist = sum(jnp.sum((p - p0) * jnp.sign(p - p0))
                   for p, p0 in zip(jax.tree.leaves(params), jax.tree.leaves(params0)))
        return loss + lam * dist / n, metrics
    return regularised


def lt_sft(name: str, config, params0, data: dict[str, digits.Split], test: digits.Split, loss_fn, metrics_fn,
           log_path: str, seed: int) -> dict:
    """Both LT-SFT phases for one task (``data``: ``task`` and ``replay`` train splits).

    Returns the phase-1 and phase-2 adapters as ``(plan, frozen, trainable)`` triples
    made from ``params0`` (``"full"``, ``"sft"``), the support size and the step times.
    """
    loss_fn = l1_to(loss_fn, params0, config.l1)

    def batches():   # the same batches in both phases
        return mixed_batches(data["task"], data["replay"], config.batch_size, config.replay, seed)

    plan_full = rp.plan([(r".*", rp.full())], params0)
    frozen_full, trainable = plan_full.init(jax.random.key(seed), params0)
    trained_full, h_full = train(f"full {name}", plan_full, frozen_full, trainable, loss_fn, metrics_fn, batches(),
                                 test, config, config.full_steps, config.full_lr, log_path)
    params1 = plan_full.merge(frozen_full, trained_full)

    plan_sft = rp.plan([(KERNELS, rp.sparse.lt_sft(density=config.density))], params0)
    calib = rp.sparse.diffs(params0, params1, list(plan_sft.calibrated()))
    frozen_sft, trainable = plan_sft.init(jax.random.key(seed), params0, calib)
    trained_sft, h_sft = train(f"sft {name}", plan_sft, frozen_sft, trainable, loss_fn, metrics_fn, batches(),
                               test, config, config.sparse_steps, config.sparse_lr, log_path)
    return {"full": (plan_full, frozen_full, trained_full), "sft": (plan_sft, frozen_sft, trained_sft),
            "support": sum(plan_sft.trainable_counts(trained_sft)),
            "step_ms": {"full": median_ms(h_full["times"], config.timing_warmup),
                        "sft": median_ms(h_sft["times"], config.timing_warmup)}}


def support_overlap(sft_a, sft_b) -> dict[str, dict[str, int]]:
    """Per kernel: the sizes of the two supports and of their intersection."""
    (plan, fa, _), (_, fb, _) = sft_a, sft_b
    out = {}
    for leaf, a, b in zip(plan.leaves, plan.treedef.flatten_up_to(fa), plan.treedef.flatten_up_to(fb)):
        if leaf.transform is not None:
            ia, ib = np.asarray(a["idx"]), np.asarray(b["idx"])
            out[leaf.path] = {"a": int(ia.size), "b": int(ib.size), "both": int(np.intersect1d(ia, ib).size)}
    return out


def table(results: dict) -> str:
    """Rows: model variants; columns: 10-way accuracy per test set, trained and changed parameter counts."""
    cols = ["variant"] + [f"acc {results['sets'][s]}" for s in SETS] + ["trained", "nonzero Δ"]
    rows = [cols]
    for name, v in results["variants"].items():
        rows.append([name] + [f"{100 * v['acc'][s]:.1f}%" for s in SETS] + [f"{v['trained']:,}",
                                                                           f"{v['nonzero_diff']:,}"])
    widths = [max(len(r[j]) for r in rows) for j in range(len(cols))]
    fmt = lambda r: "  ".join(x.ljust(w) if j == 0 else x.rjust(w) for j, (x, w) in enumerate(zip(r, widths)))
    lines = [fmt(rows[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows[1:]]
    ov = results["support_overlap"]
    lines.append("support overlap (A ∩ B / |A|): " + ", ".join(
        f"{p} {o['both']}/{o['a']}" for p, o in ov.items()))
    lines.append(f"{results['params']:,} params; 'trained' = trainable entries (both diffs for a sum), "
                 "'nonzero Δ' = entries that differ from the pretrained model")
    return "\n".join(lines)


def plot(path: str, results: dict) -> None:
    """Grouped bars: one group per variant, one bar per test set (10-way accuracy)."""
    import matplotlib.pyplot as plt   # report has already selected the Agg backend
    names = list(results["variants"])
    colors = plt.get_cmap("tab10")(np.arange(len(PLOTTED)))
    width = 0.8 / len(PLOTTED)
    fig, ax = plt.subplots(figsize=(13, 5.5))
    x = np.arange(len(names))
    for j, s in enumerate(PLOTTED):
        accs = [100 * results["variants"][n]["acc"][s] for n in names]
        bars = ax.bar(x + (j - (len(PLOTTED) - 1) / 2) * width, accs, width, color=colors[j],
                      label={"source": "digits ", "all": "all digits "}.get(s, "task ") + results["sets"][s])
        for b, a in zip(bars, accs):
            ax.text(b.get_x() + b.get_width() / 2, a + 0.8, f"{a:.0f}", ha="center", fontsize=7)
    ax.set_xticks(x, [n.replace(" (", "\n(") for n in names], fontsize=9)
    for i, n in enumerate(names):     # separate pretrained | full FT | sparse diffs
        if i and n.split()[0] != names[i - 1].split()[0]:
            ax.axvline(i - 0.5, color="grey", lw=0.8, ls=":")
    ax.set(ylim=(0, 108), ylabel="10-way test accuracy (%)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=9, ncol=len(PLOTTED), loc="upper center", bbox_to_anchor=(0.5, -0.14))
    c = results["config"]
    ax.set_title(f"LT-SFT composition on digits: pretrained on {results['sets']['source']}, task "
                 f"{results['sets']['a']}, task {results['sets']['b']}; sparse diffs at density {c['density']:g} "
                 f"per kernel, L1 {c['l1']:g}", fontsize=11)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises a ReparamError, before anything runs, naming every numeric key out of range (:data:`COMPOSE_RANGES`),
    a replay that leaves a batch no task example, a density ``lt_sft`` refuses, or digit sets that overlap."""
    check_ranges(config, COMPOSE_RANGES)
    if round(config.replay * config.batch_size) >= config.batch_size:
        raise rp.ReparamError(f"config.replay={config.replay} leaves no task example in a batch of "
                              f"config.batch_size={config.batch_size}; lower --config.replay.")
    try:
        rp.sparse.lt_sft(density=config.density)
    except rp.ReparamError as e:
        raise rp.ReparamError(f"config.density: {e} Fix --config.density.") from None
    digit_sets = {k: tuple(config[k]) for k in ("source", "task_a", "task_b")}
    every = sum(digit_sets.values(), ())
    if (len(set(every)) != len(every) or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= 9
                                                 for d in every) or not all(digit_sets.values())):
        raise rp.ReparamError(", ".join(f"config.{k}={v}" for k, v in digit_sets.items()) + " must be non-empty "
                              "disjoint sets of digits 0-9; fix the config or its --config.<key>=value flags.")


def run(config: ml_collections.ConfigDict) -> dict:
    """The whole experiment; returns the results dict (also written to ``output_dir``)."""
    check_config(config)
    t_start = time.perf_counter()
    source_c, a_c, b_c = (tuple(config[k]) for k in ("source", "task_a", "task_b"))
    os.makedirs(config.output_dir, exist_ok=True)
    log_path = os.path.join(config.output_dir, "metrics.jsonl")
    open(log_path, "w").close()

    data = digits.load(config.data_seed, config.test_fraction)
    classes = {"source": source_c, "a": a_c, "b": b_c, "ab": a_c + b_c, "all": tuple(range(10))}
    train_set = {k: pick(data["train"], c) for k, c in classes.items()}
    test_set = {k: jax.device_put(pick(data["test"], c)) for k, c in classes.items()}
    model = MLP(hidden=tuple(config.hidden), n_classes=10)
    fns = lambda c: make_fns(Restricted(model, c) if config.masked_loss else model)   # training losses
    metrics = jax.jit(make_fns(model)[1])                                           # always 10-way

    def accuracy(params) -> dict[str, float]:
        return {k: float(metrics(params, t)["acc"]) for k, t in test_set.items()}

    params0, pre = pretrain(config, model, {"train": train_set["source"], "test": test_set["source"]},
                            *fns(source_c), log_path)
    tasks = {}
    for i, (name, k) in enumerate((("A", "a"), ("B", "b"))):
        tasks[name] = lt_sft(name, config, params0, {"task": train_set[k], "replay": train_set["source"]},
                             join(test_set["source"], test_set[k]), *fns(source_c + classes[k]), log_path,
                             seed=config.seed + 10 * (i + 1))

    n = n_params(params0)
    merged = lambda kind, names: rp.merge_adapters([tasks[t][kind] for t in names], params0)
    variants = {"pretrained": (params0, 0)}                       # name: (params, trainable entries)
    for kind, tag, size in (("full", "full FT", lambda t: n), ("sft", "LT-SFT", lambda t: tasks[t]["support"])):
        for names in (("A",), ("B",), ("A", "B")):
            name = f"{tag} {'+'.join(names)}" + (" (sum)" if len(names) > 1 else "")
            variants[name] = (merged(kind, names), sum(size(t) for t in names))
    results = {
        "sets": {k: TAGS[k] + label(c) for k, c in classes.items()},   # column names
        "params": n,
        "pretrain": pre,
        "variants": {name: {"acc": accuracy(p), "trained": t, "nonzero_diff": n_changed(p, params0)}
                     for name, (p, t) in variants.items()},
        "support_overlap": support_overlap(tasks["A"]["sft"], tasks["B"]["sft"]),
        "step_ms": {t: tasks[t]["step_ms"] for t in tasks},
        "config": config.to_dict(),
    }
    results["wall_s"] = time.perf_counter() - t_start
    report.write_json(os.path.join(config.output_dir, "results.json"), results)
    plot(os.path.join(config.output_dir, "results.png"), results)
    print("\n" + table(results), flush=True)
    print(f"\nwall time {results['wall_s']:.1f} s; wrote {log_path}, results.json and results.png to "
          f"{config.output_dir}", flush=True)
    return results


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    try:
        run(flags.FLAGS.config)
    except (rp.ReparamError, FloatingPointError) as e:     # bad input or a diverged run: the message, exit 1
        sys.exit(f"experiments.compose: {e}")


if __name__ == "__main__":
    app.run(main, flags_parser=functools.partial(parse_flags, prog="experiments.compose"))
