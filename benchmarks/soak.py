"""Soak: host memory (RSS) over a long LoRA run with an orbax checkpoint every 1,000 steps. Not a test.

    python -m benchmarks.soak                                   # 20,000 steps, checkpoints -> results/soak.json
    python -m benchmarks.soak --steps 5000 --no-checkpoints --label lora
    python -m benchmarks.soak --model=minilm --steps 2000 --every 100     # a MiniLM LoRA step, batch 8 x 64
    MALLOC_ARENA_MAX=2 python -m benchmarks.soak --label lora+ckpt,arenas2

A tiny MLP (64 -> 256 -> 256 -> 10, LoRA r=8 on the hidden kernels, the head trained in full), or with
``--model=minilm`` all-MiniLM-L6-v2 with the MiniLM benchmark's LoRA (r=8 on every attention and MLP kernel, a
fresh 3-way head in full; batches of ``--batch`` x ``--seq`` random token ids), trains with
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


def mlp_setup(seed: int, **_) -> tuple:
    """``(plan, params, loss_fn, pool)``: the tiny MLP, LoRA r=8 on its hidden kernels, 16 random batches of 64."""
    model = MLP()
    rng = np.random.default_rng(seed)
    pool = [(jnp.asarray(rng.standard_normal((64, 64), np.float32)), jnp.asarray(rng.integers(0, 10, 64)))
            for _ in range(16)]
    params = model.init(jax.random.key(seed), pool[0][0])["params"]
    plan = rp.plan([(r"hidden_\d+/kernel", rp.lora(8, alpha=16)), (r"head/.*", rp.full())], params)

    def loss_fn(p, batch, rng):
        logits = model.apply({"params": p}, batch[0])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()
    return plan, params, loss_fn, pool


def minilm_setup(seed: int, batch: int = 8, seq: int = 64) -> tuple:
    """``(plan, params, loss_fn, pool)``: all-MiniLM-L6-v2 with a fresh 3-way head and the MiniLM benchmark's LoRA
    rules (:func:`benchmarks.minilm.rules_for`: r=8 on every attention and MLP kernel, the head in full), 16
    batches of ``batch`` x ``seq`` random token ids."""
    from benchmarks.minilm import N_CLASSES, model_and_batch, rules_for
    _, params, _, loss_fn = model_and_batch(batch, seq)
    rng = np.random.default_rng(seed)
    pool = [(jnp.asarray(rng.integers(1000, 30000, (batch, seq)), jnp.int32), jnp.ones((batch, seq), jnp.int32),
             jnp.asarray(rng.integers(0, N_CLASSES, batch), jnp.int32)) for _ in range(16)]
    return rp.plan(rules_for("lora"), params), params, loss_fn, pool


MODELS = {"mlp": mlp_setup, "minilm": minilm_setup}


def soak(steps: int, every: int, checkpoints: bool, trim: bool, directory: str, seed: int = 0, model: str = "mlp",
         **shape) -> list[dict]:
    """Trains ``steps`` steps of ``model`` (:data:`MODELS`; ``shape``: its batch and seq); a record per ``every``
    steps: step, seconds, RSS, objects (and RSS after trim)."""
    plan, params, loss_fn, pool = MODELS[model](seed, **shape)
    frozen, trainable = plan.init(jax.random.key(seed), params)
    del params
    opt = optax.adamw(1e-3)
    step = rp.train.make_train_step(plan, loss_fn, opt)
    state = rp.train.init_state(trainable, opt, jax.random.key(seed))
    config = {"benchmark": "soak", "model": model, "steps": steps, "seed": seed, **shape}
    mgr = rp.checkpoint.manager(directory, max_to_keep=3) if checkpoints else None
    records, t0 = [], time.perf_counter()
    try:
        for i in range(1, steps + 1):
            state, m = step(state, frozen, pool[i % len(pool)])
            loss = float(m["loss"])                     # a host read per step, as the runner does
            if i % every == 0:
                if mgr is not None:
                    rp.checkpoint.save(mgr, state, config, plan=plan)
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
    ap.add_argument("--model", choices=sorted(MODELS), default="mlp",
                    help="mlp: the tiny MLP; minilm: a MiniLM LoRA step (experiments' model, the MiniLM benchmark's "
                         "rules)")
    ap.add_argument("--batch", type=int, default=8, help="minilm: sequences per batch")
    ap.add_argument("--seq", type=int, default=64, help="minilm: tokens per sequence")
    ap.add_argument("--label", default=None, help="the run's key in the JSON (default from the options)")
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args(argv)
    if args.steps < args.every or args.every < 1:
        ap.error("--every must be >= 1 and --steps >= --every (at least one report)")
    label = args.label or (("minilm-" if args.model == "minilm" else "") + "lora" + ("" if args.no_checkpoints
                                                                                      else "+ckpt")
                           + ("+trim" if args.trim else ""))
    shape = {"batch": args.batch, "seq": args.seq} if args.model == "minilm" else {}
    directory = tempfile.mkdtemp(prefix="reparam-soak-")
    try:
        records = soak(args.steps, args.every, not args.no_checkpoints, args.trim, directory, model=args.model,
                       **shape)
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
