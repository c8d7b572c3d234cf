"""Every method's MiniLM train step over reparam LoRA's, timed round-robin in ONE process.

    python -m benchmarks.minilm_ratios                  # all methods -> results/minilm_ratios.{json,md,png}
    python -m benchmarks.minilm_ratios --methods=lora,vera,fourierft --rounds=5 --tag=minilm_ratios_some

``benchmarks/minilm.py`` runs each configuration in a fresh process, which is what peak memory
and a comparison with PEFT need; but step times of one configuration vary by 10-20% from process to
process on this machine (memory placement, page faults), enough to move a method across a
1.25x bar. Here every method is compiled in one process (``rp.train.use_huge_pages()`` first, as
the runner), the same model, batch (32 x 64) and hyperparameters as ``benchmarks/minilm.py``, and then
the compiled steps run in turns: ``--rounds`` rounds, each running every method once (after
``--warmup`` untimed steps each) in a shuffled order, so slow drifts of the machine hit all methods alike. The reported
figure is each method's median step over LoRA's median, with the interquartile range of the
per-round ratios (each round's step over the same round's LoRA step): single steps still vary by up
to 2x here, in one process as across processes. The fastest step over LoRA's fastest is shown too:
interference here only adds time, so the least-disturbed step is an estimate of what a step costs
(one lucky step sets it, though). Next to it, the compiled step's GFLOP (XLA's cost
analysis: deterministic, so it shows what a method's step must compute, apart from the machine's noise).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from benchmarks.minilm import OUT, all_methods, init_method, model_and_batch, rules_for

BAR = 1.25


def measure(names: list[str], args) -> list[dict]:
    import jax
    import numpy as np
    import optax

    import reparam as rp

    clf, params, batch, loss_fn = model_and_batch(args.batch, args.seq)
    opt = optax.adamw(1e-4)
    steps = {}
    for name in names:
        t0 = time.perf_counter()
        plan, frozen, trainable = init_method(name, clf, params, batch, loss_fn)
        step = rp.train.make_train_step(plan, loss_fn, opt, donate=False)   # the same state every turn
        state = rp.train.init_state(trainable, opt, jax.random.key(2))
        compiled = step.lower(state, frozen, batch).compile()
        for _ in range(args.warmup):
            jax.block_until_ready(compiled(state, frozen, batch))
        steps[name] = (compiled, state, frozen, int(sum(plan.trainable_counts(trainable))), gflop(compiled))
        print(f"{name:>12}: compiled and warmed up in {time.perf_counter() - t0:.0f} s", flush=True)
    times = {name: [] for name in names}
    order = np.random.default_rng(0)
    for r in range(args.rounds):
        for name in map(str, order.permutation(names)):    # a fresh order each round: none always follows another
            compiled, state, frozen, *_ = steps[name]
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(state, frozen, batch))
            times[name].append(1e3 * (time.perf_counter() - t0))
        print(f"round {r + 1}/{args.rounds}: " + " ".join(f"{n} {t[-1]:.0f}" for n, t in times.items()), flush=True)
    lora = np.array(times["lora"])
    rows = []
    for name, ts in times.items():
        per_round = np.array(ts) / lora
        rows.append({"method": name, "step_ms": float(np.median(ts)), "step_ms_all": ts,
                     "x_lora": float(np.median(ts) / np.median(lora)),
                     "x_lora_min": float(np.min(ts) / np.min(lora)),
                     "x_lora_rounds_q25": float(np.percentile(per_round, 25)),
                     "x_lora_rounds_q75": float(np.percentile(per_round, 75)),
                     "trainable": steps[name][3], "gflop": steps[name][4],
                     "gflop_x_lora": steps[name][4] / steps["lora"][4]})
    return rows


def gflop(compiled) -> float:
    """The compiled step's floating-point operations (XLA's cost analysis), in GFLOP."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan"))) / 1e9


def markdown(rows) -> str:
    lines = ["| method | step ms (median) | x reparam LoRA | per-round ratio, 25-75% | fastest step, x LoRA's | "
             "within 1.25x | GFLOP (x LoRA) | trainable |", "|---|---:|---:|---:|---:|:-:|---:|---:|"]
    for r in rows:
        ok = "yes" if r["x_lora"] <= BAR else "**no**"
        lines.append(f"| {r['method']} | {r['step_ms']:.0f} | {r['x_lora']:.2f} | {r['x_lora_rounds_q25']:.2f} - "
                     f"{r['x_lora_rounds_q75']:.2f} | {r['x_lora_min']:.2f} | {ok if r['method'] != 'lora' else ''} | "
                     f"{r['gflop']:.1f} ({r['gflop_x_lora']:.2f}) | {r['trainable']:,} |")
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    x = np.arange(len(rows))
    v = np.array([r["x_lora"] for r in rows])
    err = np.array([[max(0.0, r["x_lora"] - r["x_lora_rounds_q25"]) for r in rows],
                    [max(0.0, r["x_lora_rounds_q75"] - r["x_lora"]) for r in rows]])
    fig, ax = plt.subplots(figsize=(max(8, 0.45 * len(rows)), 3.8))
    ax.bar(x, v, 0.7, yerr=err, capsize=2, color=["tab:blue" if r <= BAR else "tab:red" for r in v])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(BAR, color="tab:red", ls=":", lw=1, label=f"{BAR}x reparam LoRA")
    ax.set_xticks(x, [r["method"] for r in rows], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("step time / reparam LoRA's")
    ax.set_title("all-MiniLM-L6-v2 train step, batch 32 x 64, CPU, one process, round-robin "
                 "(bars: median ratio; whiskers: per-round ratios, 25-75%)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=None, help="comma-separated (lora is always added first); default: all")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps of each method after compiling it")
    ap.add_argument("--rounds", type=int, default=11, help="timed turns of every method")
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--tag", default="minilm_ratios", help="output file names <tag>.{json,md,png}")
    args = ap.parse_args()
    import reparam as rp
    rp.train.use_huge_pages()
    wanted = args.methods.split(",") if args.methods else [m for m in all_methods().split(",") if "@" not in m]
    names = ["lora"] + [m for m in dict.fromkeys(w.strip() for w in wanted) if m and m != "lora"]
    for name in names:
        if "@" in name:
            raise SystemExit(f"{name}: a matmul mode is a benchmarks.minilm option; here every method runs the "
                             "default hot path")
        rules_for(name)                                      # unknown names fail before any work
    rows = measure(names, args)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.tag}.json"), "w") as f:
        json.dump({"batch": args.batch, "seq": args.seq, "warmup": args.warmup, "rounds": args.rounds,
                   "cpus": os.cpu_count(), "rows": rows}, f, indent=1)
    table = markdown(rows)
    with open(os.path.join(args.out, f"{args.tag}.md"), "w") as f:
        f.write(f"all-MiniLM-L6-v2, batch {args.batch} x {args.seq}, every method compiled in one process and "
                f"timed round-robin, {args.rounds} rounds after {args.warmup} warm-up steps each; "
                f"`python -m benchmarks.minilm_ratios {' '.join(sys.argv[1:])}`\n\n{table}\n")
    plot(rows, os.path.join(args.out, f"{args.tag}.png"))
    print("\n" + table + f"\n\nwrote {args.tag}.json, .md, .png to {args.out}")


if __name__ == "__main__":
    main()
