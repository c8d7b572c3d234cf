"""The hot path on a Llama-style decoder written four ways: full fine-tuning vs LoRA vs LoRA@autodiff, one process.

    python -m benchmarks.decoder_forms                 # -> results/decoder_forms.{json,md,png}
    python -m benchmarks.decoder_forms --rounds=3 --tag=decoder_forms_quick

The decoder of ``experiments/models/decoder_forms.py`` (vocab 512, d 256, 4 layers, 8 query / 2 KV heads,
SwiGLU 768, RMSNorm, RoPE, tied embedding) as linen per-layer ``nn.Dense`` (and the same under
``nn.remat``), linen ``nn.scan`` with ``DenseGeneral`` / ``Einsum`` (and the same with the scanned block under
``nn.remat``, saving the projections' outputs: ``linen_scan_remat``), Flax NNX (per layer, and ``nnx.vmap`` +
``nnx.scan``), and a plain function of a dict
(``lax.scan`` + ``jax.checkpoint``); batch 8 x 64 tokens; AdamW. Per form, three steps: full fine-tuning
(every parameter trained), LoRA r=8 on q/k/v/o/gate/up/down (the default ``matmul="auto"``: routed), and
the same LoRA with ``matmul="autodiff"`` (plain autodiff through the materialised weights, which forms every
``dW = xᵀg``), and a floor: only the RMSNorm scales trained, a backward through every layer that forms no
weight gradient at all -- the least any adapter's step can cost in that form. The routed LoRA step
recomputes the body of a scan in its backward (``make_train_step(scan_remat=...)``, the default) unless the
model already checkpoints it; the full, autodiff and floor steps run the model as written. All steps are compiled first, then timed round-robin: ``--rounds`` rounds, each running every
step once in a shuffled order (after ``--warmup`` untimed steps each). Reported: the median step (ms), its
ratio to the same form's full fine-tuning step, XLA's GFLOP per compiled step (deterministic), the routed
and fallen-back uses of the LoRA step (``step.routing``), and the ``xᵀg`` dots in its compiled HLO.

``--processes=N`` runs the whole measurement in N fresh processes one after another and reports, per step,
the median over processes of each process's median (ms and ratio to full), with every process's ratio
listed: on a small shared machine the ratio moves more between processes than between rounds in one
(same code, ``nn.scan`` LoRA / full 0.71-0.82 in single-process runs on 2026-12-04).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import optax

import reparam as rp
from benchmarks.timing import peak_bytes
from experiments.models import decoder_forms as D

OUT = os.path.join(os.path.dirname(__file__), "results")
FORMS = ("linen", "linen_remat", "linen_scan", "linen_scan_remat", "nnx", "nnx_scan", "function")
MODEL = {"linen_remat": "linen", "linen_scan_remat": "linen_scan"}     # forms of a model under its own remat
KINDS = ("full", "lora", "lora@autodiff", "floor")
NORMS = {"linen": r"layers_\d+/(attn|mlp)_norm/scale", "linen_scan": r"layers/(attn|mlp)_norm/scale",
         "nnx": r"layers/\d+/(attn|mlp)_norm/scale", "nnx_scan": r"layers/(attn|mlp)_norm/scale",
         "function": r"layers/(attn|mlp)_norm"}


def _gflop(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", -1)) / 1e9 if cost else -1.0


def _xtg_dots(hlo: str, plan, tokens: int) -> int:
    from tests.hlo import dot_shapes as _dot_shapes      # the HLO dot parser the tests use
    shapes = set()
    for leaf in plan.leaves:
        if leaf.transform is not None and leaf.view is not None:
            v = leaf.view
            shapes.add(tuple(sorted((int(np.prod([leaf.shape[a] for a in v.inp])),
                                     int(np.prod([leaf.shape[a] for a in v.out]))))))
            shapes.add(tuple(sorted(n for a, n in enumerate(leaf.shape) if a not in v.batch)))
    return sum(1 for d in _dot_shapes(hlo) if tuple(sorted(n for n in d[0] if n != 1)) in shapes
               and int(np.prod(d[1])) == tokens)


def build(cfg: D.Config, batch: dict, opt, forms=FORMS) -> dict:
    steps = {}
    for form in forms:
        params, loss, rules_for = D.make(MODEL.get(form, form), cfg, remat=form in MODEL)
        for kind in KINDS:
            t0 = time.perf_counter()
            if kind == "full":
                rules = [(".*", rp.full())]
            elif kind == "floor":           # only the norm scales: a backward through every layer, no weight gradient
                rules = [(NORMS[MODEL.get(form, form)], rp.full())]
            else:
                rules = rules_for(rp.lora(8, alpha=16))
            plan = rp.plan(rules, params)
            frozen, trainable = plan.init(jax.random.key(1), params)
            step = rp.train.make_train_step(plan, loss, opt, donate=False,
                                            matmul="autodiff" if kind.endswith("@autodiff") else "auto")
            state = rp.train.init_state(trainable, opt, jax.random.key(2))
            compiled = step.lower(state, frozen, batch).compile()
            hlo = compiled.as_text()
            steps[(form, kind)] = dict(
                compiled=compiled, state=state, frozen=frozen, gflop=_gflop(compiled),
                peak_mb=peak_bytes(compiled) / 2 ** 20, trainable=int(sum(plan.trainable_counts(trainable))),
                xtg=None if kind in ("full", "floor") else _xtg_dots(hlo, plan, batch["ids"].size),
                routing=None if kind != "lora" else step.routing.report(),
                routed=None if kind != "lora" else sum(
                    u.route != "autodiff" for s in step.routing.uses.values() for u in s.values()),
                fallbacks=None if kind != "lora" else sum(len(r) for r in step.routing.fallbacks().values()))
            for _ in range(2):
                jax.block_until_ready(compiled(state, frozen, batch))
            print(f"{form:>12} {kind:>14}: compiled in {time.perf_counter() - t0:.1f} s, "
                  f"{steps[(form, kind)]['gflop']:.2f} GFLOP", flush=True)
    return steps


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--forms", default=",".join(FORMS), help="comma-separated subset of " + ",".join(FORMS))
    ap.add_argument("--processes", type=int, default=1, help="fresh processes to repeat the measurement in")
    ap.add_argument("--tag", default="decoder_forms")
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args(argv)
    rp.train.use_huge_pages()
    cfg = D.Config(vocab=512, d=256, layers=4, heads=8, kv_heads=2, ffn=768)
    batch = D.batch(cfg, n=args.batch, t=args.seq)
    opt = optax.adamw(1e-4)
    forms = tuple(f for f in FORMS if f in args.forms.split(","))
    unknown = set(args.forms.split(",")) - set(FORMS)
    if unknown or not forms:
        ap.error(f"--forms: unknown {sorted(unknown)}; choose from {','.join(FORMS)}")
    cmd = "python -m benchmarks.decoder_forms" + (f" --rounds={args.rounds}" if args.rounds != 7 else "") + \
        (f" --forms={','.join(forms)}" if forms != FORMS else "") + \
        (f" --processes={args.processes}" if args.processes != 1 else "")
    if args.processes > 1:
        rows = in_processes(args, forms)
        where = f"medians over {args.processes} processes of each one's median of {args.rounds} interleaved rounds"
    else:
        rows = measure(args, cfg, batch, opt, forms)
        where = f"medians of {args.rounds} interleaved rounds in one process"
    head = (f"Llama-style decoder (vocab {cfg.vocab}, d {cfg.d}, {cfg.layers} layers, {cfg.heads}/{cfg.kv_heads} heads, "
            f"SwiGLU {cfg.ffn}), batch {args.batch} x {args.seq}, AdamW; {where}, "
            f"{jax.device_count()} x {jax.devices()[0].platform}; `{cmd}`")
    report(args, forms, rows, head)


def in_processes(args, forms) -> list[dict]:
    """The measurement in ``args.processes`` fresh processes, one after another; per step the median of their
    medians (ms, ratio to full), each process's ratio in ``x_full_runs``."""
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.processes):
            print(f"process {i + 1}/{args.processes}", flush=True)
            subprocess.run([sys.executable, "-m", "benchmarks.decoder_forms", f"--rounds={args.rounds}",
                            f"--batch={args.batch}", f"--seq={args.seq}", f"--forms={','.join(forms)}",
                            f"--tag=p{i}", f"--out={tmp}"], check=True, stdout=subprocess.DEVNULL)
            with open(os.path.join(tmp, f"p{i}.json")) as f:
                runs.append(json.load(f)["rows"])
    rows = []
    for same in zip(*runs):
        row = dict(same[0])
        row.update(ms=float(np.median([r["ms"] for r in same])), x_full=float(np.median([r["x_full"] for r in same])),
                   x_full_runs=[r["x_full"] for r in same], times=[r["times"] for r in same])
        rows.append(row)
    return rows


