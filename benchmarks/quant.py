"""LoRA on a quantised frozen base, side by side: MiniLM with f32, bf16, int8, nf4 bases; SmolLM2 with f32, nf4 and
its GGUF file's own q4_1 blocks (issue 16's benchmark; not a test).

    python -m benchmarks.quant                         # -> results/quant.{md,json,png}
    python -m benchmarks.quant --models=minilm --rounds=5
    python -m benchmarks.quant --rounds=1 --steps=2 --warmup=1 --acc-steps=2 --test-examples=32 --layers=2 \
        --out=/tmp/quant_smoke                          # a smoke run (minutes)

Each base is the runner's: ``experiments.run.format_base`` with ``--config.base_format`` = ``none`` (f32),
``bf16``, ``int8``, ``nf4`` or ``gguf`` on the config's adapted kernels (MiniLM: the 36 attention and feed-forward
kernels, ``experiments/configs/tweets.py``; SmolLM2: the 7 stacked projections, ``smollm_tweets.py``, its first
``--layers`` layers), the task's params and loss (``experiments.tasks``) and the runner's LoRA (r=8, alpha 16;
MiniLM's head trained in full). The step is ``rp.train.make_train_step`` with AdamW on the task's first training
batch (the config's batch size and sequence length unless ``--batch`` / ``--seq``).

Per base, each in its own process (so that its RSS is its own), ``--rounds`` rounds, each running every base of
a model once in a shuffled order: ``--warmup`` untimed steps, then the median of ``--steps`` timed ones; the
table gives the median round. Columns: step ms and its ratio to the f32 base's; XLA's memory analysis of the
compiled step (``compiled.memory_analysis()``: argument bytes -- the frozen tree, trainables, optimizer state
and batch -- temporaries, and the peak, arguments + outputs + temporaries - aliased); the process's RSS after
setup (model, frozen tree, compiled step; what the allocator has not returned of the f32 weights a base was
quantised from counts too) and its peak while training (VmHWM reset before the first step); the frozen tree's
bytes (``rp.quant.footprint``) and their ratio to the f32 base's, and the adapted kernels' bases alone against
their f32 bytes. Validation and test accuracy after ``experiments.run.run`` with LoRA on each base, one more
process per base, at the runner's default budget (MiniLM: 60 steps, the 3,724 test tweets; SmolLM2: 40 steps
of eight chats, the first 512 test tweets) unless ``--acc-steps`` / ``--test-examples`` say otherwise; the check
compares each base's test accuracy with the f32 base's against two binomial standard deviations of their
difference. ``--keep`` keeps the rows of models not measured in this run from ``<tag>.json`` (to re-run one
model). The issue's targets
are checked below the table: a 4-bit base <= 0.16 x the f32 base's bytes, its step <= 1.3 x the f32-base step,
accuracy within noise of the f32 base.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

from benchmarks.minilm import OUT, median_run, reset_peak_rss, rss_mb, run_child

BASES = {"minilm": {"f32": "none", "bf16": "bf16", "int8": "int8", "nf4": "nf4"},
         "smollm": {"f32": "none", "bf16": "bf16", "int8": "int8", "nf4": "nf4", "gguf q4_1": "gguf"}}
MODELS = {"minilm": "all-MiniLM-L6-v2", "smollm": "SmolLM2-135M-Instruct"}
TARGETS = {"bytes": 0.16, "step": 1.3}          # issue 16: 4-bit base bytes and step time against the f32 base's


def config_for(model: str, fmt: str, args):
    """The runner's config of ``model``'s task with ``base_format=fmt`` (SmolLM2: its first ``args.layers``)."""
    from experiments.configs import smollm_tweets, tweets
    c = (tweets if model == "minilm" else smollm_tweets).get_config()
    c.base_format, c.methods, c.progress = fmt, "lora", False
    if model == "smollm":
        c.layers = args.layers
    if args.batch:
        c.batch_size = args.batch
    if args.seq:
        c.seq_len = args.seq
    return c


def _bytes(tree) -> tuple[int, int]:
    """(bytes held, bytes in f32) of a tree's arrays, quantised ones included (``rp.quant.footprint``)."""
    from reparam import quant
    per = quant.footprint(tree)
    return sum(c[1] for c in per.values()), sum(c[2] for c in per.values())


