"""How the hot path takes a sparse, FourierFT or Kronecker weight's gradient: each way, timed on MiniLM's kernels.

    python -m benchmarks.grad_paths            # table + benchmarks/results/grad_paths.{json,md}
    python -m benchmarks.grad_paths --quick    # one shape, fewer repeats

For ``N`` tokens through a ``d_in x d_out`` kernel (MiniLM-L6's 384x384, 384x1536, 1536x384; the
MiniLM benchmark's batch of 32x64 = 2048 tokens), the gradient of the adapter from the layer's input
``x`` and output cotangent ``g`` (``g`` from a fusion, as in a backward pass):

- sparse, ``dv_k = Σ_n x[n, i_k] g[n, j_k]`` at a support of ``density``: ``dense`` reads it off the
  full ``xᵀg`` GEMM (the path off CPU), ``gather`` gathers the ``2k`` columns (plain XLA), ``kernel``
  is :func:`reparam.sampled.sampled_dot` (the CPU path);
- FourierFT, ``n = 1000`` frequencies of ``s·Re(ifft2(C))``: ``dense`` maps ``xᵀg`` by the real-FFT
  2-D adjoint and reads the support (the path off CPU), ``half`` samples the rows' real-FFT half
  spectra with the kernel (:func:`reparam.structure.half_spectrum_grad`, the CPU path);
- Kronecker ``ΔW = a ⊗ b`` (LoKr / KronA factors): ``dense`` projects ``xᵀg`` onto ``a`` and ``b``,
  ``vec`` is autodiff of the vec-trick matvec, ``batched`` is the hot path's per-token products;
- Compacter ``ΔW = Σ_k a_k ⊗ (b_k v_k)`` (``n = 4`` terms, rank 8 blocks): ``dense`` projects ``xᵀg``,
  ``vec`` is autodiff of the matvec, ``lowrank`` the hot path's rank-``K·r`` GEMMs.

Each time is the median of ``--repeats`` calls of the jitted function after a warm-up.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from reparam import matmul as mm
from reparam import sampled
from reparam import structure as S

OUT = os.path.join(os.path.dirname(__file__), "results")
SHAPES = ((384, 384), (384, 1536), (1536, 384))
DENSITIES = (0.005, 0.02, 0.05)


def timed(f, *args, repeats: int) -> float:
    f = jax.jit(f)
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t)
    return 1e3 * float(np.median(ts))


def sparse_rows(d_in, d_out, n, repeats):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((n, d_in)), jnp.float32)
    h = jnp.asarray(rng.standard_normal((n, d_out)), jnp.float32)
    rows = []
    for density in DENSITIES:
        idx = jnp.asarray(np.sort(rng.choice(d_in * d_out, int(density * d_in * d_out), replace=False)), jnp.int32)
        ways = {"dense": lambda x, h: (x.T @ jnp.tanh(h)).reshape(-1)[idx],
                "gather": lambda x, h: jnp.sum(x.T[idx // d_out] * jnp.tanh(h).T[idx % d_out], axis=1),
                "kernel": lambda x, h: sampled.sampled_dot(x, jnp.tanh(h), idx)}
        ms = {k: timed(f, x, h, repeats=repeats) for k, f in ways.items()}
        rows.append({"kind": "sparse", "shape": [d_in, d_out], "tokens": n, "density": density, "k": int(idx.shape[0]),
                     "ms": ms, "speedup_vs_dense": ms["dense"] / ms["kernel"]})
        print(f"sparse {d_in}x{d_out} density {density:<6} " + "  ".join(f"{k} {v:7.2f}" for k, v in ms.items()),
              flush=True)
    return rows


def fourier_rows(d_in, d_out, n, repeats, k=1000):
    import reparam as rp
    rng = np.random.default_rng(2)
    idx = jnp.asarray(np.sort(rng.choice(d_in * d_out, k, replace=False)), jnp.int32)
    s = S.InBasis(S.Sparse(idx, jnp.zeros(k), d_out), 300.0, rp.fourier_basis())
    x = jnp.asarray(rng.standard_normal((n, d_in)), jnp.float32)
    h = jnp.asarray(rng.standard_normal((n, d_out)), jnp.float32)
    ways = {"dense": lambda x, h: s.scale * s.adjoint(x.T @ jnp.tanh(h)).reshape(-1)[idx],
            "half": lambda x, h: S.half_spectrum_grad(s, x, jnp.tanh(h))}
    ms = {k_: timed(f, x, h, repeats=repeats) for k_, f in ways.items()}
    print(f"fourier {d_in}x{d_out} n {k}  " + "  ".join(f"{k_} {v:7.2f}" for k_, v in ms.items()), flush=True)
    return [{"kind": "fourierft", "shape": [d_in, d_out], "tokens": n, "k": k, "ms": ms,
             "speedup_vs_dense": ms["dense"] / ms["half"]}]


def autodiff_ways(s, d_in, d_out) -> dict:
    """The two autodiff baselines for a structure's gradient at ``g = tanh(h)``: ``dense`` pulls ``xᵀg``
    back through ``dense(s)``, ``vec`` pulls ``g`` back through ``matvec(s, x)``."""
    def dense(x, h):
        _, pull = jax.vjp(lambda s_: S.dense(s_, (d_in, d_out)), s)
        return pull(x.T @ jnp.tanh(h))[0]

    def vec(x, h):
        _, pull = jax.vjp(lambda s_: S.matvec(s_, x), s)
        return pull(jnp.tanh(h))[0]
    return {"dense": dense, "vec": vec}


def kron_rows(d_in, d_out, n, repeats):
    from reparam.kronecker import factorization
    (a1, b1), (a2, b2) = factorization(d_in), factorization(d_out)
    rng = np.random.default_rng(1)
    s = S.Kron(jnp.asarray(rng.standard_normal((1, a1, a2)), jnp.float32),
               jnp.asarray(rng.standard_normal((1, b1, b2)), jnp.float32))
    x = jnp.asarray(rng.standard_normal((n, d_in)), jnp.float32)
    h = jnp.asarray(rng.standard_normal((n, d_out)), jnp.float32)
    ways = {**autodiff_ways(s, d_in, d_out), "batched": lambda x, h: S.kron_grad(s, x, jnp.tanh(h))}
    ms = {k: timed(f, x, h, repeats=repeats) for k, f in ways.items()}
    print(f"kron   {d_in}x{d_out} a {a1}x{a2} b {b1}x{b2}  " + "  ".join(f"{k} {v:7.2f}" for k, v in ms.items()),
          flush=True)
    return [{"kind": "kron", "shape": [d_in, d_out], "tokens": n, "a": [a1, a2], "b": [b1, b2], "ms": ms,
             "speedup_vs_dense": ms["dense"] / ms["batched"]}]


def compacter_rows(d_in, d_out, n, repeats, k=4, r=8):
    rng = np.random.default_rng(3)
    arr = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    s = S.Kron(arr(k, k, k), arr(k, d_in // k, r), arr(k, r, d_out // k))
    x, h = arr(n, d_in), arr(n, d_out)
    ways = {**autodiff_ways(s, d_in, d_out), "lowrank": lambda x, h: S.kron_lowrank_grad(s, x, jnp.tanh(h))}
    ms = {k_: timed(f, x, h, repeats=repeats) for k_, f in ways.items()}
    print(f"compacter {d_in}x{d_out} n {k} r {r}  " + "  ".join(f"{k_} {v:7.2f}" for k_, v in ms.items()), flush=True)
    return [{"kind": "compacter", "shape": [d_in, d_out], "tokens": n, "terms": k, "rank": r, "ms": ms,
             "speedup_vs_dense": ms["dense"] / ms["lowrank"]}]


def markdown(rows) -> str:
    out = ["| structure | kernel | tokens | support | ways (ms) | fastest vs dense xᵀg |", "|---|---|---|---|---|---|"]
    for r in rows:
        sup = {"sparse": lambda: f"{100 * r['density']:g}% ({r['k']})", "fourierft": lambda: f"n = {r['k']}",
               "kron": lambda: f"a {r['a']}, b {r['b']}",
               "compacter": lambda: f"{r['terms']} terms, rank {r['rank']}"}[r["kind"]]()
        ways = ", ".join(f"{k} {v:.2f}" for k, v in r["ms"].items())
        out.append(f"| {r['kind']} | {r['shape'][0]}x{r['shape'][1]} | {r['tokens']} | {sup} | {ways} | "
                   f"{r['speedup_vs_dense']:.2f}x |")
    return "\n".join(out) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=OUT)
    args = p.parse_args()
    shapes = SHAPES[1:2] if args.quick else SHAPES
    repeats = 3 if args.quick else args.repeats
    rows = []
    for d_in, d_out in shapes:
        rows += sparse_rows(d_in, d_out, args.tokens, repeats) + fourier_rows(d_in, d_out, args.tokens, repeats) \
            + kron_rows(d_in, d_out, args.tokens, repeats) + compacter_rows(d_in, d_out, args.tokens, repeats)
    md = markdown(rows)
    print("\n" + md)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "grad_paths.json"), "w") as f:
        json.dump({"device": jax.devices()[0].device_kind, "rows": rows}, f, indent=1)
    with open(os.path.join(args.out, "grad_paths.md"), "w") as f:
        f.write(md)


if __name__ == "__main__":
    main()
