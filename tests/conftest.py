"""Session settings for the whole suite: XLA's CPU backend at LLVM -O1, and the slow tests scheduled first.

Compiling dominates this suite's time (most tests jit small programs once, and every eager op with a new
shape is a compile). At XLA's default LLVM -O2 some tiny programs compile slowly -- ``jax.random.normal``
of a 3-D shape 1.1 s against 0.33 s at -O1 on the 2-core CI machine -- so the tests, and the processes they
start (the experiment CLIs, notebook kernels), run with ``--xla_backend_optimization_level=1`` unless
``XLA_FLAGS`` already sets a level. It changes only the machine code LLVM generates, not the HLO (what the
HLO checks read); float results may differ in rounding from -O2, which every tolerance here covers. The
README's commands run at XLA's default. It must be set before JAX creates its CPU client, which is why it
lives here (pytest imports this file before any test module).

Tests compile the same programs more than once: the experiment CLIs run in several subprocesses on one
config (a killed run, its resume, a reference run), and the notebooks' kernels repeat what the end-to-end
runs compile. So the session shares a JAX persistent compilation cache, a fresh directory made by the
controlling process (inherited by the xdist workers and every process they start) and removed at the end:
a run starts cold, as on CI, and never reads an earlier run's executables.

``pytest -n 2`` hands tests to workers in collection order, so an end-to-end test collected last (its
file's name) would run alone at the end while the other worker idles. ``slow`` tests go first instead.
"""
import os
import shutil
import sys
import tempfile

_OPT_LEVEL = "--xla_backend_optimization_level"
if _OPT_LEVEL not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), f"{_OPT_LEVEL}=1"]))


_CACHE = "JAX_COMPILATION_CACHE_DIR"


def pytest_configure(config):
    """In the controlling process: a fresh compilation cache for the session (unless the caller set one)."""
    if hasattr(config, "workerinput") or _CACHE in os.environ:
        return
    config._reparam_cache = os.environ[_CACHE] = tempfile.mkdtemp(prefix="reparam-tests-jax-cache-")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
    if "jax" in sys.modules:                        # a plugin imported JAX before this ran
        import jax
        jax.config.update("jax_compilation_cache_dir", config._reparam_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def pytest_unconfigure(config):
    if getattr(config, "_reparam_cache", None):
        shutil.rmtree(config._reparam_cache, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` first, in collection order; the others after them, in collection order."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
