"""MiniLM train step, side by side: reparam full fine-tuning and transforms vs Hugging Face PEFT (torch CPU).

    python -m benchmarks.minilm                       # every method, both sides -> results/minilm.{json,md,png}
    python -m benchmarks.minilm --quick               # lora + pissa, 3 steps -> results/minilm_quick.*
    python -m benchmarks.minilm --methods=full,lora@autodiff,lora --sides=reparam --steps=15
    python -m benchmarks.minilm --methods=lora --repeat=5 --tag=minilm_lora   # reparam / PEFT interleaved x5
    python -m benchmarks.minilm --methods=lora --repeat=3 --huge-pages=both --tag=minilm_lora_hugepages_both

all-MiniLM-L6-v2 (experiments.models.bert; PEFT side: the same weights in transformers'
``BertModel``, benchmarks/peft_minilm.py) with a 3-class head on the mean-pooled output;
batch 32 x seq 64 = 2048 tokens (the same numpy-drawn batch on both sides); forward +
cross-entropy + backward + AdamW. Adapters on all 36 query/key/value/attention-output/
intermediate/output kernels, head trainable (as ../shared/PERF_NOTES.md's yardstick): r=8
alpha=16, VeRA r=256, RandLoRA r=32, LoKr r=8, FourierFT / WaveFT 1000 coefficients, PiSSA by
randomized SVD (ours ``niter=4``, PEFT ``pissa_niter_4``). ``frozen`` is the floor under all of them, on
each side: no adapter and no encoder weight gradient, only the head and the embeddings' LayerNorm train, so the
backward still runs down through every layer (the step time of a method minus this row is what its adapters
cost). Each configuration runs in its own
process (so one's compilation caches and memory do not affect another; torch with
``--threads`` threads, default: this machine's cores), ``--warmup`` steps then the median of
``--steps``. The reparam processes run with glibc's malloc on 2 MiB pages, as
``rp.train.use_huge_pages()`` (what the experiment runner calls first) sets them: XLA:CPU allocates a
step's temporaries afresh at every call, and on 4 KiB pages refaulting them costs a fifth of the step.
``--huge-pages=both`` gives the PEFT processes the same setting (it does not speed torch up: its step
faults ~10,000 pages, not ~180,000), ``none`` neither. ``name@autodiff`` runs a method with
``matmul="autodiff"``: plain autodiff through the materialised weights and no LayerNorm barrier -- the
library before the hot path.

Columns: step ms and tokens/s; ``x reparam LoRA`` / ``x PEFT LoRA``: the row's step time over
reparam's / PEFT's LoRA step (blank when that run is not in the sweep); trainable count; init s
(cold = first call in the process, reparam's including compilation; warm = second call):
``rp.plan`` + ``plan.init`` vs ``peft.get_peft_model``; adapter file bytes: ours
``rp.interop.peft.export`` (LoRA, DoRA, PiSSA, VeRA, LoKr) + the head as safetensors, else the
trainable pytree as safetensors; PEFT's ``save_pretrained`` directory; peak memory: the
process's peak RSS while training (VmHWM, reset before the first step) and for reparam also
XLA's estimate for the compiled step (arguments + outputs + temporaries - aliased). Methods PEFT
lacks are blank on the PEFT side. After the methods PEFT has (``PEFT_TOO``; PEFT's ``sparse`` is SHiRA r=4,
random mask: 2.1% of a 384 x 384 kernel, ours 2%), the default sweep runs every other method of
``experiments.methods.METHODS`` on the reparam side with the runner's hyperparameters
(experiments/configs/tweets.py); the calibrated ones (CorDA, EVA, LoRA-SB, SPT) calibrate on the batch.
For ratios between reparam's methods without the process-to-process noise, see ``benchmarks/minilm_ratios.py``
(every method in one process, timed round-robin).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "benchmarks", "results")
ADAPTED = r".*layer_\d+/(attention/(query|key|value|output)|intermediate|output)/kernel"
# ``frozen``: the floor under every method -- no adapter and no weight gradient in the encoder, but the backward
# runs down through every layer (the embeddings' LayerNorm trains), as it must for any adapted kernel
FROZEN_TRAINS = (r"head/.*", r"encoder/embeddings/norm/.*")
N_CLASSES = 3
EXPORTABLE = ("lora", "rslora", "dora", "pissa", "vera", "lokr")     # rp.interop.peft.export formats
PEFT_TOO = "frozen,full,lora@autodiff,lora,rslora,dora,pissa,vera,lokr,fourierft,waveft,randlora,sparse"
def all_methods() -> str:
    """PEFT_TOO, then every other method of experiments.methods.METHODS (reparam only) but the linear probe."""
    from experiments import methods as M
    first = PEFT_TOO.split(",")
    return ",".join(first + [m for m in M.METHODS if m not in first and m != "head"])


QUICK = dict(methods="lora,pissa", warmup=1, steps=3)


def rules_for(name: str):
    import reparam as rp
    if name == "frozen":
        return [(pattern, rp.full()) for pattern in FROZEN_TRAINS]
    r = {"full": None,
         "lora": rp.lora(8, alpha=16), "dora": rp.dora(8, alpha=16), "pissa": rp.pissa(8, alpha=16, niter=4),
         "vera": rp.vera(256, store_bases=True), "lokr": rp.lokr(8, alpha=16), "krona": rp.krona(),
         "fourierft": rp.fourierft(1000, 300.0), "waveft": rp.waveft(k=1000),
         "randlora": rp.randlora(32, store_bases=True), "sparse": rp.sparse.random(density=0.02),
         "rslora": rp.lora(8, 16, rslora=True),
         "sltrain": rp.add(rp.lora(4, alpha=8), rp.sparse.random(k=1000))}
    if name not in r:
        from experiments import methods as M
        from experiments.configs import tweets
        if name not in M.METHODS:
            raise SystemExit(f"unknown method {name!r}; choose from {sorted(set(r) | set(M.METHODS))}")
        return M.METHODS[name](tweets.get_config())         # the runner's hyperparameters
    if r[name] is None:
        return [(r".*", rp.full())]
    return [(ADAPTED, r[name]), (r"head/.*", rp.full())]


# --- shared with benchmarks/peft_minilm.py (stdlib + numpy only) ---------------------------------

def fixed_batch(batch: int, seq: int):
    """``(ids, mask, labels)`` int64 numpy arrays, the same on both sides: ids in [1000, 30000), labels in [0, 3)."""
    import numpy as np
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 30000, (batch, seq))
    return ids, np.ones_like(ids), rng.integers(0, N_CLASSES, (batch,))


def rss_mb(field: str) -> float:
    """``VmRSS`` / ``VmHWM`` (peak) of this process from /proc/self/status, in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> bool:
    """Resets this process's ``VmHWM`` to its current RSS (Linux: '5' into /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def huge_pages() -> bool:
    """Whether this process runs with glibc's malloc on transparent huge pages (``reparam.train.HUGE_PAGES``)."""
    return "glibc.malloc.hugetlb=1" in os.environ.get("GLIBC_TUNABLES", "").split(":")


