"""Training: a TrainState pytree and jitted steps that differentiate w.r.t. the trainable arrays only.

    state = rp.train.init_state(trainable, optimizer, rng)
    step = rp.train.make_train_step(plan, loss_fn, optimizer)
    state, metrics = step(state, frozen, batch)

``frozen`` is an argument of the jitted step (never a closed-over constant, so
XLA does not fold the base into the executable and a new base does not
recompile); the state's buffers are donated. Optimizer state exists only for
the trainable arrays. A bf16 base with f32 adapters works as is: each
transform returns the weight in the base's dtype and the gradient flows back
to the f32 trainables.

The hot path (``matmul="auto"``, the default): every contraction in the loss that
consumes a weight whose transform declares a ΔW structure -- however the model is
written: per-layer or scanned, linen or NNX, Dense or einsum, under remat or nested
jit (:mod:`reparam.route`) -- runs :func:`reparam.matmul.structured_matmul`, a
custom VJP whose backward gives the trainable gradient from the layer's input and
output cotangent without forming ``dW = xᵀg``; linen LayerNorm/RMSNorm outputs get
a cotangent barrier (:mod:`reparam.matmul`). Same values and gradients as plain
autodiff (float rounding); ``matmul="autodiff"`` turns both off, ``"factored"`` /
``"materialised"`` force the forward. ``step.routing`` records each use, and
``plan.summary(routing=step.routing)`` shows it.

On CPU, call :func:`use_huge_pages` at the start of a script: XLA:CPU
allocates a step's temporaries afresh at each call and glibc maps them anew,
so every step faults them in again, 4 KiB at a time (a fifth of a MiniLM
step's CPU time here); on 2 MiB pages that cost nearly vanishes.
"""
from __future__ import annotations

import os
import platform
import sys
import warnings
from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from reparam import matmul as mm, route
from reparam.core import ReparamError
from reparam.plan import Plan

PyTree = Any


class TrainState(NamedTuple):
    step: jax.Array
    trainable: PyTree
    opt_state: PyTree
    rng: jax.Array


