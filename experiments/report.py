"""Outputs of a run: JSONL metrics, ``results.json``, the printed table and the plot.

    report.append_jsonl("runs/x/metrics.jsonl", [{"method": "lora", "step": 1, "loss": 1.6}])
    kept = report.rewrite_jsonl("runs/x/metrics.jsonl", keep=lambda r: r["step"] <= 100)   # a resume
    print(report.table(results))
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

COLUMNS = ("method", "transform", "test acc", "trainable", "% total", "step ms", "x full", "tok/s", "frozen MB",
           "peak MB")
MB = 1e6          # the table's megabytes


def append_jsonl(path: str, records: Sequence[dict]) -> None:
    """Appends one JSON object per line to ``path``."""
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def read_jsonl(path: str) -> list[dict]:
    """The records of ``path``, in order; a line cut short (a run killed while writing it) is left out."""
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def rewrite_jsonl(path: str, keep: Callable[[dict], bool]) -> list[dict]:
    """Rewrites ``path`` (atomically) with the records ``keep`` accepts, and returns them."""
    kept = [r for r in read_jsonl(path) if keep(r)] if os.path.exists(path) else []
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        for r in kept:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)
    return kept


def write_json(path: str, obj: Any) -> None:
    """Writes ``obj`` to ``path`` atomically (a temporary file renamed), so a killed run leaves no torn file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def _mb(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / MB:.1f}"


def table(results: dict) -> str:
    """The results table: one row per method, then the precision and base-format lines and the task's notes
    (the base model, the untrained head's accuracy).

    ``tok/s``: tokens (batch x sequence length, padding included) per second of the median step, for
    tasks on sequences. ``frozen MB``: the bytes of the method's frozen tree (its bases -- quantised where
    ``base_format`` says so -- and constants; ``-`` for a result written before it was recorded). ``peak MB`` is XLA's compiled estimate for the train step (arguments + outputs + temporaries -
    donated aliases); a ``device MB`` column (the device's high-water mark so far) is added where the
    backend reports one (GPU, TPU).
    """
    methods = results["methods"]
    base_ms = methods.get("full", {}).get("step_ms")
    device = any(r.get("device_peak_bytes") for r in methods.values())
    columns = COLUMNS + (("device MB",) if device else ())
    rows = [columns]
    for name, r in methods.items():
        ratio = f"{r['step_ms'] / base_ms:.2f}" if base_ms else "-"
        row = (name, r["transform"], f"{100 * r['acc']:.1f}%", f"{r['trainable']:,}",
               f"{r['pct_trainable']:.2f}%", f"{r['step_ms']:.3f}", ratio,
               f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else "-", _mb(r.get("frozen_bytes")),
               _mb(r.get("peak_bytes")))
        rows.append(row + ((_mb(r.get("device_peak_bytes")),) if device else ()))
    widths = [max(len(row[j]) for row in rows) for j in range(len(columns))]
    fmt = lambda row: "  ".join(x.ljust(w) if j < 2 else x.rjust(w) for j, (x, w) in enumerate(zip(row, widths)))
    lines = [fmt(rows[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows[1:]]
    prec = results.get("precision")
    if prec:
        lines.append(f"precision: base weights {prec['base']}, trainables and optimizer state "
                     f"{prec['trainable']}; remat {'on' if prec['remat'] else 'off'}")
    fmt = results.get("base_format")
    if fmt:
        lines.append(f"base format: {fmt['name']}: the adapted kernels ('{fmt['adapted']}') {fmt['what']}")
    return "\n".join(lines + list(results.get("notes", [])))


def _smooth(y: np.ndarray, k: int) -> np.ndarray:
    """Trailing moving average over ``k`` steps (shorter at the start)."""
    c = np.cumsum(np.insert(y, 0, 0.0))
    idx = np.arange(1, len(y) + 1)
    lo = np.maximum(idx - k, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def plot(path: str, history: dict[str, dict[str, list]], results: dict) -> None:
    """Three panels: training loss (smoothed) and monitored accuracy vs step, final test accuracy per method."""
    names = list(results["methods"])
    palette = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    colors = [palette(i % palette.N) for i in range(len(names))]
    styles = ["-", "--", "-.", ":"]
    fig, (ax_loss, ax_acc, ax_bar) = plt.subplots(1, 3, figsize=(19, 6.5), gridspec_kw={"width_ratios": [5, 5, 4]})
    for i, name in enumerate(names):
        h = history[name]
        kw = dict(color=colors[i], ls=styles[(i // palette.N) % len(styles)] if len(names) > 10 else "-", lw=1.4,
                  label=name)
        ax_loss.plot(h["step"], _smooth(np.asarray(h["loss"]), 10), **kw)
        ax_acc.plot(h["eval_step"], 100 * np.asarray(h["acc"]), marker=".", ms=4, **kw)
    task, split = results.get("task", "digits 5-9"), {"val": "validation"}.get(results.get("monitor"), "test")
    ax_loss.set(yscale="log", xlabel="step", ylabel="train loss (moving avg, 10 steps)",
                title=f"Training loss on {task}")
    ax_acc.set(xlabel="step", ylabel=f"{split} accuracy (%)", title=f"{split.capitalize()} accuracy on {task}")
    ax_acc.set_ylim(max(0, min(100 * min(history[n]["acc"]) for n in names) - 5), 101)
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=8, ncol=2, loc="lower right")

    order = sorted(names, key=lambda n: results["methods"][n]["acc"])
    accs = [100 * results["methods"][n]["acc"] for n in order]
    bars = ax_bar.barh(range(len(order)), accs, color=[colors[names.index(n)] for n in order])
    ax_bar.set_yticks(range(len(order)), [f"{n} ({results['methods'][n]['pct_trainable']:.1f}%)" for n in order],
                      fontsize=9)
    for b, a in zip(bars, accs):
        ax_bar.text(a + 0.3, b.get_y() + b.get_height() / 2, f"{a:.1f}", va="center", fontsize=8)
    ax_bar.set_xlim(max(0, min(accs) - 10), 103)
    ax_bar.set(xlabel="final test accuracy (%)", title=f"Test accuracy (% params trained)\n"
               f"{results.get('start', 'untrained head')}: {100 * results['untrained_head_acc']:.0f}% ({split})")
    ax_bar.grid(axis="x", alpha=0.3)
    pre = results.get("pretrain")
    fig.suptitle(f"MLP pretrained on digits 0-4 (test acc {100 * pre['acc']:.1f}%), adapted to digits 5-9" if pre
                 else f"{results.get('model', 'all-MiniLM-L6-v2')} fine-tuned on {task}: {results['config']['adapt_steps']} steps per method",
                 fontsize=12)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
