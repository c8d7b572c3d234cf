"""The papers' claims, measured: each claim's arms trained with several seeds, a verdict table and a plot.

    python -m benchmarks.claims                     # 3 seeds -> results/claims.{json,md,png} (~25 min, 2 cores)
    python -m benchmarks.claims --seeds=5 --steps=100
    python -m benchmarks.claims --claims=pissa,vera # some claims only (the arms they need)

Task: the runner's tweet sentiment with all-MiniLM-L6-v2 (``experiments/configs/tweets.py``: adapters on the
36 attention and feed-forward kernels, the 3-way head trained in full, batch 16 x 64 tokens, AdamW) --
SmolLM2 does not fit this budget: a 30-layer step takes ~2.5 s on 2 cores, and the 27 runs below would take
hours. Each seed changes the head's and the adapters' initialisation and the batch order; within a seed every
arm sees the same batches, so the comparisons are paired. Per run: ``--steps`` steps, then the accuracy on the
first ``--test`` test tweets; the training loss is the mean of the last 10 steps' batch losses.

Claims (the paper's figure is what its abstract / main table reports, on its own models and tasks):

* PiSSA converges faster than LoRA at the same rank (r=8, alpha 16) and learning rate (3e-4 for both): lower
  training loss after N steps (Meng et al. 2024: faster convergence, e.g. GSM8K 72.9% vs 67.4% on Mistral-7B).
* VeRA reaches LoRA's accuracy with ~10x fewer trainable parameters (Kopiczko et al. 2024: GLUE on par with
  LoRA at 10x fewer params): VeRA r=256 at its runner lr (1e-2) vs LoRA r=8 at its (1e-3).
* DoRA >= LoRA (Liu et al. 2024: +3.7 / +1.0 commonsense points on LLaMA-7B / 13B): both r=8 at lr 1e-3.
* rsLoRA beats LoRA at high rank (Kalajdzievski 2023: LoRA's learning stalls as r grows, rsLoRA's scale
  alpha/sqrt(r) keeps it learning): r=64, alpha 16, the same lr 3e-4: lower training loss.
* Sparse fine-tuning >= LoRA at an equal parameter budget (S²FT, Yang et al. 2024: beats LoRA on commonsense
  reasoning; SpIEL / sparse adapters similar): a random sparse mask and S²FT's structured (whole output
  channels) mask with exactly LoRA r=8's count per kernel, lr 1e-3, vs LoRA r=8.

Verdicts from the paired differences d (arm minus baseline, signed so that d > 0 is what the paper claims;
accuracy in points, loss as baseline minus arm), mean m and standard error se over the seeds, tol = 1 accuracy
point / 0.01 loss. A claim that the arm is better (PiSSA, rsLoRA): "holds" when m - 2 se > 0, "does not hold"
when m + 2 se <= 0, else "inconclusive". A claim that the arm is at least as good (VeRA "reaches", DoRA >=,
sparse >=): "holds" when m - 2 se > -tol (not worse by more than tol; "a tie" added when m - 2 se <= 0, i.e.
no gain shown), "does not hold" when m + 2 se < -tol, else "inconclusive".
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "benchmarks", "results")
ATTN = r"encoder/layer_\d+/attention/(query|key|value|output)/kernel"
FFN_IN = r"encoder/layer_\d+/intermediate/kernel"
FFN_OUT = r"encoder/layer_\d+/output/kernel"
HEAD = r"head/.*"
D, FFN = 384, 1536
LORA8 = {"attn": 8 * (D + D), "ffn": 8 * (D + FFN)}       # LoRA r=8's trainable count per kernel


def arms() -> dict:
    """name -> (rules, lr, label). Rules built lazily (reparam imported in the caller)."""
    import reparam as rp

    def on_all(t):
        return [(f"({ATTN}|{FFN_IN}|{FFN_OUT})", t), (HEAD, rp.full())]

    return {
        "lora": (on_all(rp.lora(8, 16)), 1e-3, "LoRA r=8, lr 1e-3"),
        "lora_3e-4": (on_all(rp.lora(8, 16)), 3e-4, "LoRA r=8, lr 3e-4"),
        "pissa_3e-4": (on_all(rp.pissa(8, 16)), 3e-4, "PiSSA r=8, lr 3e-4"),
        "vera": (on_all(rp.vera(256, store_bases=True)), 1e-2, "VeRA r=256, lr 1e-2"),
        "dora": (on_all(rp.dora(8, 16)), 1e-3, "DoRA r=8, lr 1e-3"),
        "lora64": (on_all(rp.lora(64, 16)), 3e-4, "LoRA r=64, lr 3e-4"),
        "rslora64": (on_all(rp.lora(64, 16, rslora=True)), 3e-4, "rsLoRA r=64, lr 3e-4"),
        "sparse_eq": ([(ATTN, rp.sparse.random(k=LORA8["attn"])), (f"({FFN_IN}|{FFN_OUT})",
                       rp.sparse.random(k=LORA8["ffn"])), (HEAD, rp.full())], 1e-3,
                      "random sparse, LoRA r=8's count per kernel, lr 1e-3"),
        "s2ft_eq": ([(ATTN, rp.sparse.structured(axis="out", k=LORA8["attn"] // D)),
                     (FFN_IN, rp.sparse.structured(axis="out", k=LORA8["ffn"] // D)),       # 40 columns of 384
                     (FFN_OUT, rp.sparse.structured(axis="out", k=LORA8["ffn"] // FFN)),    # 10 columns of 1536
                     (HEAD, rp.full())], 1e-3, "S²FT (whole output channels), LoRA r=8's count, lr 1e-3"),
    }


# claim -> (text, paper, arm, baseline, metric, kind)
CLAIMS = {
    "pissa": ("PiSSA converges faster than LoRA (same rank and lr)", "faster convergence; GSM8K 72.9 vs 67.4 "
              "(Mistral-7B)", "pissa_3e-4", "lora_3e-4", "loss", "better"),
    "vera": ("VeRA reaches LoRA's accuracy with ~10x fewer parameters", "GLUE on par with LoRA, 10x fewer "
             "params", "vera", "lora", "acc", "at least"),
    "dora": ("DoRA >= LoRA", "+3.7 / +1.0 points commonsense (LLaMA-7B/13B)", "dora", "lora", "acc",
             "at least"),
    "rslora": ("rsLoRA beats LoRA at high rank (r=64)", "LoRA stalls at high rank, rsLoRA keeps learning",
               "rslora64", "lora64", "loss", "better"),
    "sparse": ("random sparse >= LoRA at equal budget", "sparse FT matches or beats LoRA (SpIEL, SHiRA)",
               "sparse_eq", "lora", "acc", "at least"),
    "s2ft": ("S²FT >= LoRA at equal budget", "beats LoRA on commonsense reasoning (S²FT)", "s2ft_eq", "lora",
             "acc", "at least"),
}
TOL = {"acc": 1.0, "loss": 0.01}


_TASK: dict = {}


def run_arm(name: str, seed: int, args, cache: dict) -> dict:
    """One arm with one seed (from ``cache`` when it ran before with the same settings)."""
    key = f"{name}/seed{seed}/steps{args.steps}/test{args.test}"
    if key in cache:
        return cache[key]
    import jax
    import jax.numpy as jnp
    import numpy as np

    import reparam as rp
    from experiments import run as R
    from experiments import tasks
    from experiments.configs import tweets

    c = tweets.get_config()
    c.update({"seed": seed, "adapt_steps": args.steps, "eval_every": args.steps, "val_examples": 64,
              "test_examples": args.test, "progress": False, "output_dir": args.work})
    if _TASK.get("seed") != seed:                       # the model, head and splits of this seed, built once
        _TASK.update(seed=seed, task=tasks.tweets(c, jnp.float32))
    task = _TASK["task"]
    rules, lr, _ = arms()[name]
    t0 = time.perf_counter()
    plan = rp.plan(rules, task.params)
    frozen, trainable = plan.init(jax.random.key(seed), task.params)
    os.makedirs(args.work, exist_ok=True)
    trained, h = R.train(name, plan, frozen, trainable, task.loss_fn, task.metrics_fn,
                         lambda start: task.batches(seed, start), task.monitor, c, args.steps, lr,
                         os.path.join(args.work, "metrics.jsonl"), "val")
    test = jax.device_get(task.test(jax.jit(plan.apply)(frozen, trained)))
    res = {"arm": name, "seed": seed, "acc": 100 * float(test["acc"]), "loss": float(np.mean(h["loss"][-10:])),
           "losses": [float(x) for x in h["loss"]], "trainable": int(sum(plan.trainable_counts(trainable))),
           "lr": lr, "wall_s": time.perf_counter() - t0}
    if not all(math.isfinite(x) for x in res["losses"]):
        raise SystemExit(f"claims: arm {name} seed {seed}: non-finite training loss; lower its lr ({lr}).")
    cache[key] = res
    return res


def verdict(d: list[float], metric: str, kind: str) -> tuple[float, float, str]:
    """(mean, standard error, verdict) of paired differences ``d`` (d > 0: as the paper claims); ``kind``
    "better" (the arm beats the baseline) or "at least" (it is not worse by more than ``TOL[metric]``)."""
    n = len(d)
    m = sum(d) / n
    se = (math.sqrt(sum((x - m) ** 2 for x in d) / (n - 1)) / math.sqrt(n)) if n > 1 else float("inf")
    lo, hi, tol = m - 2 * se, m + 2 * se, TOL[metric]
    if kind == "better":
        return m, se, "holds" if lo > 0 else ("does not hold" if hi <= 0 else "inconclusive")
    if lo > -tol:
        return m, se, "holds" if lo > 0 else "holds (a tie)"
    return m, se, "does not hold" if hi < -tol else "inconclusive"


def _ms(xs) -> str:
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return f"{m:.3f} ± {sd:.3f}" if max(abs(x) for x in xs) < 10 else f"{m:.1f} ± {sd:.1f}"


def table(rows: list[dict], runs: dict, args) -> str:
    out = ["| claim | paper | metric | ours: arm | ours: baseline | paired difference (mean ± se) | "
           "trainable arm / baseline | verdict |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a, b = runs[r["arm"]], runs[r["baseline"]]
        unit = "test acc %" if r["metric"] == "acc" else "train loss (last 10 steps)"
        out.append(f"| {r['text']} | {r['paper']} | {unit} | {r['arm_label']}: {_ms([x[r['metric']] for x in a])} | "
                   f"{r['baseline_label']}: {_ms([x[r['metric']] for x in b])} | {r['mean']:+.3f} ± {r['se']:.3f} | "
                   f"{a[0]['trainable']:,} / {b[0]['trainable']:,} | **{r['verdict']}** |")
    return "\n".join(out)


def plot(rows: list[dict], runs: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [1.2, 1]})
    ax = axes[0]
    for i, r in enumerate(rows):
        d = np.array(r["diffs"]) / TOL[r["metric"]]
        ax.scatter(d, np.full(len(d), i), color="0.6", s=14, zorder=2)
        ax.errorbar(r["mean"] / TOL[r["metric"]], i, xerr=2 * r["se"] / TOL[r["metric"]], fmt="o",
                    color="tab:red" if r["verdict"] == "does not hold" else
                    "tab:green" if r["verdict"].startswith("holds") else "tab:orange",
                    capsize=3, zorder=3)
    ax.axvline(0, color="k", lw=0.8)
    ax.axvline(-1, color="k", lw=0.6, ls=":")
    ax.set_yticks(range(len(rows)), [f"{r['claim']}: {r['verdict']}" for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("paired difference in the claim's direction, in units of tol (1 acc point / 0.01 loss); "
                  "dots: seeds, bars: mean ± 2 se", fontsize=7)
    ax.set_title("the claims (green holds, red does not, orange inconclusive)", fontsize=9)
    ax = axes[1]
    for arm, colour in (("lora_3e-4", "tab:blue"), ("pissa_3e-4", "tab:orange"), ("lora64", "tab:green"),
                        ("rslora64", "tab:red")):
        if arm not in runs:
            continue
        curves = np.array([x["losses"] for x in runs[arm]])
        k = 5
        smooth = np.array([np.convolve(c, np.ones(k) / k, mode="valid") for c in curves])
        steps = np.arange(k, curves.shape[1] + 1)
        ax.plot(steps, smooth.mean(0), color=colour, label=arms_labels().get(arm, arm))
        ax.fill_between(steps, smooth.min(0), smooth.max(0), color=colour, alpha=0.15)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (5-step mean; band: seeds' range)")
    ax.set_title("convergence: PiSSA vs LoRA (r=8), rsLoRA vs LoRA (r=64), same lr", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def arms_labels() -> dict:
    return {k: v[2] for k, v in arms().items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--claims", default=",".join(CLAIMS), help=f"comma-separated of {list(CLAIMS)}")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60, help="train steps per run (the runner's default)")
    ap.add_argument("--test", type=int, default=1024, help="test tweets evaluated per run (0: all 3,724)")
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--tag", default="claims")
    ap.add_argument("--work", default=os.path.join(ROOT, "runs", "claims"), help="metrics.jsonl of the runs")
    args = ap.parse_args()
    claims = args.claims.split(",")
    unknown = [c for c in claims if c not in CLAIMS]
    if unknown or args.seeds < 2 or args.steps < 10:
        raise SystemExit(f"claims: unknown {unknown} (known: {list(CLAIMS)}); --seeds >= 2 and --steps >= 10 "
                         f"(got {args.seeds}, {args.steps}).")
    from reparam.train import use_huge_pages
    use_huge_pages()
    os.makedirs(args.out, exist_ok=True)
    cache_path = os.path.join(args.out, f"{args.tag}_runs.json")
    cache = json.load(open(cache_path)) if os.path.exists(cache_path) else {}
    needed = list(dict.fromkeys(a for c in claims for a in CLAIMS[c][2:4]))
    labels = arms_labels()
    runs = {a: [] for a in needed}
    total, done = len(needed) * args.seeds, 0
    for seed in range(args.seeds):                      # seed-major: a killed run has every arm of early seeds
        for a in needed:
            r = run_arm(a, seed, args, cache)
            runs[a].append(r)
            done += 1
            print(f"[{done}/{total}] {a:>11} seed {seed}: test acc {r['acc']:.2f}%  train loss {r['loss']:.4f}  "
                  f"({r['trainable']:,} trainable, {r['wall_s']:.0f} s)", flush=True)
            with open(cache_path, "w") as f:
                json.dump(cache, f)
    rows = []
    for c in claims:
        text, paper, arm, base, metric, kind = CLAIMS[c]
        sign = 1 if metric == "acc" else -1                 # loss: lower is better
        d = [sign * (x[metric] - y[metric]) for x, y in zip(runs[arm], runs[base])]
        m, se, v = verdict(d, metric, kind)
        rows.append({"claim": c, "text": text, "paper": paper, "arm": arm, "baseline": base, "metric": metric,
                     "kind": kind, "arm_label": labels[arm], "baseline_label": labels[base], "diffs": d,
                     "mean": m, "se": se, "verdict": v})
    md = table(rows, runs, args)
    with open(os.path.join(args.out, f"{args.tag}.json"), "w") as f:
        json.dump({"seeds": args.seeds, "steps": args.steps, "test": args.test, "rows": rows,
                   "runs": runs}, f, indent=1)
    with open(os.path.join(args.out, f"{args.tag}.md"), "w") as f:
        f.write(f"all-MiniLM-L6-v2 tweet sentiment, {args.steps} steps x 16 tweets per run, {args.seeds} seeds, "
                f"test accuracy on the first {args.test or 3724} test tweets; "
                f"`python -m benchmarks.claims {' '.join(sys.argv[1:])}`\n\n{md}\n\n"
                f"Verdict rule: see the docstring of benchmarks/claims.py.\n")
    plot(rows, runs, os.path.join(args.out, f"{args.tag}.png"))
    print("\n" + md + f"\n\nwrote {args.tag}.json, .md, .png to {args.out}")


if __name__ == "__main__":
    main()
