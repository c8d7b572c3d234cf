"""Shared measurement helpers for the benchmarks: the timed step loop and XLA's peak-memory estimate."""
from __future__ import annotations

import time

import jax
import numpy as np


def memory(compiled) -> dict:
    """XLA's memory analysis of a compiled executable, in bytes: ``argument``, ``output``, ``temp``, ``alias`` and
    ``peak`` (arguments + outputs + temporaries − aliased); ``{}`` where the backend gives none."""
    m = compiled.memory_analysis()
    if m is None:
        return {}
    out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias")}
    return {**out, "peak": out["argument"] + out["output"] + out["temp"] - out["alias"]}


def peak_bytes(compiled) -> int:
    """XLA's estimate of a compiled executable's peak memory: arguments + outputs + temporaries − aliased; -1
    where the backend gives no analysis."""
    return memory(compiled).get("peak", -1)


def run_steps(step, state, frozen, batch, warmup: int, repeats: int):
    """``warmup`` untimed steps, then ``repeats`` timed ones (each waited for).

    Returns ``(state, step times in ms, losses)``; ``losses`` has every step's ``metrics["loss"]`` when present."""
    losses = []

    def one(state):
        state, m = step(state, frozen, batch)
        if "loss" in m:
            losses.append(float(m["loss"]))
        return state

    for _ in range(warmup):
        state = one(state)
    jax.block_until_ready(state)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        state = one(state)
        jax.block_until_ready(state)
        times.append(1e3 * (time.perf_counter() - t0))
    return state, times, losses


def median(times) -> float:
    return float(np.median(times))
