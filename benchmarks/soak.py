"""Soak: host memory (RSS) over a long LoRA run with an orbax checkpoint every 1,000 steps. Not a test.

    python -m benchmarks.soak                                   # 20,000 steps, checkpoints -> results/soak.json
    python -m benchmarks.soak --steps 5000 --no-checkpoints --label lora
    MALLOC_ARENA_MAX=2 python -m benchmarks.soak --label lora+ckpt,arenas2

A tiny MLP (64 -> 256 -> 256 -> 10, LoRA r=8 on the hidden kernels, the head trained in full) trains with
adamw on a fixed pool of batches, reading each step's loss on the host as the runner does
(``experiments.run``). Every ``--every`` steps it saves the train state with ``rp.checkpoint.save`` (unless
``--no-checkpoints``), then prints the process's RSS (``/proc/self/status`` VmRSS), the live Python objects
(``gc.get_objects()``) and, with ``--trim``, the RSS after glibc's ``malloc_trim(0)`` (memory the allocator
held but did not need). Each run is written into ``benchmarks/results/soak.json`` under its ``--label``,
with the environment (``MALLOC_ARENA_MAX``, ``GLIBC_TUNABLES``, ``LD_PRELOAD``) it ran under.

Growth is reported from the first report (step ``--every``, after compilation and the first save) to the last:
a leak grows linearly with steps or saves; an allocator's retention or fragmentation grows in jumps and
levels off, and shrinks under ``malloc_trim`` or with fewer arenas.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import shutil
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import reparam as rp

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "soak.json")


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(2):
            x = nn.relu(nn.Dense(256, name=f"hidden_{i}")(x))
        return nn.Dense(10, name="head")(x)


def rss_mb() -> float:
    """The process's resident set size in MB (``VmRSS``)."""
    with open("/proc/self/status") as fh:
        kb = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
    return kb / 1024


def malloc_trim() -> None:
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def soak(steps: int, every: int, checkpoints: bool, trim: bool, directory: str, seed: int = 0) -> list[dict]:
    """Trains ``steps`` steps; a record per ``every`` steps: step, seconds, RSS, objects (and RSS after trim)."""
    model = MLP()
    rng = np.random.default_rng(seed)
    pool = [(jnp.asarray(rng.standard_normal((64, 64), np.float32)), jnp.asarray(rng.integers(0, 10, 64)))
            for _ in range(16)]
    params = model.init(jax.random.key(seed), pool[0][0])["params"]
    plan = rp.plan([(r"hidden_\d+/kernel", rp.lora(8, alpha=16)), (r"head/.*", rp.full())], params)
    frozen, trainable = plan.init(jax.random.key(seed), params)

    def loss_fn(p, batch, rng):
        logits = model.apply({"params": p}, batch[0])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

    opt = optax.adamw(1e-3)
    step = rp.train.make_train_step(plan, loss_fn, opt)
    state = rp.train.init_state(trainable, opt, jax.random.key(seed))
    config = {"benchmark": "soak", "steps": steps, "seed": seed}
    mgr = rp.checkpoint.manager(directory, max_to_keep=3) if checkpoints else None
    records, t0 = [], time.perf_counter()
    try:
        for i in range(1, steps + 1):
            state, m = step(state, frozen, pool[i % len(pool)])
            loss = float(m["loss"])                     # a host read per step, as the runner does
            if i % every == 0:
                if mgr is not None:
                    rp.checkpoint.save(mgr, state, config)
                gc.collect()
                rec = {"step": i, "s": round(time.perf_counter() - t0, 2), "loss": round(loss, 4),
                       "rss_mb": round(rss_mb(), 2), "objects": len(gc.get_objects())}
                if trim:
                    malloc_trim()
                    rec["rss_trimmed_mb"] = round(rss_mb(), 2)
                records.append(rec)
                print(" ".join(f"{k}={v}" for k, v in rec.items()), flush=True)
    finally:
        if mgr is not None:
            mgr.close()
    return records


def summary(records: list[dict]) -> dict:
    """Growth of RSS (and objects) from the first report to the last, and the largest jump between reports."""
    rss = [r["rss_mb"] for r in records]
    out = {"rss_first_mb": rss[0], "rss_last_mb": rss[-1], "rss_growth_mb": round(rss[-1] - rss[0], 2),
           "rss_max_jump_mb": round(max((b - a for a, b in zip(rss, rss[1:])), default=0.0), 2),
           "objects_growth": records[-1]["objects"] - records[0]["objects"]}
    if "rss_trimmed_mb" in records[0]:
        out["rss_trimmed_growth_mb"] = round(records[-1]["rss_trimmed_mb"] - records[0]["rss_trimmed_mb"], 2)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20_000)
    ap.add_argument("--every", type=int, default=1_000, help="steps between checkpoints and RSS reports")
    ap.add_argument("--no-checkpoints", action="store_true")
    ap.add_argument("--trim", action="store_true", help="also report RSS after malloc_trim(0)")
    ap.add_argument("--label", default=None, help="the run's key in the JSON (default from the options)")
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args(argv)
    if args.steps < args.every or args.every < 1:
        ap.error("--every must be >= 1 and --steps >= --every (at least one report)")
    label = args.label or ("lora" + ("" if args.no_checkpoints else "+ckpt") + ("+trim" if args.trim else ""))
    directory = tempfile.mkdtemp(prefix="reparam-soak-")
    try:
        records = soak(args.steps, args.every, not args.no_checkpoints, args.trim, directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    run = {"args": vars(args), "env": {k: os.environ.get(k) for k in ("MALLOC_ARENA_MAX", "GLIBC_TUNABLES",
                                                                       "LD_PRELOAD", "XLA_FLAGS")},
           "versions": {"jax": jax.__version__, "orbax": _version("orbax-checkpoint")},
           "summary": summary(records), "records": records}
    print(json.dumps({label: run["summary"]}), flush=True)
    results = {}
    if os.path.exists(args.out):
        with open(args.out) as fh:
            results = json.load(fh)
    results[label] = run
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".tmp", "w") as fh:
        json.dump(results, fh, indent=1)
    os.replace(args.out + ".tmp", args.out)


def _version(dist: str) -> str:
    from importlib.metadata import version
    return version(dist)


if __name__ == "__main__":
    main()