def measure(args, cfg, batch, opt, forms) -> list[dict]:
    """One process: every step compiled, then ``args.rounds`` shuffled rounds; a row per (form, kind)."""
    steps = build(cfg, batch, opt, forms)
    times = {k: [] for k in steps}
    order = np.random.default_rng(0)
    keys = list(steps)
    for r in range(args.rounds):
        for i in order.permutation(len(keys)):
            s = steps[keys[i]]
            t0 = time.perf_counter()
            jax.block_until_ready(s["compiled"](s["state"], s["frozen"], batch))
            times[keys[i]].append(1e3 * (time.perf_counter() - t0))
        print(f"round {r + 1}/{args.rounds}", flush=True)
    rows = []
    for form in forms:
        full = float(np.median(times[(form, "full")]))
        for kind in KINDS:
            s, ms = steps[(form, kind)], float(np.median(times[(form, kind)]))
            rows.append(dict(form=form, kind=kind, ms=ms, x_full=ms / full, gflop=s["gflop"],
                             gflop_x_full=s["gflop"] / steps[(form, "full")]["gflop"], peak_mb=s["peak_mb"],
                             trainable=s["trainable"], xtg_dots=s["xtg"], routed_uses=s["routed"],
                             fallback_uses=s["fallbacks"], times=times[(form, kind)]))
    return rows