def time_step(model: str, fmt: str, args) -> dict:
    """One base: the runner's task and LoRA plan on it, the compiled step's memory analysis, RSS, and the median
    of ``args.steps`` timed steps."""
    import jax
    import optax

    import reparam as rp
    from benchmarks.timing import median, memory, run_steps
    from experiments import methods as M
    from experiments import run as R

    c = config_for(model, fmt, args)
    R.check_config(c)
    t0 = time.perf_counter()
    task = R.TASKS[c.task](c, R.base_dtype(c))
    task = task._replace(params=R.format_base(task.params, c))      # the f32 kernels, once quantised, are dropped
    batch = jax.device_put(next(task.batches(c.seed, 0)))
    plan = rp.plan(M.METHODS["lora"](c), task.params, stacked=c.get("stacked") or None)
    frozen, trainable = jax.block_until_ready(plan.init(jax.random.key(c.seed), task.params))
    setup_s = time.perf_counter() - t0
    bases = [f["base"] for leaf, f in zip(plan.leaves, plan.treedef.flatten_up_to(frozen))
             if leaf.transform is not None and "base" in f]
    frozen_bytes, frozen_f32 = _bytes(frozen)
    base_bytes, base_f32 = _bytes(bases)

    opt = optax.adamw(M.learning_rate(c, "lora"))
    step = rp.train.make_train_step(plan, task.loss_fn, opt)
    state = rp.train.init_state(trainable, opt, jax.random.key(c.seed))
    t0 = time.perf_counter()
    compiled = step.lower(state, frozen, batch).compile()
    compile_s = time.perf_counter() - t0
    routes = sorted({u.route for s in step.routing.uses.values() for u in s.values()})
    rss = rss_mb("VmRSS")
    reset = reset_peak_rss()
    state, times, losses = run_steps(compiled, state, frozen, batch, args.warmup, args.steps)
    return {"model": model, "base": fmt, "step_ms": median(times), "step_ms_all": times,
            "xla": {k: v / 2 ** 20 for k, v in memory(compiled).items()}, "rss_mb": rss,
            "rss_peak_mb": rss_mb("VmHWM") if reset else None, "frozen_mb": frozen_bytes / 2 ** 20,
            "frozen_f32_mb": frozen_f32 / 2 ** 20, "bases_mb": base_bytes / 2 ** 20, "bases_f32_mb": base_f32 / 2 ** 20,
            "frozen": rp.quant.report(frozen), "trainable": int(sum(plan.trainable_counts(trainable))),
            "batch": list(batch["input_ids"].shape), "routes": routes, "loss_first": losses[0], "loss": losses[-1],
            "setup_s": setup_s, "compile_s": compile_s, "backend": jax.default_backend()}


def accuracy(model: str, fmt: str, args) -> dict:
    """``experiments.run.run`` with LoRA on the base: validation and test accuracy after ``args.acc_steps`` steps
    on ``args.test_examples`` test examples (each -1: the config's own budget)."""
    from experiments import run as R
    c = config_for(model, fmt, argparse.Namespace(**{**vars(args), "batch": 0, "seq": 0}))   # the runner's batch
    if args.acc_steps > 0:
        c.adapt_steps, c.eval_every = args.acc_steps, min(c.eval_every, args.acc_steps)
    if args.test_examples >= 0:
        c.test_examples = args.test_examples
    with tempfile.TemporaryDirectory() as d:
        c.output_dir = d
        r = R.run(c)
    lora = r["methods"]["lora"]
    n_test = c.test_examples or 3724                   # 0: the whole test split of the tweets, 3,724
    return {"model": model, "base": fmt, "val_acc": lora["monitor_acc"], "test_acc": lora["acc"], "n_test": n_test,
            "test_loss": lora["test_loss"], "start_test_acc": r.get("start_test_acc"), "acc_steps": c.adapt_steps, "test_examples": c.test_examples}


def child(spec: str, args) -> dict:
    model, fmt, what = spec.split(":")
    return (accuracy if what == "acc" else time_step)(model, fmt, args)


# --- the driver ----------------------------------------------------------------------------------------------

def _extra(args) -> list[str]:
    return [f"--layers={args.layers}", f"--acc-steps={args.acc_steps}", f"--test-examples={args.test_examples}"]


