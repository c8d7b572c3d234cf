"""The hot matmul path: step time and peak memory of one adapted Dense layer, by forward and by size.

    python -m benchmarks.hot_path                       # table + benchmarks/results/hot_path.{json,md,png}
    python -m benchmarks.hot_path --quick               # fewer sizes, for a smoke test

For a ``d x d`` Dense layer with LoRA rank ``r`` (and a LoKr and a sparse variant), one
train step (forward, backward through the layer, SGD) on ``N`` tokens, with the step's
matmul computed four ways: plain autodiff through the materialised weight (``autodiff``,
what a naive JAX LoRA does), the custom VJP with the materialised forward
(``materialised``), with the factored forward (``factored``), and the per-call choice
(``auto``). Also the same LoRA step on 1 and on 8 CPU devices (data-parallel; run in
subprocesses, since the device count is fixed when JAX starts). Peak memory is XLA's
estimate for the compiled step (arguments + outputs + temporaries − aliased).
Each timing is the median of ``--repeats`` runs after 3 warm-ups, each run waited for.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import reparam as rp
from benchmarks.timing import median, peak_bytes, run_steps

MODES = ("autodiff", "materialised", "factored", "auto")
OUT = os.path.join(os.path.dirname(__file__), "results")


class Layer(nn.Module):
    d: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.d, name="dense")(x)


def time_step(d: int, tokens: int, transform, mode: str, repeats: int) -> dict:
    """Median step ms and peak bytes of one train step of ``transform`` on a ``d x d`` Dense at ``tokens``."""
    model = Layer(d)
    x = jax.random.normal(jax.random.key(0), (tokens, d))
    params = model.init(jax.random.key(1), x[:1])["params"]
    plan = rp.plan([(r"dense/kernel", transform)], params)
    frozen, trainable = plan.init(jax.random.key(2), params)
    loss = lambda p, b, rng: jnp.mean(model.apply({"params": p}, b) ** 2)
    opt = optax.sgd(1e-3)
    step = rp.train.make_train_step(plan, loss, opt, matmul=mode)
    state = rp.train.init_state(trainable, opt, jax.random.key(3))
    peak = peak_bytes(step.lower(state, frozen, x).compile())
    _, times, _ = run_steps(step, state, frozen, x, 3, repeats)
    return {"ms": median(times), "peak_mb": peak / 2 ** 20}


def sweep(args) -> list[dict]:
    rows = []
    d = args.d
    ranks = (8, 64) if not args.quick else (8,)
    tokens = (16, 128, 1024, 4096) if not args.quick else (32, 1024)
    transforms = [(f"lora r={r}", rp.lora(r), r) for r in ranks]
    transforms += [("lokr r=8", rp.lokr(8), 8), ("sparse 1%", rp.sparse.random(density=0.01), 0)]
    for name, t, r in transforms:
        for n in tokens:
            row = {"transform": name, "rank": r, "d": d, "tokens": n}
            for mode in MODES:
                res = time_step(d, n, t, mode, args.repeats)
                row[f"{mode}_ms"], row[f"{mode}_peak_mb"] = res["ms"], res["peak_mb"]
            plan = rp.plan([(r"dense/kernel", t)], {"dense": {"kernel": jnp.zeros((d, d))}})
            row["crossover_tokens"] = plan.crossovers()["dense/kernel"]
            rows.append(row)
            print(f"{name:>11} N={n:>5}: " + "  ".join(f"{m} {row[m + '_ms']:7.2f} ms" for m in MODES)
                  + f"  (factored below {row['crossover_tokens']} tok)", flush=True)
    return rows


def devices_run(args) -> dict:
    """The LoRA step on this process's devices, batch sharded over all of them (data parallel)."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    d, n = args.d, args.dp_tokens
    model = Layer(d)
    x = jax.random.normal(jax.random.key(0), (n, d))
    params = model.init(jax.random.key(1), x[:1])["params"]
    plan = rp.plan([(r"dense/kernel", rp.lora(16))], params)
    frozen, trainable = plan.init(jax.random.key(2), params)
    loss = lambda p, b, rng: jnp.mean(model.apply({"params": p}, b) ** 2)
    opt = optax.sgd(1e-3)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    step = jax.jit(rp.train.make_train_step(plan, loss, opt, jit=False), donate_argnums=(0,),
                   in_shardings=(rep, rep, data), out_shardings=(rep, rep))
    state = jax.device_put(rp.train.init_state(trainable, opt, jax.random.key(3)), rep)
    frozen, x = jax.device_put(frozen, rep), jax.device_put(x, data)
    _, times, _ = run_steps(step, state, frozen, x, 3, args.repeats)
    return {"devices": len(jax.devices()), "tokens": n, "ms": median(times)}


def devices(args) -> list[dict]:
    out = []
    for count in (1, 8):
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={count}",
               "JAX_PLATFORMS": "cpu"}
        cmd = [sys.executable, "-m", "benchmarks.hot_path", "--devices-child", f"--d={args.d}",
               f"--repeats={args.repeats}", f"--dp-tokens={args.dp_tokens}"]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        out.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(f"LoRA r=16 on {count} CPU device(s), {args.dp_tokens} tokens: {out[-1]['ms']:.2f} ms", flush=True)
    return out


def markdown(rows, dev) -> str:
    lines = ["| transform | tokens | " + " | ".join(f"{m} ms" for m in MODES) + " | auto / autodiff | "
             "peak MB autodiff / auto | factored below |",
             "|---|---:|" + "---:|" * len(MODES) + "---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['transform']} | {r['tokens']} | " + " | ".join(f"{r[m + '_ms']:.2f}" for m in MODES)
                     + f" | {r['auto_ms'] / r['autodiff_ms']:.2f} | {r['autodiff_peak_mb']:.1f} / "
                     f"{r['auto_peak_mb']:.1f} | {r['crossover_tokens']} |")
    if dev:
        lines += ["", "| CPU devices | tokens | LoRA step ms |", "|---:|---:|---:|"]
        lines += [f"| {x['devices']} | {x['tokens']} | {x['ms']:.2f} |" for x in dev]
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(dict.fromkeys(r["transform"] for r in rows))
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        sub = [r for r in rows if r["transform"] == name]
        for mode in MODES:
            ax.plot([r["tokens"] for r in sub], [r[f"{mode}_ms"] for r in sub], marker="o", label=mode)
        ax.axvline(sub[0]["crossover_tokens"], color="grey", ls=":", lw=1)
        ax.set(xscale="log", yscale="log", title=name, xlabel="tokens per step")
    axes[0][0].set_ylabel("step ms")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--dp-tokens", type=int, default=8192)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-devices", action="store_true")
    ap.add_argument("--devices-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args()
    if args.devices_child:
        print(json.dumps(devices_run(args)))
        return
    print(f"backend {jax.default_backend()}, {jax.device_count()} device(s); d={args.d}", flush=True)
    rows = sweep(args)
    dev = [] if args.no_devices or jax.default_backend() != "cpu" else devices(args)
    os.makedirs(args.out, exist_ok=True)
    md = markdown(rows, dev)
    print("\n" + md)
    with open(os.path.join(args.out, "hot_path.json"), "w") as f:
        json.dump({"backend": jax.default_backend(), "device": str(jax.devices()[0]), "sweep": rows,
                   "devices": dev}, f, indent=1)
    with open(os.path.join(args.out, "hot_path.md"), "w") as f:
        f.write(md + "\n")
    plot(rows, os.path.join(args.out, "hot_path.png"))
    print(f"\nwrote hot_path.json, hot_path.md, hot_path.png to {args.out}")


if __name__ == "__main__":
    main()
