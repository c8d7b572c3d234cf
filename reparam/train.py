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

The hot path (``matmul="auto"``, the default): Dense/DenseGeneral layers whose
kernel's transform declares a ΔW structure run through
:func:`reparam.matmul.structured_matmul` -- a custom VJP whose backward gives
the trainable gradient from the layer's input and output cotangent without
forming ``dW = xᵀg`` -- and LayerNorm/RMSNorm outputs get a cotangent barrier
(:mod:`reparam.matmul`). Same values and gradients as plain autodiff (float
rounding); ``matmul="autodiff"`` turns both off, ``"factored"`` /
``"materialised"`` force the forward. ``plan.summary()`` shows the choice.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from reparam import matmul as mm
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


def make_train_step(plan: Plan, loss_fn: Callable, optimizer: optax.GradientTransformation, *,
                    donate: bool = True, jit: bool = True, remat: bool = False,
                    matmul: str = "auto") -> Callable:
    """``step(state, frozen, batch) -> (state, metrics)``.

    ``loss_fn(params, batch, rng) -> loss`` or ``(loss, metrics)``, where
    ``params`` is ``plan.apply(frozen, trainable, rng)``; the plan's penalty
    (SORSA) is added to the loss. ``metrics`` gains ``loss`` (without penalty)
    and ``penalty``. ``remat`` recomputes the forward pass in the backward
    (``jax.checkpoint`` around the loss) instead of storing activations: less
    peak memory for about one more forward per step. ``matmul``: ``"auto"``,
    ``"factored"``, ``"materialised"`` or ``"autodiff"`` (see the module docstring).
    """
    modes = {"auto": None, "factored": True, "materialised": False, "autodiff": None}
    if matmul not in modes:
        raise ReparamError(f"make_train_step: matmul must be one of {sorted(modes)}, got {matmul!r}.")

    def step(state: TrainState, frozen: PyTree, batch: Any):
        rng, k_apply, k_loss = jax.random.split(state.rng, 3)

        def forward(trainable):
            if matmul == "autodiff":
                return loss_fn(plan.apply(frozen, trainable, rng=k_apply), batch, k_loss)
            params, hot = plan.routed(frozen, trainable, rng=k_apply)
            with mm.intercept(hot, one=mm.runtime_one(state.step), mode=modes[matmul], record=plan.routing):
                return loss_fn(params, batch, k_loss)

        def objective(trainable):
            loss, metrics = _split_loss(forward(trainable))
            pen = plan.penalty(frozen, trainable)
            return loss + pen, {**metrics, "loss": loss, "penalty": pen}

        grads, metrics = jax.grad(jax.checkpoint(objective) if remat else objective,
                                  has_aux=True)(state.trainable)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        return TrainState(state.step + 1, trainable, opt_state, rng), metrics

    if not jit:
        return step
    return jax.jit(step, donate_argnums=(0,) if donate else ())


def make_eval_step(plan: Plan, metrics_fn: Callable, *, jit: bool = True) -> Callable:
    """``evaluate(trainable, frozen, batch) -> metrics_fn(plan.apply(frozen, trainable), batch)`` (eval mode)."""
    def evaluate(trainable, frozen, batch):
        return metrics_fn(plan.apply(frozen, trainable), batch)
    return jax.jit(evaluate) if jit else evaluate