def measure(args) -> list[dict]:
    """Every model's bases, each a fresh process, shuffled within each of ``args.rounds`` rounds; then (MiniLM,
    ``acc_steps`` != 0) one accuracy run per base. One row per (model, base)."""
    rng = np.random.default_rng(0)
    rows = []
    for model in args.models.split(","):
        bases = BASES[model]
        runs = {b: [] for b in bases}
        for r in range(args.rounds):
            for i in rng.permutation(len(bases)):
                label = list(bases)[i]
                res = run_child("benchmarks.quant", f"{model}:{bases[label]}:step", args, _extra(args))
                runs[label].append(res)
                print(f"{MODELS[model]:>22} {label:>9} round {r + 1}: " + (f"FAILED {res['error']}" if "error" in res
                      else f"{res['step_ms']:8.1f} ms, frozen {res['frozen_mb']:.1f} MB, XLA temp "
                           f"{res['xla'].get('temp', float('nan')):.1f} MB, RSS {res['rss_mb']:.0f} MB"), flush=True)
        for label in bases:
            row = {"label": label, **median_run(runs[label])}
            if args.acc_steps and "error" not in row:
                acc = run_child("benchmarks.quant", f"{model}:{bases[label]}:acc", args, _extra(args))
                row["accuracy"] = acc
                print(f"{MODELS[model]:>22} {label:>9} accuracy: " + (f"FAILED {acc['error']}" if "error" in acc else
                      f"val {acc['val_acc']:.3f}, test {acc['test_acc']:.3f}"), flush=True)
            rows.append({"model": model, **row})
    return rows


def _f(v, spec=".1f") -> str:
    return "" if v is None else format(v, spec)


def _acc_check(acc: dict, ref: dict) -> str:
    """Test accuracy against the f32 base's: the difference and two binomial standard deviations of it."""
    if acc.get("test_acc") is None or ref.get("test_acc") is None:
        return ""
    a, b, n = acc["test_acc"], ref["test_acc"], acc.get("n_test") or ref.get("n_test")
    if not n:
        return f"; test acc {a:.3f} vs f32 {b:.3f}"
    two_sd = 2 * np.sqrt(a * (1 - a) / n + b * (1 - b) / n)
    within = "within" if abs(a - b) <= two_sd else "OUTSIDE"
    return (f"; test acc {a:.3f} vs f32 {b:.3f} on {n} tweets ({100 * (a - b):+.1f} points, {within} "
            f"2 sd = {100 * two_sd:.1f})")