def dir_size(path: str) -> int:
    """Total bytes of the files under ``path``."""
    return sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(path) for n in names)


# --- the reparam side ----------------------------------------------------------------------------

def torch_module(path: str) -> str:
    """``"encoder/layer_3/attention/query/kernel"`` -> ``"bert.encoder.layer.3.attention.self.query"`` (PEFT side)."""
    i, rest = re.fullmatch(r"encoder/layer_(\d+)/(.+)/kernel", path).groups()
    sub = {"attention/query": "attention.self.query", "attention/key": "attention.self.key",
           "attention/value": "attention.self.value", "attention/output": "attention.output.dense",
           "intermediate": "intermediate.dense", "output": "output.dense"}[rest]
    return f"bert.encoder.layer.{i}.{sub}"


def adapter_bytes(name, params, frozen, trainable, initial) -> tuple[int, str]:
    """Bytes of our saved adapter: a PEFT directory + the head where exportable, else the trainable pytree."""
    import jax
    import numpy as np
    from safetensors.numpy import save_file

    import reparam as rp
    flat = {jax.tree_util.keystr(p, simple=True, separator="/"): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(trainable)[0]}
    with tempfile.TemporaryDirectory() as d:
        if name in EXPORTABLE:
            adapters_only = rp.plan(rules_for(name)[:1], params)
            rp.interop.peft.export(adapters_only, frozen, trainable, d, module_map=torch_module, initial=initial)
            save_file({k: v for k, v in flat.items() if k.startswith("head/")}, os.path.join(d, "head.safetensors"))
            what = "rp.interop.peft.export + head safetensors"
        else:
            save_file(flat, os.path.join(d, "trainable.safetensors"))
            what = "safetensors of the trainable pytree"
        return dir_size(d), what


