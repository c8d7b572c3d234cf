"""Method name -> rules, and the calibration the data-driven methods need.

Every adapter method puts one transform on the adapted kernels (``config.adapted``, a regex; the MLP's
hidden kernels ``HIDDEN`` by default) and trains the classifier head in full (``HEAD``); every other leaf
(biases, norms, embeddings) stays frozen. ``full`` trains every leaf; ``head`` (a linear probe) trains
only the head. Each method's learning rate is ``config.method_lr[name]``, else ``config.adapt_lr``.

    rules = METHODS["pissa"](config)
    plan = rp.plan(rules, params)
    calib = calibrate("pissa", plan, config, model=model, params=params, batches=batches, loss_fn=loss_fn)
    frozen, trainable = plan.init(key, params, calib)
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import flax.linen as nn
import ml_collections
import reparam as rp

Rules = list[tuple[str, rp.Reparam]]
HIDDEN = r".*hidden_\d+/kernel"
HEAD = r"head/.*"


def adapted(c: ml_collections.ConfigDict) -> str:
    """The regex of the kernels the adapters go on: ``c.adapted``, else the MLP's ``HIDDEN``."""
    return c.get("adapted", HIDDEN)


def learning_rate(c: ml_collections.ConfigDict, name: str) -> float:
    """Method ``name``'s learning rate: ``c.method_lr[name]`` where the config has it, else ``c.adapt_lr``."""
    return float(c.get("method_lr", {}).get(name, c.adapt_lr))


def adapter(c: ml_collections.ConfigDict, t: rp.Reparam) -> Rules:
    """``t`` on the adapted kernels, the head (``c.head``, a regex; ``HEAD`` by default; "" for a model
    without one, e.g. a causal LM) trained in full."""
    head = c.get("head", HEAD)
    return [(adapted(c), t)] + ([(head, rp.full())] if head else [])


METHODS: dict[str, Callable[[ml_collections.ConfigDict], Rules]] = {
    "full": lambda c: [(r".*", rp.full())],
    "head": lambda c: [(HEAD, rp.full())],
    "lora": lambda c: adapter(c, rp.lora(c.rank, c.alpha)),
    "rslora": lambda c: adapter(c, rp.lora(c.rank, c.alpha, rslora=True)),
    "dora": lambda c: adapter(c, rp.dora(c.rank, c.alpha)),
    "lora_xs": lambda c: adapter(c, rp.lora_xs(c.xs_rank)),
    "lora_sb": lambda c: adapter(c, rp.lora_xs(c.xs_rank, basis="gradient", lr=learning_rate(c, "lora_sb"))),
    "dylora": lambda c: adapter(c, rp.dylora(c.rank, c.alpha)),
    "pissa": lambda c: adapter(c, rp.pissa(c.rank, c.alpha)),
    "pissa_rsvd": lambda c: adapter(c, rp.pissa(c.rank, c.alpha, niter=2)),
    "milora": lambda c: adapter(c, rp.milora(c.rank, c.alpha)),
    "svfit": lambda c: adapter(c, rp.svfit(c.rank)),
    "sorsa": lambda c: adapter(c, rp.sorsa(c.rank)),
    "corda": lambda c: adapter(c, rp.corda(c.rank, c.alpha)),
    "eva": lambda c: adapter(c, rp.eva(c.rank, c.alpha)),
    # wavelet / Fourier bases
    "waveft": lambda c: adapter(c, rp.waveft(density=c.density)),
    "wara": lambda c: adapter(c, rp.wara(c.rank, c.alpha)),
    "fourierft": lambda c: adapter(c, rp.fourierft(c.fourier_n, scale=c.fourier_scale)),
    # Kronecker
    "krona": lambda c: adapter(c, rp.krona()),
    "lokr": lambda c: adapter(c, rp.lokr(c.rank, c.alpha)),
    "compacter": lambda c: adapter(c, rp.compacter(n=4, rank=c.rank)),
    "soka": lambda c: adapter(c, rp.soka(energy=None, max_rank=c.rank)),
    # random bases, drawn from a key once and kept as frozen arrays (regenerating them each step -- the
    # default, nothing stored -- costs 0.1-0.3 s of a ~1 s MiniLM step on CPU; PEFT keeps them as buffers too)
    "vera": lambda c: adapter(c, rp.vera(256, store_bases=True)),
    "nola": lambda c: adapter(c, rp.nola(c.rank, num_a=64, num_b=64, store_bases=True)),
    "randlora": lambda c: adapter(c, rp.randlora(32, store_bases=True)),
    # sparse masks
    "sparse": lambda c: adapter(c, rp.sparse.random(density=c.density)),
    "sara": lambda c: adapter(c, rp.sparse.magnitude(density=c.density)),
    "spt": lambda c: adapter(c, rp.sparse.sensitivity(density=c.density)),
    "s2ft": lambda c: adapter(c, rp.sparse.structured(density=c.density, axis="out")),
    "sltrain": lambda c: adapter(c, rp.add(rp.lora(c.rank // 2, c.alpha / 2), rp.sparse.random(density=c.density / 2))),
}

# Post-processing of captured statistics, per method (EVA redistributes ranks across layers).
ALLOCATE: dict[str, Callable[[dict, ml_collections.ConfigDict], dict]] = {
    "eva": lambda calib, c: rp.eva_allocate(calib, c.rank),
}


def names(methods: Union[str, Sequence[str]]) -> list[str]:
    """``"lora,pissa"`` (or a list) -> ``["lora", "pissa"]``, each checked against :data:`METHODS`; ``"all"``: all."""
    if methods == "all":
        return list(METHODS)
    out = [m.strip() for m in (methods.split(",") if isinstance(methods, str) else methods) if m.strip()]
    unknown = [m for m in out if m not in METHODS]
    if unknown or not out:
        raise rp.ReparamError(f"unknown methods {unknown} in {methods!r}; choose from {', '.join(METHODS)}.")
    twice = sorted({m for m in out if out.count(m) > 1})
    if twice:
        raise rp.ReparamError(f"methods {twice} listed twice in {methods!r} (a method's phase runs once); drop the "
                         "repeats.")
    return out


def calibrate(name: str, plan: rp.Plan, config: ml_collections.ConfigDict, *, model: nn.Module, params,
              batches: Sequence, loss_fn: Callable, inputs: Callable = lambda b: b[0]) -> Optional[dict]:
    """Calibration statistics for ``plan`` from ``batches`` of the target task, or ``None``.

    ``"cov"`` transforms (CorDA, EVA) get the layer-input covariance from
    :func:`rp.capture_inputs` (run on ``inputs(batch)``: ``x`` of an ``(x, y)`` batch by default; a tuple is
    the model's positional arguments); ``"grad"`` ones (LoRA-SB, SPT) the full fine-tuning
    gradient of ``loss_fn(params, batch)`` from :func:`rp.capture_grads`.
    ``params`` is the plain params dict (the plan's paths), not ``{"params": ...}``.
    """
    kinds = plan.calibrated()
    calib: dict = {}
    cov = [p for p, k in kinds.items() if k == "cov"]
    grad = [p for p, k in kinds.items() if k == "grad"]
    if cov:
        calib.update(rp.capture_inputs(model, {"params": params}, [inputs(b) for b in batches], paths=cov,
                                       progress=False))
    if grad:
        calib.update(rp.capture_grads(loss_fn, params, batches, paths=grad, progress=False))
    if not calib:
        return None
    return ALLOCATE[name](calib, config) if name in ALLOCATE else calib
