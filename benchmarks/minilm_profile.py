"""Where a MiniLM train step spends its time in XLA:CPU: every dot's shape, time and GFLOP/s in the step, the same
GEMMs alone in XLA and in torch, and the elementwise fusions.

    python -m benchmarks.minilm_profile                         # the frozen floor -> results/minilm_profile_frozen.*
    python -m benchmarks.minilm_profile --method=lora --tag=minilm_profile_lora

The step is :mod:`benchmarks.minilm`'s (same model, batch, rules; ``frozen`` is its floor: no adapter and no
encoder weight gradient). It is compiled, run ``--warmup`` times, then traced with ``jax.profiler`` for
``--steps`` steps. Each operation's time is its duration in the trace, averaged per step. Operations that
run at the same time on the two cores each count in full, so the sum exceeds the step. A dot's GFLOP/s is
``2·M·N·K`` over that duration. The standalone column times the same ``[M, K] x [K, N]`` GEMM, jitted alone,
and torch's ``mm`` with ``--threads`` threads (the median of 30 calls). It shows what the step's
dots would take without the step around them. Writes ``<tag>.json`` and ``<tag>.md``.
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys
import tempfile
import time

import numpy as np

from benchmarks.minilm import OUT

_DOT = re.compile(r"= (\S+) dot\(%?([\w.\-]+), %?([\w.\-]+)\)")


def _shape(s: str) -> list[int]:
    m = re.match(r"\w+\[([\d,]*)\]", s)
    return [int(x) for x in m.group(1).split(",") if x] if m else []


def _hlo_tables(text: str):
    """``(result type of each instruction, body of each computation)`` of an HLO module's text."""
    types, bodies = {}, {}
    for m in re.finditer(r"\n(%?[\w.\-]+) [^\n]*\{\n(.*?)\n\}", text, re.S):
        bodies[m.group(1).lstrip("%")] = m.group(2)
    for line in text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ([\w\-]+)\((.*)", line)
        if m:
            types[m.group(1)] = (m.group(2).split("{")[0], m.group(3), line)
    return types, bodies


def _dot_of(name: str, types, bodies):
    """``(lhs type, rhs type, out type, lhs contracting, rhs contracting, batch dims)`` of the dot that
    instruction ``name`` is or wraps in its fused computation; None for any other instruction."""
    line = types[name][2]
    if "calls=" in line:
        body = bodies.get(re.search(r"calls=%?([\w.\-]+)", line).group(1), "")
        local = {}
        for b in body.splitlines():
            m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+)", b)
            if m:
                local[m.group(1)] = m.group(2).split("{")[0]
        line = next((b for b in body.splitlines() if " dot(" in b), None)
        if line is None:
            return None
        look = local
    elif " dot(" in line:
        look = {k: v[0] for k, v in types.items()}
    else:
        return None
    m = _DOT.search(line)
    dims = {k: re.search(k + r"=\{([\d,]*)\}", line) for k in ("lhs_contracting_dims", "rhs_contracting_dims",
                                                               "lhs_batch_dims")}
    lc, rc, lb = ([int(i) for i in d.group(1).split(",") if i] if d else [] for d in dims.values())
    return look[m.group(2)], look[m.group(3)], m.group(1).split("{")[0], lc, rc, lb


def _gemm_mnk(lhs, rhs, out, lc, rc, lb):
    """``(M, N, K, layout)`` of a 2-D dot (layout ``NN`` / ``NT`` / ``TN``); None for a batched one."""
    if lb or len(_shape(lhs)) != 2 or len(_shape(rhs)) != 2:
        return None
    (a0, a1), (b0, b1) = _shape(lhs), _shape(rhs)
    m, k = (a0, a1) if lc == [1] else (a1, a0)
    n = b1 if rc == [0] else b0
    return m, n, k, ("N" if lc == [1] else "T") + ("N" if rc == [0] else "T")


