"""The layout of a low-rank gradient's token contraction on this backend: ``xᵀ(g Rᵀ)`` as ``[d_in, r]`` vs ``[r, d_in]``.

    python -m benchmarks.lowrank_layout          # -> results/lowrank_layout.{md,json}

LoRA's ``dA = xᵀ(g Bᵀ)`` contracts the tokens ``N`` of ``x [N, d_in]`` and ``gBᵀ [N, r]``. Written as is,
XLA lays the result out ``[d_in, r]``; written ``(gBᵀ)ᵀx`` it is ``[r, d_in]`` (a transpose away from
``dA``), and XLA folds a plain transpose back into the first form. ``LowRank.pullback``
(``reparam/structure.py``) forms the second and transposes it behind ``lax.optimization_barrier``. Each
variant runs ``--terms`` times inside one compiled program (distinct operands per term, results stacked),
so the figure is the op's own cost, not a dispatch; median over ``--calls`` calls, per term.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

OUT = os.path.join(os.path.dirname(__file__), "results")

VARIANTS = {
    "x.T @ gb  ->  [d, r]": lambda x, gb, a: x.T @ gb + a,
    "einsum('nr,nd->rd').T": lambda x, gb, a: jnp.einsum("nr,nd->rd", gb, x).T + a,
    "the same, transposed behind optimization_barrier": lambda x, gb, a: jax.lax.optimization_barrier(
        jnp.einsum("nr,nd->rd", gb, x)).T + a,
    "einsum('nr,nd->rd') kept [r, d] (reference)": lambda x, gb, a: jnp.einsum("nr,nd->rd", gb, x) + a.T,
}


def measure(tokens: int, d: int, r: int, terms: int, calls: int) -> dict:
    k = jax.random.split(jax.random.key(0), 3)
    xs, gbs = jax.random.normal(k[0], (terms, tokens, d)), jax.random.normal(k[1], (terms, tokens, r))
    a = jax.random.normal(k[2], (terms, d, r))
    out = {}
    for name, f in VARIANTS.items():
        prog = jax.jit(lambda xs, gbs, a, f=f: jnp.stack([f(xs[i], gbs[i], a[i]) for i in range(terms)]))
        jax.block_until_ready(prog(xs, gbs, a))
        ts = []
        for _ in range(calls):
            t = time.perf_counter()
            jax.block_until_ready(prog(xs, gbs, a))
            ts.append(time.perf_counter() - t)
        out[name] = 1e6 * float(np.median(ts)) / terms
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--dims", default="256,768", help="comma-separated d_in values")
    ap.add_argument("--ranks", default="8,16")
    ap.add_argument("--terms", type=int, default=32)
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--tag", default="lowrank_layout")
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args(argv)
    rows = []
    for d in map(int, args.dims.split(",")):
        for r in map(int, args.ranks.split(",")):
            for name, us in measure(args.tokens, d, r, args.terms, args.calls).items():
                rows.append({"tokens": args.tokens, "d_in": d, "r": r, "variant": name, "us": us})
                print(f"N={args.tokens} d_in={d} r={r}  {name:50s} {us:8.1f} us", flush=True)
    cmd = f"python -m benchmarks.lowrank_layout {' '.join(sys.argv[1:] if argv is None else argv)}".strip()
    head = (f"The token contraction of LoRA's dA = xᵀ(g Bᵀ), per op inside one compiled program ({args.terms} terms, "
            f"median of {args.calls} calls), {jax.default_backend()}, {os.cpu_count()} CPUs; `{cmd}`")
    lines = [head, "", "| N | d_in | r | variant | µs per op |", "|---:|---:|---:|---|---:|"]
    lines += [f"| {r['tokens']} | {r['d_in']} | {r['r']} | {r['variant']} | {r['us']:.1f} |" for r in rows]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.tag}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, f"{args.tag}.json"), "w") as f:
        json.dump({"header": head, "args": vars(args), "rows": rows}, f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