def model_and_batch(batch: int, seq: int):
    """``(classifier, params, (ids, mask, labels), loss_fn)``: MiniLM with a fresh 3-way head, the fixed batch."""
    import jax
    import jax.numpy as jnp
    import optax
    from experiments.models import bert

    clf, params, _ = bert.minilm_classifier(jax.random.key(0), n_classes=N_CLASSES)
    batch_ = tuple(jnp.asarray(a, jnp.int32) for a in fixed_batch(batch, seq))

    def loss_fn(p, b, key=None):
        logits = clf.apply({"params": p}, b[0], b[1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, b[2]).mean()
    return clf, jax.block_until_ready(params), batch_, loss_fn


def init_method(name: str, clf, params, batch, loss_fn):
    """``(plan, frozen, trainable)`` of method ``name``: plan + (calibration on the batch, for CorDA / EVA /
    LoRA-SB / SPT) + ``plan.init``."""
    import jax
    import reparam as rp
    plan = rp.plan(rules_for(name), params)
    calib = None
    if plan.calibrated():
        from experiments import methods as M
        from experiments.configs import tweets
        calib = M.calibrate(name, plan, tweets.get_config(), model=clf, params=params, batches=[batch],
                            loss_fn=loss_fn, inputs=lambda b: (b[0], b[1]))
    return plan, *jax.block_until_ready(plan.init(jax.random.key(1), params, calib))


def child(name: str, mode: str, args) -> dict:
    import jax
    import numpy as np

    t0 = time.perf_counter()
    clf, params, batch, loss_fn = model_and_batch(args.batch, args.seq)
    load_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    plan, frozen, trainable = init_method(name, clf, params, batch, loss_fn)
    init_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    init_method(name, clf, params, batch, loss_fn)
    init_warm_s = time.perf_counter() - t0
    initial = None if name == "full" else jax.tree.map(np.array, trainable)   # the step donates `trainable`

    row, state = measure(name, mode, plan, frozen, trainable, loss_fn, batch, args)
    size, what = adapter_bytes(name, params, frozen, state.trainable, initial)
    return {**row, "load_s": load_s, "init_s": init_s, "init_warm_s": init_warm_s, "adapter_bytes": size,
            "adapter_what": what}


def measure(name: str, mode: str, plan, frozen, trainable, loss_fn, batch, args) -> tuple[dict, object]:
    """Compiles the AdamW train step (``matmul=mode``) and times it -- ``args.warmup`` steps, then the median of
    ``args.steps`` -- with XLA's peak estimate, the peak RSS while training and the routes the step took;
    ``(row of the table as a dict, final state)``."""
    import jax
    import optax

    import reparam as rp
    from benchmarks.timing import median, peak_bytes, run_steps

    opt = optax.adamw(1e-4)
    step = rp.train.make_train_step(plan, loss_fn, opt, matmul=mode)
    state = rp.train.init_state(trainable, opt, jax.random.key(2))
    t0 = time.perf_counter()
    compiled = step.lower(state, frozen, batch).compile()
    compile_s = time.perf_counter() - t0
    routes = sorted({u.route for s in step.routing.uses.values() for u in s.values()})
    peak = peak_bytes(compiled)
    rss0 = rss_mb("VmRSS")
    reset = reset_peak_rss()
    state, times, losses = run_steps(compiled, state, frozen, batch, args.warmup, args.steps)
    ms = median(times)
    rss_peak = rss_mb("VmHWM")
    return {"side": "reparam", "method": name, "matmul": mode, "step_ms": ms,
            "tokens_per_s": args.batch * args.seq / ms * 1e3, "step_ms_all": times,
            "trainable": int(sum(plan.trainable_counts(trainable))), "xla_peak_mb": peak / 2 ** 20,
            "rss_peak_mb": rss_peak if reset else None, "rss_train_delta_mb": rss_peak - rss0 if reset else None,
            "compile_s": compile_s, "routes": routes, "loss_first": losses[0], "loss": losses[-1],
            "backend": jax.default_backend(), "huge_pages": huge_pages()}, state


# --- the driver ----------------------------------------------------------------------------------

def run_child(module: str, spec: str, args, extra=()) -> dict:
    """Runs one configuration in a fresh process (with the flags ``extra`` too); its JSON line, or
    ``{"error": ...}``."""
    cmd = [sys.executable, "-m", module, f"--child={spec}", f"--batch={args.batch}", f"--seq={args.seq}",
           f"--warmup={args.warmup}", f"--steps={args.steps}", *extra]
    side = "peft" if module.rsplit(".", 1)[-1].startswith("peft_") else "reparam"
    env = dict(os.environ)
    if args.huge_pages in (side, "both"):
        from reparam.train import huge_pages_env
        env = huge_pages_env(env)
    if side == "peft":
        cmd.append(f"--threads={args.threads}")
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1",
                   TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - t
    if res.returncode:
        tail = res.stderr.strip().splitlines()[-1:] or ["no output"]
        return {"error": tail[0], "stderr_tail": res.stderr[-3000:], "wall_s": wall}
    return {**json.loads(res.stdout.strip().splitlines()[-1]), "wall_s": wall}


def median_run(runs: list) -> dict:
    """Of repeated runs of one configuration, the one with the median step time (the lower middle of an
    even count), with every run's step time in ``step_ms_runs``; the first error if every run failed."""
    ok = sorted((r for r in runs if "error" not in r), key=lambda r: r["step_ms"])
    if not ok:
        return runs[0]
    return {**ok[(len(ok) - 1) // 2], "step_ms_runs": [r["step_ms"] for r in runs if "error" not in r]}


def _f(v, spec, none="") -> str:
    return none if v is None else format(v, spec)


def _bytes(n) -> str:
    if n is None:
        return ""
    return f"{n / 2 ** 20:.2f} MB" if n >= 2 ** 20 else f"{n / 2 ** 10:.1f} KB"


def markdown(rows) -> str:
    lora_ms = {s: next((r["step_ms"] for r in rows if r["side"] == s and r["method"] == "lora"
                        and r.get("matmul", "auto") == "auto" and "error" not in r), None) for s in ("reparam", "peft")}
    lines = ["| method | side | step ms | tokens/s | x reparam LoRA | x PEFT LoRA | trainable | init s cold / warm | "
             "adapter file | peak RSS MB | RSS rise in training MB | XLA peak MB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        label = r["method"] + (f"@{r['matmul']}" if r.get("matmul", "auto") != "auto" else "")
        side = "reparam" if r["side"] == "reparam" else "PEFT"
        if r.get("missing"):
            lines.append(f"| {label} | {side} | | | | | | | | | | |")
            continue
        if "error" in r:
            lines.append(f"| {label} | {side} | FAILED: {' '.join(r['error'].split())[:200]} | | | | | | | | | |")
            continue
        ms = r["step_ms"]
        x = [f"{ms / lora_ms[s]:.2f}" if lora_ms[s] else "" for s in ("reparam", "peft")]
        lines.append(f"| {label} | {side} | {ms:.1f} | {r['tokens_per_s']:.0f} | {x[0]} | {x[1]} | "
                     f"{r['trainable']:,} | {r['init_s']:.3f} / {r['init_warm_s']:.3f} | "
                     f"{_bytes(r['adapter_bytes'])} | {_f(r['rss_peak_mb'], '.0f')} | "
                     f"{_f(r['rss_train_delta_mb'], '.0f')} | {_f(r.get('xla_peak_mb'), '.0f')} |")
    return "\n".join(lines)


def plot(rows, path, title="all-MiniLM-L6-v2, batch 32 x 64 tokens, CPU"):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import numpy as np
    ok = [r for r in rows if "error" not in r and not r.get("missing")]
    labels = list(dict.fromkeys(r["method"] + (f"@{r['matmul']}" if r.get("matmul", "auto") != "auto" else "")
                                for r in rows))

    def values(side, key):
        out = []
        for lab in labels:
            m, _, mode = lab.partition("@")
            r = next((r for r in ok if r["side"] == side and r["method"] == m
                      and (not mode if side == "peft" else r["matmul"] == (mode or "auto"))), None)
            out.append(np.nan if r is None else r[key])
        return np.array(out, float)

    panels = [("step_ms", "step ms (lower is better)", None), ("init_warm_s", "init s, warm", None),
              ("adapter_bytes", "adapter file MB", 2 ** 20)]
    x = np.arange(len(labels))
    fig, axes = plt.subplots(3, 1, figsize=(max(8, 0.5 * len(labels)), 10))
    for ax, (key, what, div) in zip(axes, panels):
        for off, side, colour in ((-0.2, "reparam", "tab:blue"), (0.2, "peft", "tab:orange")):
            v = values(side, key) / (div or 1)
            ax.bar(x + off, v, 0.4, label="reparam" if side == "reparam" else "PEFT (torch CPU)", color=colour)
        if key == "step_ms":
            for side, colour in (("reparam", "tab:blue"), ("peft", "tab:orange")):
                lora = [r["step_ms"] for r in ok if r["side"] == side and r["method"] == "lora"
                        and r.get("matmul", "auto") == "auto"]
                if lora:
                    ax.axhline(lora[0], color=colour, ls=":", lw=1)
        sizes = np.concatenate([values(s, key) for s in ("reparam", "peft")])
        if key == "adapter_bytes" and np.nanmax(sizes) > 30 * np.nanmin(sizes):
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks(x, labels, rotation=45, ha="right", fontsize=8)
        ax.set_title(what, fontsize=9)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{title}: reparam vs PEFT (dotted: each side's LoRA)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _tag(args, base="minilm") -> str:
    return args.tag or (f"{base}_quick" if args.quick else base)


def write(rows, args, model="all-MiniLM-L6-v2", base="minilm"):
    """``<tag>.json`` (every row), ``<tag>.md`` (the table) and ``<tag>.png`` (the bar chart) in ``args.out``."""
    tag = _tag(args, base)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{tag}.json"), "w") as f:
        json.dump({"batch": args.batch, "seq": args.seq, "warmup": args.warmup, "steps": args.steps,
                   "repeat": args.repeat, "huge_pages": args.huge_pages,
                   "threads": args.threads, "cpus": os.cpu_count(), "rows": rows}, f, indent=1)
    with open(os.path.join(args.out, f"{tag}.md"), "w") as f:
        repeat = f", the median of {args.repeat} interleaved runs (each a fresh process)" if args.repeat > 1 else ""
        pages = {"reparam": "reparam's processes", "peft": "PEFT's processes", "both": "both sides",
                 "none": "neither side"}[args.huge_pages]
        f.write(f"{model}, batch {args.batch} x {args.seq}, median of {args.steps} steps after "
                f"{args.warmup} warm-up{repeat}; glibc malloc on huge pages: {pages}; "
                f"`python -m benchmarks.{base} {' '.join(sys.argv[1:])}`\n\n"
                f"{markdown(rows)}\n")
    plot(rows, os.path.join(args.out, f"{tag}.png"), f"{model}, batch {args.batch} x {args.seq} tokens, CPU")


def parser(doc: str, methods: str, batch: int, seq: int, steps: int = 15) -> argparse.ArgumentParser:
    """The command line of a side-by-side benchmark (this one's and ``benchmarks/smollm.py``'s)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--methods", default=None, help=f"comma-separated; default {methods}")
    ap.add_argument("--sides", default="reparam,peft", help="reparam, peft or both")
    ap.add_argument("--batch", type=int, default=batch)
    ap.add_argument("--seq", type=int, default=seq)
    ap.add_argument("--warmup", type=int, default=None, help="default 3 (--quick: 1)")
    ap.add_argument("--steps", type=int, default=None, help=f"timed steps, median reported; default {steps} "
                                                            "(--quick: 3)")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs of each configuration, the sides interleaved; the median run is reported")
    ap.add_argument("--huge-pages", default="reparam", choices=("reparam", "peft", "both", "none"),
                    help="the sides whose processes run with rp.train.HUGE_PAGES in GLIBC_TUNABLES, as "
                         "rp.train.use_huge_pages() sets it (default: reparam's)")
    ap.add_argument("--quick", action="store_true", help="lora,pissa with 1 + 3 steps; writes <tag>_quick.*")
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--tag", default=None, help="output file names <tag>.{json,md,png}")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return ap


def sweep(args, module: str, peft_module: str, peft_methods, check, model: str, base: str) -> list:
    """Runs every ``args.methods`` configuration of ``module`` (reparam) and ``peft_module`` (PEFT, for the
    names in ``peft_methods``) in fresh processes, the sides interleaved ``args.repeat`` times; prints a line
    per run, writes the table, JSON and plot after each method (a killed sweep keeps its rows); exits 1 when a
    run failed. ``check(name)`` fails early on an unknown method."""
    sides = args.sides.split(",")
    rows = []
    for spec in args.methods.split(","):
        name, _, mode = spec.partition("@")
        check(name)                                          # unknown names fail before any run
        todo = [("reparam", module)] if "reparam" in sides else []
        peft_lacks = "peft" in sides and not mode and name not in peft_methods
        if "peft" in sides and not mode and not peft_lacks:
            todo.append(("peft", peft_module))
        runs = {side: [] for side, _ in todo}
        for _ in range(args.repeat):                         # interleaved: reparam, PEFT, reparam, PEFT, ...
            for side, mod in todo:
                runs[side].append(run_child(mod, spec, args))
        for side, _ in todo:
            r = {"side": side, "method": name, **({"matmul": mode or "auto"} if side == "reparam" else {}),
                 **median_run(runs[side])}
            rows.append(r)
            if "error" in r:
                print(f"{spec:>14} {side:>7}: FAILED {r['error']}\n{r['stderr_tail']}", flush=True)
            else:
                print(f"{spec:>14} {side:>7}: {r['step_ms']:8.1f} ms  {r['tokens_per_s']:6.0f} tok/s  init "
                      f"{r['init_s']:.3f}/{r['init_warm_s']:.3f} s  adapter {_bytes(r['adapter_bytes']):>9}  "
                      f"peak RSS {_f(r['rss_peak_mb'], '.0f')} MB  ({r['wall_s']:.0f} s)", flush=True)
        if peft_lacks:
            rows.append({"side": "peft", "method": name, "missing": True})
            print(f"{spec:>14}    peft: not in PEFT", flush=True)
        write(rows, args, model, base)
    print("\n" + markdown(rows))
    print(f"\nwrote {_tag(args, base)}.json, .md, .png to {args.out}")
    if any("error" in r for r in rows):
        raise SystemExit(1)
    return rows


def dispatch(args, defaults: dict, child) -> bool:
    """Fills ``args``' unset options from ``defaults``; in a child process (``--child=name[@mode]``) runs
    ``child(name, mode, args)``, prints its JSON line and returns True."""
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.child:
        name, _, mode = args.child.partition("@")
        print(json.dumps(child(name, mode or "auto", args)))
    return bool(args.child)


def main():
    from benchmarks import peft_minilm
    args = parser(__doc__, f"{PEFT_TOO},... (all)", batch=32, seq=64).parse_args()
    if dispatch(args, QUICK if args.quick else dict(methods=all_methods(), warmup=3, steps=15), child):
        return
    sweep(args, "benchmarks.minilm", "benchmarks.peft_minilm", peft_minilm.METHODS, rules_for,
          "all-MiniLM-L6-v2", "minilm")


if __name__ == "__main__":
    main()