def _standalone(mnk, threads: int) -> tuple[float, float | None]:
    """ms of the ``M x K x N`` GEMM in the dot's layout, alone: XLA, and torch (None without torch)."""
    import jax
    import jax.numpy as jnp

    m, n, k, lay = mnk
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k) if lay[0] == "N" else (k, m), np.float32)
    b = rng.standard_normal((k, n) if lay[1] == "N" else (n, k), np.float32)
    fa = (lambda t: t) if lay[0] == "N" else (lambda t: t.T)
    fb = (lambda t: t) if lay[1] == "N" else (lambda t: t.T)

    def med(call):
        for _ in range(3):
            call()
        ts = []
        for _ in range(30):
            t = time.perf_counter()
            call()
            ts.append(time.perf_counter() - t)
        return 1e3 * float(np.median(ts))
    f = jax.jit(lambda x, y: fa(x) @ fb(y))
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    xla = med(lambda: f(ja, jb).block_until_ready())
    try:
        import torch
    except ImportError:
        return xla, None
    torch.set_num_threads(threads)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    return xla, med(lambda: fa(ta) @ fb(tb))


def profile(method: str, warmup: int, steps: int):
    """``(per-step times of each instruction (:func:`_shares`), the compiled HLO text, median untraced step ms)``."""
    import jax
    import optax
    from jax.profiler import ProfileData

    import reparam as rp
    from benchmarks import minilm
    from benchmarks.timing import median, run_steps

    clf, params, batch, loss_fn = minilm.model_and_batch(32, 64)
    plan, frozen, trainable = minilm.init_method(method, clf, params, batch, loss_fn)
    opt = optax.adamw(1e-4)
    step = rp.train.make_train_step(plan, loss_fn, opt)
    state = rp.train.init_state(trainable, opt, jax.random.key(2))
    compiled = step.lower(state, frozen, batch).compile()
    text = compiled.as_text()
    state, times, _ = run_steps(compiled, state, frozen, batch, warmup, steps)
    names = set(re.findall(r"^\s*(?:ROOT )?%?([\w.\-]+) = ", text, re.M))
    events = []
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            run_steps(compiled, state, frozen, batch, 0, steps)
        data = ProfileData.from_file(glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)[0])
        for plane in data.planes:
            for line in plane.lines:
                if line.name.startswith("tf_XLA"):
                    events += [(ev.name, ev.start_ns, ev.start_ns + ev.duration_ns) for ev in line.events
                               if ev.name in names]
    return _shares(events, steps), text, median(times)


def _shares(events, steps: int) -> dict:
    """Per-step ms of each operation: ``duration`` (its span in the trace) and ``share`` (its span with every
    moment divided among the operations running then, so the shares add up to the time anything ran)."""
    edges = sorted([(t0, 1, i) for i, (_, t0, _) in enumerate(events)]
                   + [(t1, -1, i) for i, (_, _, t1) in enumerate(events)])
    share, running, last = collections.Counter(), set(), None
    for t, kind, i in edges:
        for j in running:
            share[j] += (t - last) / len(running)
        if kind == 1:
            running.add(i)
        else:
            running.discard(i)
        last = t
    out = collections.defaultdict(lambda: {"duration": 0.0, "share": 0.0})
    for i, (name, t0, t1) in enumerate(events):
        out[name]["duration"] += (t1 - t0) / 1e6 / steps
        out[name]["share"] += share[i] / 1e6 / steps
    return out