def init_state(trainable: PyTree, optimizer: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    """A fresh state: step 0, the optimizer's state for ``trainable`` only."""
    return TrainState(jnp.zeros((), jnp.int32), trainable, optimizer.init(trainable), rng)


def _split_loss(out):
    return out if isinstance(out, tuple) else (out, {})


class TrainStep:
    """A jitted train step with its :class:`reparam.route.Routing` (``step.routing``, filled when it is traced);
    every other attribute (``lower``, ``trace``, ...) is the jitted function's."""

    def __init__(self, fn: Callable, routing: route.Routing):
        self._fn, self.routing = fn, routing

    def __call__(self, *args, **kwargs):
        return self._fn(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._fn, name)


def routed_loss(plan: Plan, loss_fn: Callable, frozen: PyTree, trainable: PyTree, batch: Any, k_apply, k_loss, *,
                one=None, mode: Optional[bool] = None, routing: Optional[route.Routing] = None,
                scan_remat: Optional[Callable] = None):
    """``loss_fn(plan.apply(frozen, trainable, k_apply), batch, k_loss)`` with every contraction that consumes an
    adapted weight with a ΔW structure run by the structured op (:mod:`reparam.route`), and a cotangent barrier
    after each linen LayerNorm/RMSNorm when ``one`` is given (:func:`reparam.matmul.norm_barriers`), and the body
    of every scan an adapted weight enters under the checkpoint policy ``scan_remat`` (None: as written)."""
    routing = route.Routing() if routing is None else routing
    structures = plan.structures(frozen, trainable, rng=k_apply)
    skip = {i for i, s in enumerate(structures) if s is not None}
    values = plan.leaf_values(frozen, trainable, rng=k_apply, skip=skip)
    weights = {}
    for i, (leaf, s) in enumerate(zip(plan.leaves, structures)):
        if s is not None:
            base, st = s
            v = leaf.view
            values[i] = jax.ShapeDtypeStruct(leaf.shape, base.dtype)
            weights[i] = route.Weight(base, st, path=leaf.path, view=(v.batch, v.inp, v.out), shape=leaf.shape,
                                      groups=tuple((a,) for a in range(len(leaf.shape))), dtype=base.dtype)
    params = plan.treedef.unflatten(values)
    with mm.norm_barriers(one):
        return route.routed_call(loss_fn, weights, (params, batch, k_loss), mode=mode, record=routing,
                                 scan_remat=scan_remat)


# The scan-body policy of routed steps: keep the projections' outputs, recompute the rest in the backward. The
# adapters' gradients need each layer's input x, which a scan would otherwise stack for every layer; on
# XLA:CPU stacking those buffers costs more than recomputing (benchmarks/decoder_forms.py, README).
SCAN_REMAT = jax.checkpoint_policies.dots_with_no_batch_dims_saveable


def make_train_step(plan: Plan, loss_fn: Callable, optimizer: optax.GradientTransformation, *,
                    donate: bool = True, jit: bool = True, remat: bool = False,
                    matmul: str = "auto", scan_remat: Optional[Callable] = SCAN_REMAT) -> Callable:
    """``step(state, frozen, batch) -> (state, metrics)``, with ``step.routing`` (:class:`reparam.route.Routing`).

    ``loss_fn(params, batch, rng) -> loss`` or ``(loss, metrics)``, where
    ``params`` is ``plan.apply(frozen, trainable, rng)``; the plan's penalty
    (SORSA) is added to the loss. ``metrics`` gains ``loss`` (without penalty)
    and ``penalty``. ``remat`` recomputes the forward pass in the backward
    (``jax.checkpoint`` around the loss) instead of storing activations: less
    peak memory for about one more forward per step. ``matmul``: ``"auto"``,
    ``"factored"``, ``"materialised"`` or ``"autodiff"`` (see the module docstring);
    with ``"auto"`` a warning names the structured weights whose uses fell back to autodiff.

    ``scan_remat`` (routed steps): the ``jax.checkpoint`` policy put around the body of every scan over layers
    that an adapted weight enters, so the backward recomputes what the policy does not save instead of
    reading it from buffers the scan stacks for every layer (:data:`SCAN_REMAT`, the default, saves the
    outputs of non-batched dots: the projections); ``None`` leaves the body as the model wrote it. It is
    recorded with each use in ``step.routing``.
    """
    modes = {"auto": None, "factored": True, "materialised": False, "autodiff": None}
    if matmul not in modes:
        raise ReparamError(f"make_train_step: matmul must be one of {sorted(modes)}, got {matmul!r}.")
    routing = route.Routing()
    warned = []

    def step(state: TrainState, frozen: PyTree, batch: Any):
        routing.uses.clear()        # (at trace time) the record describes the program traced last
        rng, k_apply, k_loss = jax.random.split(state.rng, 3)

        def forward(trainable):
            if matmul == "autodiff":
                return loss_fn(plan.apply(frozen, trainable, rng=k_apply), batch, k_loss)
            return routed_loss(plan, loss_fn, frozen, trainable, batch, k_apply, k_loss,
                               one=mm.runtime_one(state.step), mode=modes[matmul], routing=routing,
                               scan_remat=scan_remat)

        def objective(trainable):
            loss, metrics = _split_loss(forward(trainable))
            pen = plan.penalty(frozen, trainable)
            return loss + pen, {**metrics, "loss": loss, "penalty": pen}

        grads, metrics = jax.grad(jax.checkpoint(objective) if remat else objective,
                                  has_aux=True)(state.trainable)
        fallbacks = routing.fallbacks()
        if matmul == "auto" and fallbacks and not warned:
            warned.append(True)
            warnings.warn("reparam: uses of structured weights fell back to plain autodiff (they form the full "
                          "weight gradient xᵀg): " + "; ".join(f"{p}: {', '.join(sorted(set(r)))}"
                                                              for p, r in sorted(fallbacks.items()))
                          + ". See plan.summary(routing=step.routing).", stacklevel=2)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        return TrainState(state.step + 1, trainable, opt_state, rng), metrics

    step.routing = routing
    if not jit:
        return step
    return TrainStep(jax.jit(step, donate_argnums=(0,) if donate else ()), routing)


def make_eval_step(plan: Plan, metrics_fn: Callable, *, jit: bool = True) -> Callable:
    """``evaluate(trainable, frozen, batch) -> metrics_fn(plan.apply(frozen, trainable), batch)`` (eval mode)."""
    def evaluate(trainable, frozen, batch):
        return metrics_fn(plan.apply(frozen, trainable), batch)
    return jax.jit(evaluate) if jit else evaluate


HUGE_PAGES = "glibc.malloc.hugetlb=1"    # glibc >= 2.35: malloc madvises its mmap'd blocks MADV_HUGEPAGE


def huge_pages_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (default ``os.environ``) with :data:`HUGE_PAGES` added to ``GLIBC_TUNABLES`` (for a subprocess)."""
    env = dict(os.environ if env is None else env)
    tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":")
                if t and not t.startswith("glibc.malloc.hugetlb=")]
    env["GLIBC_TUNABLES"] = ":".join(tunables + [HUGE_PAGES])
    return env


def use_huge_pages() -> bool:
    """Runs this process with glibc's malloc on transparent huge pages: re-executes it once, if need be.

    Every call of a compiled XLA:CPU step allocates its temporaries afresh. glibc serves blocks over 32 MB
    with ``mmap`` and unmaps them on ``free``, so each step faults them in again, 4 KiB at a time. With
    ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` glibc asks for 2 MiB pages on those blocks: far fewer faults,
    the same peak memory (memory is still given back on ``free``; figures in
    ``benchmarks/results/library_notes.md``). glibc reads the setting only at start-up, hence the re-execution (``os.execve`` of
    ``sys.orig_argv`` with :func:`huge_pages_env`): call this first in a script, before any real work.

    Returns ``True`` when the process runs with the setting, ``False`` where it does not apply and nothing
    was done: not Linux with glibc, transparent huge pages ``never`` in
    ``/sys/kernel/mm/transparent_hugepage/enabled``, or an interactive interpreter or notebook kernel (it
    warns: start Jupyter with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` in the environment instead).
    """
    if HUGE_PAGES in os.environ.get("GLIBC_TUNABLES", "").split(":"):
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            if "[never]" in f.read():
                return False
    except OSError:
        return False
    argv = getattr(sys, "orig_argv", [])
    if sys.flags.interactive or "ipykernel" in sys.modules or len(argv) < 2 or argv[1] in ("-c", "-"):
        warnings.warn(f"use_huge_pages: cannot re-execute an interactive session or notebook kernel; start it "
                      f"with GLIBC_TUNABLES={HUGE_PAGES} in the environment instead.", stacklevel=2)
        return False
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, huge_pages_env())
