"""Calibration statistics for data-driven inits (CorDA, EVA, LoRA-SB), taken through explicit helpers.

Nothing hides a data loader: you pass the batches. The result maps a
parameter path to a dict of statistics, and goes to ``plan.init(key, params,
calib=...)``:

    calib = rp.capture_inputs(model, {"params": params}, batches, paths=list(plan.calibrated()))
    # {"encoder/layer_0/query/kernel": {"cov": XᵀX/N [d_in, d_in], "n": N}, ...}
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from reparam.core import ReparamError, check_finite
from reparam.plan import path_str


def capture_inputs(model: nn.Module, variables, batches: Iterable, *, paths: Optional[Sequence[str]] = None,
                   prefix: str = "", method: str = "__call__", progress: bool = True, **apply_kwargs) -> dict:
    """Second moment ``C = XᵀX / N`` of the input of every kernel-bearing linen module.

    Runs ``model.apply(variables, batch, **apply_kwargs)`` on each batch under
    ``nn.intercept_methods`` and accumulates, for each module with a ``kernel``
    parameter (Dense, DenseGeneral, Conv), the input flattened to
    ``[N, d_in]`` (all leading axes are tokens; DenseGeneral/Conv inputs are
    flattened to the matrix view's ``d_in``). Keys are
    ``prefix + module path + "/kernel"``; with ``paths`` (typically
    ``plan.calibrated()``), only those are kept and each must be found. ``batches`` yields model inputs (a tuple is splatted).
    """
    sums: dict[str, Any] = {}
    counts: dict[str, int] = {}
    wanted = set(paths) if paths is not None else None
    seen: set[str] = set()

    def record(next_fun, args, kwargs, ctx):
        mod = ctx.module
        if ctx.method_name == "__call__" and mod.has_variable("params", "kernel") and args:
            key = prefix + "/".join(mod.path) + "/kernel"
            seen.add(key)
            if wanted is None or key in wanted:
                kernel = mod.get_variable("params", "kernel")
                n_out = 1 if isinstance(mod, nn.Conv) else np.size(getattr(mod, "features", 1))
                d_in = int(np.prod(kernel.shape[:-n_out]))
                x = jnp.asarray(args[0], jnp.float32)
                if isinstance(mod, nn.Conv):
                    x = _patches(x, kernel.shape, mod)
                x = x.reshape(-1, d_in)
                sums[key] = sums.get(key, 0.0) + x.T @ x
                counts[key] = counts.get(key, 0) + x.shape[0]
        return next_fun(*args, **kwargs)

    first = None
    for i, batch in enumerate(tqdm(batches, desc="calibrating", disable=not progress, leave=False)):
        args = batch if isinstance(batch, tuple) else (batch,)
        shapes = [tuple(np.shape(a)) for a in args]
        first = first or shapes
        for j, a in enumerate(args):
            check_finite(a, f"calibration batch {i}, input {j}", "drop or clean that batch; calibration "
                         "statistics from it would make the init's weights inf/NaN.")
        try:
            with nn.intercept_methods(record):
                model.apply(variables, *args, method=method, **apply_kwargs)
        except Exception as e:
            raise ReparamError(f"calibration batch {i} with input shapes {shapes} does not fit the model "
                               f"(batch 0 had {first}): {type(e).__name__}: {str(e).splitlines()[0]} -- pass "
                               "batches of the model's input shape.") from e
    if not seen:
        raise ReparamError("capture_inputs saw no kernel-bearing module call: pass at least one batch and a "
                           "linen model with Dense/DenseGeneral/Conv layers.")
    if wanted is not None and wanted - set(sums):
        raise ReparamError(f"capture_inputs found no module input for {sorted(wanted - set(sums))[:5]}; "
                           f"kernel paths look like {sorted(seen)[:3]} (set prefix= to match the plan's paths).")
    for k in sums:
        check_finite(sums[k], f"capture_inputs: the input covariance of '{k}'", "the model makes inf/NaN "
                     "upstream of this layer on these batches (check the params and the batches' values).")
    return {k: {"cov": sums[k] / counts[k], "n": counts[k]} for k in sums}


def _patches(x, kshape, mod):
    """Conv input -> patches ``[..., kh*kw*c_in]`` so that conv == patches @ kernel.reshape(-1, c_out)."""
    nsp = len(kshape) - 2
    strides = mod.strides or 1
    strides = (strides,) * nsp if isinstance(strides, int) else tuple(strides)
    if not isinstance(mod.padding, str) or mod.padding.upper() not in ("SAME", "VALID") or (
            mod.kernel_dilation not in (None, 1) or mod.input_dilation not in (None, 1)):
        raise ReparamError(f"capture_inputs supports Conv with padding 'SAME'/'VALID' and no dilation; "
                           f"'{'/'.join(mod.path)}' has padding={mod.padding!r}.")
    sp = "HWD"[:nsp]
    p = jax.lax.conv_general_dilated_patches(x, filter_shape=kshape[:-2], window_strides=strides,
                                             padding=mod.padding.upper(),
                                             dimension_numbers=("N" + sp + "C", sp + "IO", "N" + sp + "C"))
    # patches come out channel-major, [c_in, *window]; the kernel is [*window, c_in]
    c_in, win = kshape[-2], int(np.prod(kshape[:-2]))
    p = p.reshape(p.shape[:-1] + (c_in, win))
    return jnp.swapaxes(p, -1, -2).reshape(p.shape[:-2] + (win * c_in,))


def capture_grads(loss_fn: Callable, params, batches: Iterable, *, paths: Sequence[str],
                  progress: bool = True) -> dict:
    """Mean full fine-tuning gradient ``∇W loss`` over ``batches`` for each path (LoRA-SB's init).

    ``loss_fn(params, batch) -> scalar``. Returns ``{path: {"grad": g}}`` for the
    given ``paths`` (typically ``plan.calibrated()``); each must be a leaf of ``params``.
    """
    grad_fn = jax.jit(jax.grad(loss_fn))
    total, n = None, 0
    for batch in tqdm(batches, desc="gradients", disable=not progress, leave=False):
        g = grad_fn(params, batch)
        total = g if total is None else jax.tree_util.tree_map(jnp.add, total, g)
        n += 1
    if total is None:
        raise ReparamError("capture_grads got no batch; pass at least one calibration batch.")
    flat = {path_str(p): v / n for p, v in jax.tree_util.tree_flatten_with_path(total)[0]}
    missing = [p for p in paths if p not in flat]
    if missing:
        raise ReparamError(f"capture_grads: {missing[:5]} are not parameter paths; paths look like "
                           f"{list(flat)[:3]}.")
    for p in paths:
        check_finite(flat[p], f"capture_grads: the mean gradient of '{p}'", "some calibration batch gives a "
                     "non-finite loss or gradient; check loss_fn on each batch (a log of 0? an overflow?).")
    return {p: {"grad": flat[p]} for p in paths}