def report(args, forms, rows, head):
    """The table (stdout, ``.md``), the rows (``.json``) and the bar chart (``.png``)."""
    runs = "x_full_runs" in rows[0]
    lines = [head, "", "| form | step | ms | x full FT | GFLOP | GFLOP x full | XLA peak MB | trainable | xᵀg dots | "
             "uses routed / fallen back |" + (" x full FT per process |" if runs else ""),
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|" + ("---|" if runs else "")]
    for r in rows:
        dots = "" if r["xtg_dots"] is None else str(r["xtg_dots"])
        uses = "" if r["routed_uses"] is None else f"{r['routed_uses']} / {r['fallback_uses']}"
        each = f" {', '.join(f'{v:.2f}' for v in r['x_full_runs'])} |" if runs else ""
        lines.append(f"| {r['form']} | {r['kind']} | {r['ms']:.1f} | {r['x_full']:.2f} | {r['gflop']:.2f} | "
                     f"{r['gflop_x_full']:.2f} | {r['peak_mb']:.0f} | {r['trainable']:,} | {dots} | {uses} |{each}")
    text = "\n".join(lines)
    print("\n" + text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.tag}.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, f"{args.tag}.json"), "w") as f:
        json.dump({"header": head, "rows": rows}, f, indent=1)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 3.5))
    x = np.arange(len(forms))
    for j, kind in enumerate(KINDS[1:]):
        mine = [next(r for r in rows if r["form"] == f and r["kind"] == kind) for f in forms]
        ax.bar(x + (j - 1) * 0.27, [r["x_full"] for r in mine], 0.27, label=kind)
        if runs:                                    # every process's ratio
            for i, r in enumerate(mine):
                ax.plot([x[i] + (j - 1) * 0.27] * len(r["x_full_runs"]), r["x_full_runs"], "k.", ms=3)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(0.75, color="g", ls="--", lw=0.8, label="target 0.75")
    ax.set(xticks=x, xticklabels=forms, ylabel="step / full fine-tuning step", title="LoRA step by model form")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, f"{args.tag}.png"), dpi=120)


if __name__ == "__main__":
    main()