def markdown(rows, args) -> str:
    lines = ["| model | base | step ms | x f32 step | XLA argument MB | XLA temp MB | XLA peak MB | RSS MB | "
             "peak RSS in training MB | frozen MB | x f32 frozen | adapted bases MB | x f32 bases | val acc | "
             "test acc | test acc before training |", "|---|---|" + "---:|" * 14]
    checks = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        ref = next((r for r in mine if r["label"] == "f32" and "error" not in r), None)
        ref_acc = (ref or {}).get("accuracy", {})
        for r in mine:
            if "error" in r:
                lines.append(f"| {MODELS[model]} | {r['label']} | FAILED: {' '.join(r['error'].split())[:200]} |"
                             + " |" * 13)
                continue
            x_step = r["step_ms"] / ref["step_ms"] if ref else None
            x_frozen = r["frozen_mb"] / ref["frozen_mb"] if ref else None
            x_bases = r["bases_mb"] / r["bases_f32_mb"]
            acc = r.get("accuracy", {})
            lines.append(f"| {MODELS[model]} | {r['label']} | {r['step_ms']:.1f} | {_f(x_step, '.2f')} | "
                         f"{_f(r['xla'].get('argument'))} | {_f(r['xla'].get('temp'))} | {_f(r['xla'].get('peak'))} | "
                         f"{r['rss_mb']:.0f} | {_f(r['rss_peak_mb'], '.0f')} | {r['frozen_mb']:.1f} | "
                         f"{_f(x_frozen, '.3f')} | {r['bases_mb']:.1f} | {x_bases:.3f} | {_f(acc.get('val_acc'), '.3f')} | "
                         f"{_f(acc.get('test_acc'), '.3f')} | {_f(acc.get('start_test_acc'), '.3f')} |")
            if r["label"] in ("nf4", "gguf q4_1") and ref:
                ok = lambda b: "meets" if b else "MISSES"
                checks.append(f"- {MODELS[model]} {r['label']}: bases {x_bases:.3f} x f32 ({ok(x_bases <= TARGETS['bytes'])} "
                              f"<= {TARGETS['bytes']}); step {x_step:.2f} x the f32 base's ({ok(x_step <= TARGETS['step'])} "
                              f"<= {TARGETS['step']})" + _acc_check(acc, ref_acc))
    return "\n".join(lines + ([""] + ["Targets (issue 16):"] + checks if checks else []))


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = [r for r in rows if "error" not in r]
    models = list(dict.fromkeys(r["model"] for r in ok))
    panels = [("step_ms", "step ms / f32 base's", TARGETS["step"]), ("bases", "adapted bases' bytes / f32", TARGETS["bytes"]),
              ("acc", "test acc (bars: 2 binomial sd)", None), ("rss", "RSS after setup MB", None)]
    fig, axes = plt.subplots(len(models), len(panels), figsize=(4 * len(panels), 3.2 * len(models)), squeeze=False)
    for axrow, model in zip(axes, models):
        mine = [r for r in ok if r["model"] == model]
        ref = next((r for r in mine if r["label"] == "f32"), mine[0])
        values = {"step_ms": [r["step_ms"] / ref["step_ms"] for r in mine],
                  "bases": [r["bases_mb"] / r["bases_f32_mb"] for r in mine],
                  "acc": [r.get("accuracy", {}).get("test_acc", np.nan) for r in mine],
                  "rss": [r["rss_mb"] for r in mine]}
        n = [r.get("accuracy", {}).get("n_test") or np.nan for r in mine]       # no bar without a count
        sd = {"acc": [2 * np.sqrt(a * (1 - a) / k) for a, k in zip(values["acc"], n)]}
        for ax, (key, title, target) in zip(axrow, panels):
            ax.bar([r["label"] for r in mine], values[key], yerr=sd.get(key), capsize=3, color="tab:blue")
            if target:
                ax.axhline(target, color="g", ls="--", lw=0.8, label=f"target {target}")
                ax.legend(fontsize=7)
            ax.set_title(f"{MODELS[model]}: {title}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(rows, args) -> str:
    os.makedirs(args.out, exist_ok=True)
    cmd = f"python -m benchmarks.quant {' '.join(sys.argv[1:])}".strip()
    head = (f"LoRA (r=8, alpha 16) on quantised frozen bases; the runner's tasks and batches; per base the median "
            f"of {args.rounds} round(s) of {args.steps} timed steps after {args.warmup} warm-up, each base in its "
            f"own process, the bases shuffled within each round; SmolLM2: its first {args.layers} layers; accuracy "
            f"after the runner's budget (MiniLM 60 steps, all test tweets; SmolLM2 40 steps, 512) unless the command "
            f"says otherwise; {os.cpu_count()} CPUs; `{cmd}`")
    sources = {m: head for m in args.models.split(",")}
    for m, h in (getattr(args, "kept", None) or {}).items():
        sources[m] = h
        head += f"\n\nThe rows of {MODELS[m]} are kept from an earlier run: {h}"
    text = head + "\n\n" + markdown(rows, args)
    with open(os.path.join(args.out, f"{args.tag}.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, f"{args.tag}.json"), "w") as f:
        json.dump({"header": head, "sources": sources, "args": vars(args), "rows": rows}, f, indent=1)
    plot(rows, os.path.join(args.out, f"{args.tag}.png"))
    return text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="minilm,smollm", help="comma-separated: minilm, smollm")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per process; their median")
    ap.add_argument("--batch", type=int, default=0, help="0: the config's batch size")
    ap.add_argument("--seq", type=int, default=0, help="0: the config's sequence length")
    ap.add_argument("--layers", type=int, default=30, help="SmolLM2's first layers (30: the whole model)")
    ap.add_argument("--acc-steps", type=int, default=-1,
                    help="LoRA steps before the accuracy (-1: the config's, MiniLM 60, SmolLM2 40; 0: no accuracy)")
    ap.add_argument("--test-examples", type=int, default=-1,
                    help="test tweets for the accuracy (-1: the config's, MiniLM all, SmolLM2 512; 0: all 3,724)")
    ap.add_argument("--keep", action="store_true", help="keep the other models' rows from <tag>.json")
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--tag", default="quant", help="output file names <tag>.{md,json,png}")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    unknown = set(args.models.split(",")) - set(BASES)
    if unknown:
        raise SystemExit(f"unknown models {sorted(unknown)}; choose from {sorted(BASES)}")
    args.huge_pages, args.threads = "reparam", None     # run_child: reparam processes on 2 MiB pages, as the runner
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    rows = measure(args)
    path = os.path.join(args.out, f"{args.tag}.json")
    if args.keep and os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        kept = [r for r in old["rows"] if r["model"] not in args.models.split(",")]
        args.kept = {m: old.get("sources", {}).get(m, old["header"]) for m in sorted({r["model"] for r in kept})}
        rows = sorted(kept + rows, key=lambda r: list(BASES).index(r["model"]))
    print("\n" + write(rows, args))
    print(f"\nwrote {args.tag}.md, .json, .png to {args.out}")
    if any("error" in r for r in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