def tables(per_op, text, threads: int):
    """``(dot rows, other rows)``: dots grouped by shape and layout (the large 2-D ones also timed alone), the
    other operations grouped by kind and result shape; ``ms`` is each group's share of the step's time,
    ``duration`` its summed spans (see :func:`_shares`)."""
    types, bodies = _hlo_tables(text)
    dots, other, gemm = {}, {}, {}
    for name, t in per_op.items():
        info = _dot_of(name, types, bodies) if name in types else None
        if info is None:                                    # (not in ``types``: a tuple-valued call)
            key = (re.sub(r"\.\d+$", "", name), types[name][0] if name in types else "tuple")
            g = other.setdefault(key, {"count": 0, "ms": 0.0, "duration": 0.0})
        else:
            lhs, rhs, out, lc, rc, lb = info
            key = f"{lhs} x {rhs} -> {out} (contracting {lc}/{rc}{', batch ' + str(lb) if lb else ''})"
            g = dots.setdefault(key, {"count": 0, "ms": 0.0, "duration": 0.0, "gflop": 0.0})
            g["gflop"] += 2 * int(np.prod([_shape(lhs)[i] for i in lc])) * int(np.prod(_shape(out))) / 1e9
            gemm[key] = _gemm_mnk(lhs, rhs, out, lc, rc, lb)
        g["count"] += 1
        g["ms"] += t["share"]
        g["duration"] += t["duration"]
    dot_rows = []
    for key, g in sorted(dots.items(), key=lambda kv: -kv[1]["ms"]):
        row = {"dot": key, **g, "gflops": g["gflop"] / g["ms"] * 1e3}
        if gemm[key] is not None and g["ms"] > 2:           # the dots that matter, timed alone
            m, n, k, _ = gemm[key]
            xla, torch_ms = _standalone(gemm[key], threads)
            row.update(alone_xla_gflops=2 * m * n * k / 1e6 / xla,
                       alone_torch_gflops=None if torch_ms is None else 2 * m * n * k / 1e6 / torch_ms)
        dot_rows.append(row)
    other_rows = [{"op": k[0], "shape": k[1], **g} for k, g in sorted(other.items(), key=lambda kv: -kv[1]["ms"])]
    return dot_rows, other_rows


def markdown(method, step_ms, dot_rows, other_rows, cmd) -> str:
    def f(v):
        return "" if v is None else f"{v:.0f}"
    tot_dot = sum(r["ms"] for r in dot_rows)
    tot_other = sum(r["ms"] for r in other_rows)
    lines = [f"all-MiniLM-L6-v2 `{method}` step, batch 32 x 64: {step_ms:.1f} ms (median, untraced). In the trace, "
             f"per step: dots {tot_dot:.1f} ms, other operations {tot_other:.1f} ms. `ms` is a group's share of the "
             "step: each moment of the trace divided among the operations running at it. `span` sums their "
             "durations, so two operations at once each count in full. GFLOP/s is over the share. The "
             f"`alone` columns time the same GEMM by itself. `{cmd}`", "",
             "| dot | per step | ms | span ms | GFLOP | GFLOP/s in the step | alone: XLA | alone: torch |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in dot_rows:
        lines.append(f"| {r['dot']} | {r['count']} | {r['ms']:.1f} | {r['duration']:.1f} | {r['gflop']:.2f} | "
                     f"{r['gflops']:.0f} | {f(r.get('alone_xla_gflops'))} | {f(r.get('alone_torch_gflops'))} |")
    lines += ["", "| other operation | result | per step | ms | span ms |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['op']} | {r['shape']} | {r['count']} | {r['ms']:.2f} | {r['duration']:.2f} |"
              for r in other_rows[:25]]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="frozen", help="a benchmarks.minilm method (default: the frozen floor)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads")
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--tag", default=None, help="output names <tag>.{json,md}; default minilm_profile_<method>")
    args = ap.parse_args()
    tag = args.tag or f"minilm_profile_{args.method}"
    print(f"profiling the {args.method} step ...", flush=True)
    per_op, text, step_ms = profile(args.method, args.warmup, args.steps)
    print("timing the step's GEMMs alone ...", flush=True)
    dot_rows, other_rows = tables(per_op, text, args.threads)
    cmd = "python -m benchmarks.minilm_profile " + " ".join(sys.argv[1:])
    md = markdown(args.method, step_ms, dot_rows, other_rows, cmd.strip())
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{tag}.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out, f"{tag}.json"), "w") as f:
        json.dump({"method": args.method, "step_ms": step_ms, "steps": args.steps, "dots": dot_rows,
                   "other": other_rows}, f, indent=1)
    print(md)
    print(f"wrote {tag}.json, .md to {args.out}")


if __name__ == "__main__":
    main()
