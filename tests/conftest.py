"""Session settings for the whole suite: XLA's CPU backend at LLVM -O1, and the slow tests scheduled first.

Compiling dominates this suite's time (most tests jit small programs once, and every eager op with a new
shape is a compile). At XLA's default LLVM -O2 some tiny programs compile slowly -- ``jax.random.normal``
of a 3-D shape 1.1 s against 0.33 s at -O1 on the 2-core CI machine -- so the tests, and the processes they
start (the experiment CLIs, notebook kernels), run with ``--xla_backend_optimization_level=1`` unless
``XLA_FLAGS`` already sets a level. It changes only the machine code LLVM generates, not the HLO (what the
HLO checks read); float results may differ in rounding from -O2, which every tolerance here covers. The
README's commands run at XLA's default. It must be set before JAX creates its CPU client, which is why it
lives here (pytest imports this file before any test module).

``pytest -n 2`` hands tests to workers in collection order, so an end-to-end test collected last (its
file's name) would run alone at the end while the other worker idles. ``slow`` tests go first instead.
"""
import os

_OPT_LEVEL = "--xla_backend_optimization_level"
if _OPT_LEVEL not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), f"{_OPT_LEVEL}=1"]))


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` first, in collection order; the others after them, in collection order."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
