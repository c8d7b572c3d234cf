"""MiniLM train-step speed: full fine-tuning vs reparam transforms, the hot path on and off.

    python -m benchmarks.minilm                                  # full, lora (autodiff = before), lora (hot)
    python -m benchmarks.minilm --methods=full,lora,dora,pissa,vera,lokr,fourierft,waveft,randlora

all-MiniLM-L6-v2 (experiments.models.bert) with a 3-class head on the mean-pooled output;
batch 32 x seq 64 = 2048 tokens; forward + cross-entropy + backward + AdamW. Adapters on all
36 query/key/value/attention-output/intermediate/output kernels, head trainable (as
../shared/PERF_NOTES.md's yardstick). Each configuration runs in its own process (so one's
compilation caches and memory do not affect another), ``--warmup`` steps then the median of
``--steps``. ``name@autodiff`` runs a method with ``matmul="autodiff"``: plain autodiff through
the materialised weights and no LayerNorm barrier -- the library before the hot path.
Writes ``benchmarks/results/minilm.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "benchmarks", "results")
ADAPTED = r".*layer_\d+/(attention/(query|key|value|output)|intermediate|output)/kernel"


def rules_for(name: str):
    import reparam as rp
    r = {"full": None,
         "lora": rp.lora(8, alpha=16), "dora": rp.dora(8, alpha=16), "pissa": rp.pissa(8, alpha=16, niter=4),
         "vera": rp.vera(256), "lokr": rp.lokr(8, alpha=16), "krona": rp.krona(),
         "fourierft": rp.fourierft(1000, 300.0), "waveft": rp.waveft(k=1000),
         "randlora": rp.randlora(32), "sara": rp.sparse.magnitude(k=1000),
         "sltrain": rp.add(rp.lora(4, alpha=8), rp.sparse.random(k=1000))}
    if name not in r:
        raise SystemExit(f"unknown method {name!r}; choose from {sorted(r)}")
    if r[name] is None:
        return [(r".*", rp.full())]
    return [(ADAPTED, r[name]), (r"head/.*", rp.full())]


def child(name: str, mode: str, args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import reparam as rp
    from experiments.models import bert

    t0 = time.perf_counter()
    clf, params, _ = bert.minilm_classifier(jax.random.key(0), n_classes=3)
    plan = rp.plan(rules_for(name), params)
    frozen, trainable = plan.init(jax.random.key(1), params)
    jax.block_until_ready(trainable)
    init_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1000, 30000, (args.batch, args.seq)), jnp.int32)
    batch = (ids, jnp.ones_like(ids), jnp.asarray(rng.integers(0, 3, (args.batch,)), jnp.int32))

    def loss_fn(p, b, key):
        logits = clf.apply({"params": p}, b[0], b[1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, b[2]).mean()

    opt = optax.adamw(1e-4)
    step = rp.train.make_train_step(plan, loss_fn, opt, matmul=mode)
    state = rp.train.init_state(trainable, opt, jax.random.key(2))
    compiled = step.lower(state, frozen, batch).compile()
    mem = compiled.memory_analysis()
    peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes) if mem is not None else -1
    for _ in range(args.warmup):
        state, m = step(state, frozen, batch)
    jax.block_until_ready(state)
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        state, m = step(state, frozen, batch)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t)
    ms = 1e3 * float(np.median(times))
    return {"method": name, "matmul": mode, "step_ms": ms, "tokens_per_s": args.batch * args.seq / ms * 1e3,
            "trainable": int(sum(plan.trainable_counts(trainable))), "peak_mb": peak / 2 ** 20,
            "init_s": init_s, "loss": float(m["loss"]), "backend": jax.default_backend()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="full,lora@autodiff,lora")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        name, _, mode = args.child.partition("@")
        print(json.dumps(child(name, mode or "auto", args)))
        return
    rows = []
    for spec in args.methods.split(","):
        cmd = [sys.executable, "-m", "benchmarks.minilm", f"--child={spec}", f"--batch={args.batch}",
               f"--seq={args.seq}", f"--warmup={args.warmup}", f"--steps={args.steps}"]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if res.returncode:
            raise SystemExit(f"{spec} failed:\n{res.stderr[-3000:]}")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{spec:>16}: {r['step_ms']:8.1f} ms  {r['tokens_per_s']:7.0f} tok/s  peak {r['peak_mb']:7.1f} MB  "
              f"{r['trainable']:>10,} trainable", flush=True)
    full = next((r["step_ms"] for r in rows if r["method"] == "full"), None)
    lines = ["| method | matmul | step ms | tokens/s | x full | peak MB | trainable | init s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = f"{r['step_ms'] / full:.2f}" if full else ""
        lines.append(f"| {r['method']} | {r['matmul']} | {r['step_ms']:.1f} | {r['tokens_per_s']:.0f} | {ratio} | "
                     f"{r['peak_mb']:.0f} | {r['trainable']:,} | {r['init_s']:.2f} |")
    md = "\n".join(lines)
    print("\n" + md)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "minilm.json"), "w") as f:
        json.dump({"batch": args.batch, "seq": args.seq, "rows": rows}, f, indent=1)
    with open(os.path.join(args.out, "minilm.md"), "w") as f:
        f.write(md + "\n")


if __name__ == "__main__":
    main()
