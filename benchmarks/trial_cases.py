"""The catalogue of benchmarks/trial.py: bad inputs of every class of issue 17, one small function each.

A case gives one bad input. It raises (the trial classifies the message), returns a string saying what was
taken without an error (silent), or returns :class:`Handled` when it checked that the input was dealt with
rightly and no error was needed. ``add(cls, name, fn, *names)``: a clear message contains each of ``names`` (a
tuple among them: any one of its words) -- the parameter path, the argument, the config key or the file.

Only APIs that older checkouts have are called (keyword arguments they lack are dropped, :func:`kw`), so the
same catalogue runs before and after the issue-17 work.
"""
from __future__ import annotations

import functools
import glob
import inspect
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from safetensors.numpy import load_file, save_file

import reparam as rp
from reparam.interop import peft as rpeft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(rp.__file__)))       # the checkout under trial
KEY = jax.random.key(0)


class Case(NamedTuple):
    cls: str
    name: str
    fn: Callable
    names: tuple
    timeout: float = 20.0
    note: str = ""                 # why an outcome that is not clear stays so, where that is known

    @property
    def id(self) -> str:
        return f"{self.cls}/{self.name}"


class Handled(str):
    """What a case returns when the input was dealt with rightly without an error (checked by the case)."""


class Exited(Exception):
    """A command line that exited non-zero: its last line of stderr, and whether it printed a traceback."""
    def __init__(self, message: str, traceback: bool):
        super().__init__(message)
        self.traceback = traceback


CASES: list[Case] = []


def add(cls: str, name: str, fn: Callable, *names, timeout: float = 20.0, note: str = "") -> None:
    CASES.append(Case(cls, name, fn, names, timeout, note))


def selected(only: str = "") -> list[Case]:
    return [c for c in CASES if re.search(only, c.id)] if only else list(CASES)


def kw(fn: Callable, **kwargs) -> dict:
    """The keyword arguments that ``fn`` takes (an older checkout lacks some, e.g. checkpoint.save's ``plan=``)."""
    params = inspect.signature(fn).parameters
    return {k: v for k, v in kwargs.items() if k in params}


def planned(rules, params, calib=None, **plan_kw) -> str:
    """rp.plan, plan.init and plan.apply on ``params``; what was taken when none of them refused."""
    plan = rp.plan(rules, params, **plan_kw)
    frozen, trainable = plan.init(jax.random.key(1), params, calib)
    out = plan.apply(frozen, trainable)
    finite = all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(out) if jnp.issubdtype(x.dtype, jnp.inexact))
    return (f"planned, initialised and applied ({', '.join(plan.adapted()) or 'nothing'} adapted; "
            f"{'finite' if finite else 'NON-FINITE'} weights)")


def call(make: Callable) -> Callable:
    """A case that only calls ``make()``: anything it returns was taken."""
    def case():
        got = make()
        return f"returned {type(got).__name__}"
    return case


# --- rules ------------------------------------------------------------------------------------------------
def _two():
    return {"a": {"kernel": jnp.ones((8, 6))}, "b": {"kernel": jnp.ones((8, 6))}}


for regex in ["(a", "[a-", "a{2,1}", "*kernel", "a/kernel)"]:
    add("rules", f"invalid regex {regex!r}",
        lambda regex=regex: planned([("b/kernel", rp.lora(2)), (regex, rp.lora(2))], _two()), regex, "rule 1")
add("rules", "a rule shadowed by an earlier one",
    lambda: planned([(r".*/kernel", rp.lora(4)), (r"a/kernel", rp.lora(2))], _two()), "rule 1", "shadowed")
add("rules", "the same regex twice",
    lambda: planned([(r"a/kernel", rp.lora(2)), (r"a/kernel", rp.lora(4))], _two()), "rule 1", "shadowed")
add("rules", "a misspelt path", lambda: planned([(r"a/kernal", rp.lora(2))], _two()), "a/kernal")
add("rules", "a path without its prefix",
    lambda: planned([(r"query/kernel", rp.lora(2))], {"enc": {"query": {"kernel": jnp.ones((8, 6))}}}),
    "query/kernel")
add("rules", "a rule that is not a pair", lambda: planned([(r"a/kernel",)], _two()), "rule 0")
add("rules", "a transform given by name", lambda: planned([(r"a/kernel", "lora")], _two()), "rule 0")
add("rules", "a transform that is None", lambda: planned([(r"a/kernel", None)], _two()), "rule 0")
add("rules", "a constructor not called", lambda: planned([(r"a/kernel", rp.lora)], _two()), "rule 0")
add("rules", "rules as a dict", lambda: planned({r"a/kernel": rp.lora(2)}, _two()), "rule 0")
add("rules", "one rule not in a list", lambda: planned((r"a/kernel", rp.lora(2)), _two()), "rule 0")
add("rules", "a bytes regex", lambda: planned([(b"a/kernel", rp.lora(2))], _two()), "rule 0")
add("rules", "a regex with a trailing space", lambda: planned([("a/kernel ", rp.lora(2))], _two()), "a/kernel ")


# --- hyperparameters: at construction, or at the latest when planned and initialised on an 8x6 weight ---------
def hp(make: Callable, shape=(8, 6), calib=None) -> str:
    params = {"w": {"kernel": jax.random.normal(KEY, shape)}}
    return planned([("w/kernel", make())], params, calib and {"w/kernel": calib})


COV = {"cov": jnp.eye(8)}
RANK = ("r=", "rank")
for v in [0, -1, True, 2.5, "8", None]:
    add("hyperparameters", f"lora(r={v!r})", functools.partial(hp, lambda v=v: rp.lora(v)), RANK)
for v in [-1.0, 0, math.nan, math.inf, True, "16"]:
    add("hyperparameters", f"lora(4, alpha={v!r})", functools.partial(hp, lambda v=v: rp.lora(4, alpha=v)), "alpha")
for name, make, calib in [
        ("dora(0)", lambda: rp.dora(0), None), ("pissa(-2)", lambda: rp.pissa(-2), None),
        ("milora(0)", lambda: rp.milora(0), None), ("svfit(0)", lambda: rp.svfit(0), None),
        ("sorsa(0)", lambda: rp.sorsa(0), None), ("corda(0)", lambda: rp.corda(0), COV),
        ("eva(0)", lambda: rp.eva(0), COV), ("dylora(0)", lambda: rp.dylora(0), None),
        ("lora_xs(0)", lambda: rp.lora_xs(0), None), ("vera(0)", lambda: rp.vera(0), None),
        ("nola(0)", lambda: rp.nola(0, num_a=4, num_b=4), None), ("randlora(0)", lambda: rp.randlora(0), None),
        ("lokr(0)", lambda: rp.lokr(0), None), ("wara(0)", lambda: rp.wara(0), None),
        ("compacter(4, rank=0)", lambda: rp.compacter(2, 0), None)]:
    add("hyperparameters", name, functools.partial(hp, make, calib=calib), RANK)
for name, make, word in [
        ("compacter(n=0)", lambda: rp.compacter(0), ("n=", "n must")), ("fourierft(0)", lambda: rp.fourierft(0), "n="),
        ("fourierft(True)", lambda: rp.fourierft(True), "n="), ("waveft(k=True)", lambda: rp.waveft(k=True), "k="),
        ("waveft(k=0)", lambda: rp.waveft(k=0), "k="),
        ("sparse.random(density=0.0)", lambda: rp.sparse.random(density=0.0), "density"),
        ("sparse.random(density=1.5)", lambda: rp.sparse.random(density=1.5), "density"),
        ("sparse.random(density=nan)", lambda: rp.sparse.random(density=math.nan), "density"),
        ("sparse.random(k=0)", lambda: rp.sparse.random(k=0), "k="),
        ("sparse.random(k=-5)", lambda: rp.sparse.random(k=-5), "k="),
        ("sparse.random(k=100) on 48 entries", lambda: rp.sparse.random(k=100), "100"),
        ("sparse.random() without k or density", lambda: rp.sparse.random(), "density"),
        ("sparse.magnitude(density=2.0)", lambda: rp.sparse.magnitude(density=2.0), "density"),
        ("nola(2, num_a=0)", lambda: rp.nola(2, num_a=0, num_b=4), "num_a"),
        ("pissa(2, niter=-1)", lambda: rp.pissa(2, niter=-1), "niter"),
        ("sorsa(2, gamma=-1.0)", lambda: rp.sorsa(2, gamma=-1.0), "gamma"),
        ("sorsa(2, gamma=nan)", lambda: rp.sorsa(2, gamma=math.nan), "gamma"),
        ("vera(2, d_init=nan)", lambda: rp.vera(2, d_init=math.nan), "d_init"),
        ("fourierft(10, scale=nan)", lambda: rp.fourierft(10, scale=math.nan), "scale"),
        ("krona(scale=nan)", lambda: rp.krona(scale=math.nan), "scale"),
        ("soka(energy=1.5)", lambda: rp.soka(energy=1.5, a_shape=(2, 2)), "energy"),
        ("soka(energy=0.0)", lambda: rp.soka(energy=0.0, a_shape=(2, 2)), "energy"),
        ("waveft(wavelet='db99')", lambda: rp.waveft(k=4, wavelet="db99"), "db99"),
        ("waveft(levels=0)", lambda: rp.waveft(k=4, levels=0), "levels"),
        ("corda(2, mode='bogus')", lambda: rp.corda(2, mode="bogus"), "mode"),
        ("lora(2, init='bogus')", lambda: rp.lora(2, init="bogus"), "init"),
        ("lokr(2, factor=0)", lambda: rp.lokr(2, factor=0), "factor"),
        ("randlora(2, scaling='bogus')", lambda: rp.randlora(2, scaling="bogus"), "scaling"),
        ("lora(2, rslora='no')", lambda: rp.lora(2, rslora="no"), "rslora"),
        ("dora(2, rslora=1)", lambda: rp.dora(2, rslora=1), "rslora"),
        ("lokr(2, alpha=-1.0)", lambda: rp.lokr(2, alpha=-1.0), "alpha"),
        ("krona(a_shape=(3, 3)) on 8x6", lambda: rp.krona(a_shape=(3, 3)), "w/kernel"),
        ("sparse.structured(rows=[100]) on 8 rows", lambda: rp.sparse.structured(rows=[100]), "w/kernel"),
        ("sparse.structured(rows=[1, 1])", lambda: rp.sparse.structured(rows=[1, 1]), "rows"),
        ("lora(7) on a 8x6 weight", lambda: rp.lora(7), "w/kernel"),
        ("on_axes(out_axes=(4,)) on a 2-D weight", lambda: rp.on_axes(rp.lora(2), in_axes=(0,), out_axes=(4,)),
         "out_axes"),
        ("on_axes(in_axes=(0,), out_axes=(0,))", lambda: rp.on_axes(rp.lora(2), in_axes=(0,), out_axes=(0,)),
         "w/kernel")]:
    add("hyperparameters", name, functools.partial(hp, make, calib=COV if "corda" in name else None), word)


def _on_axes_3d(**axes) -> str:
    return planned([("w", rp.on_axes(rp.lora(2), **axes))], {"w": jnp.ones((4, 5, 6))})


add("hyperparameters", "on_axes(out_axes=(4, 5)) on a 3-D kernel",
    lambda: _on_axes_3d(in_axes=(0,), out_axes=(4, 5)), "out_axes")
add("hyperparameters", "on_axes(in_axes=(3,)) on a 3-D kernel", lambda: _on_axes_3d(in_axes=(3,), out_axes=(1, 2)),
    "in_axes")
add("hyperparameters", "on_axes(batch_axes=(-4,)) on a 3-D kernel",
    lambda: _on_axes_3d(batch_axes=(-4,), in_axes=(1,), out_axes=(2,)), "batch_axes")
for dtype in ["int32", "bool", "no-such-dtype"]:
    add("hyperparameters", f"trainable_dtype={dtype}",
        lambda dtype=dtype: planned([("w/kernel", rp.lora(2))], {"w": {"kernel": jnp.ones((8, 6))}},
                                    trainable_dtype=dtype), "trainable_dtype")
add("hyperparameters", "eva_allocate(rank=0)", call(lambda: rp.eva_allocate({"w/kernel": COV}, 0)), "rank")
add("hyperparameters", "eva_allocate(rho=0.5)", call(lambda: rp.eva_allocate({"w/kernel": COV}, 2, rho=0.5)), "rho")


# --- leaves --------------------------------------------------------------------------------------------------
def leaf(make: Callable, value, **plan_kw) -> str:
    """``make()`` on the leaf ``x/w`` beside a float kernel; after init, one SGD step on a loss of the weight."""
    params = {"x": {"w": value}, "q": {"kernel": jnp.ones((8, 6))}}
    plan = rp.plan([("x/w", make())], params, **plan_kw)
    frozen, trainable = plan.init(jax.random.key(1), params)
    w0 = plan.apply(frozen, trainable)["x"]["w"]
    grads = jax.grad(lambda tr: jnp.sum(jnp.asarray(plan.apply(frozen, tr)["x"]["w"], jnp.float32) ** 2))(trainable)
    trained = jax.tree.map(lambda t, g: t - 0.1 * g, trainable, grads)
    w1 = plan.apply(frozen, trained)["x"]["w"]
    moved = bool(jnp.any(jnp.asarray(w1, jnp.float32) != jnp.asarray(w0, jnp.float32)))
    return f"taken: a {jnp.asarray(w0).dtype} weight that {'changes' if moved else 'never changes'} with training"


for name, make, value in [
        ("lora on an int32 kernel", lambda: rp.lora(2), jnp.ones((4, 4), jnp.int32)),
        ("lora on a bool leaf", lambda: rp.lora(2), jnp.ones((4, 4), bool)),
        ("full() on an int32 leaf", rp.full, jnp.ones((4, 4), jnp.int32)),
        ("full() on a bool leaf", rp.full, jnp.ones((4, 4), bool)),
        ("pissa on a bool leaf", lambda: rp.pissa(2), jnp.ones((4, 4), bool)),
        ("sparse.random on an int32 leaf", lambda: rp.sparse.random(k=3), jnp.ones((4, 4), jnp.int32)),
        ("vera on a bool leaf", lambda: rp.vera(2), jnp.ones((4, 4), bool)),
        ("dora on an int8 kernel", lambda: rp.dora(2), jnp.ones((4, 4), jnp.int8)),
        ("lora on a uint8 kernel", lambda: rp.lora(2), jnp.ones((4, 4), jnp.uint8)),
        ("lora on a 1-D bias", lambda: rp.lora(2), jnp.ones((4,))),
        ("lora on a scalar", lambda: rp.lora(2), jnp.ones(())),
        ("lora on an undeclared 3-D kernel", lambda: rp.lora(2), jnp.ones((4, 5, 6))),
        ("lora on a zero-size kernel", lambda: rp.lora(2), jnp.ones((0, 6))),
        ("lora on a Python float", lambda: rp.lora(2), 1.0)]:
    add("leaves", name, functools.partial(leaf, make, value), "x/w")
add("leaves", "stacked= on a kernel without a layer axis",
    lambda: leaf(lambda: rp.lora(2), jnp.ones((4, 4)), stacked=r"x/.*"), "x/w")


# --- non-finite data -----------------------------------------------------------------------------------------
def weights(bad=None, stacked=False):
    w = np.array(jax.random.normal(KEY, (3, 8, 6) if stacked else (8, 6)))
    if bad is not None:
        w[(1, 1, 2) if stacked else (1, 2)] = bad
    return {"layer": {"kernel": jnp.asarray(w)}, "head": {"kernel": jnp.ones((6, 2))}}


def _bad(shape, value=np.nan, n=1):
    a = np.ones(shape, np.float32)
    a.reshape(-1)[:n] = value
    return jnp.asarray(a)


for t_name, make, calib in [
        ("pissa", lambda: rp.pissa(2), None), ("pissa(niter=2)", lambda: rp.pissa(2, niter=2), None),
        ("milora", lambda: rp.milora(2), None), ("svfit", lambda: rp.svfit(2), None),
        ("sorsa", lambda: rp.sorsa(2), None), ("corda", lambda: rp.corda(2), COV), ("eva", lambda: rp.eva(2), COV),
        ("lora_xs", lambda: rp.lora_xs(2), None), ("soka", lambda: rp.soka(energy=0.9, a_shape=(2, 2)), None),
        ("lora", lambda: rp.lora(2), None), ("sparse.magnitude", lambda: rp.sparse.magnitude(k=3), None)]:
    for bad in (np.inf, -np.inf, np.nan):
        add("non-finite", f"{t_name}: {bad} in W0",
            lambda make=make, calib=calib, bad=bad: planned([("layer/kernel", make())], weights(bad),
                                                            calib and {"layer/kernel": calib}), "layer/kernel")
add("non-finite", "pissa: inf in a stacked layer",
    lambda: planned([("layer/kernel", rp.pissa(2))], weights(np.inf, stacked=True), stacked=r"layer/.*"),
    "layer/kernel")
for t_name, make, calib in [
        ("corda: NaN covariance", lambda: rp.corda(2), {"cov": _bad((8, 8))}),
        ("corda kpm: inf covariance", lambda: rp.corda(2, mode="kpm"), {"cov": _bad((8, 8), np.inf)}),
        ("eva: NaN covariance", lambda: rp.eva(2), {"cov": _bad((8, 8))}),
        ("sensitivity: an all-NaN gradient", lambda: rp.sparse.sensitivity(k=3), {"grad": _bad((8, 6), n=48)}),
        ("lt_sft: inf in the diff", lambda: rp.sparse.lt_sft(k=3), {"diff": _bad((8, 6), np.inf)}),
        ("lora_sb: NaN gradient", lambda: rp.lora_xs(2, basis="gradient"), {"grad": _bad((8, 6))})]:
    add("non-finite", t_name, lambda make=make, calib=calib: planned([("layer/kernel", make())], weights(),
                                                                     {"layer/kernel": calib}), "layer/kernel")


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2, name="head")(nn.Dense(6, name="layer")(x))


def _block():
    x = jnp.ones((4, 8))
    return _Block(), _Block().init(KEY, x)["params"], x


def _nan_batch():
    m, params, x = _block()
    got = rp.capture_inputs(m, {"params": params}, [x, _bad((4, 8))], progress=False)
    return f"covariances returned, finite: {[bool(jnp.isfinite(v['cov']).all()) for v in got.values()]}"


def _inf_upstream():
    m, params, x = _block()
    params["layer"]["bias"] = _bad((6,), np.inf)
    got = rp.capture_inputs(m, {"params": params}, [x], progress=False)
    return f"covariances returned, finite: {[bool(jnp.isfinite(v['cov']).all()) for v in got.values()]}"


def _nan_grad():
    _, params, _ = _block()
    loss = lambda p, b: jnp.sum(jnp.sqrt(p["layer"]["kernel"] * b))      # sqrt of negatives: NaN gradient
    got = rp.capture_grads(loss, params, [jnp.full((8, 6), -1.0)], paths=["layer/kernel"], progress=False)
    return f"gradients returned, finite: {[bool(jnp.isfinite(v['grad']).all()) for v in got.values()]}"


add("non-finite", "capture_inputs: a NaN batch", _nan_batch, "batch 1")
add("non-finite", "capture_inputs: inf upstream of a layer", _inf_upstream, "head/kernel")
add("non-finite", "capture_grads: a NaN gradient", _nan_grad, "layer/kernel")
add("non-finite", "eva_allocate: a NaN covariance",
    call(lambda: rp.eva_allocate({"layer/kernel": {"cov": _bad((8, 8))}, "head/kernel": COV}, 2)), "layer/kernel")


# --- tree mix-ups --------------------------------------------------------------------------------------------
def _pair(t):
    params = {"a": {"kernel": jax.random.normal(KEY, (8, 6))},
              "b": {"kernel": jax.random.normal(jax.random.key(1), (6, 4)), "bias": jnp.zeros((4,))}}
    plan = rp.plan([(r"a/kernel", t), (r"b/bias", rp.full())], params)
    return (plan, *plan.init(jax.random.key(2), params))


def _loss(p, batch, rng=None):
    return jnp.mean((jnp.tanh(batch @ p["a"]["kernel"]) @ p["b"]["kernel"] + p["b"]["bias"]) ** 2)


def mixup(make, other: Callable, where: str) -> str:
    """The plan of ``make()`` given trainables changed by ``other(trainable)``, at ``where``."""
    plan, frozen, trainable = _pair(make())
    bad, x = other(trainable), jnp.ones((3, 8))
    if where == "apply":
        plan.apply(frozen, bad)
    elif where == "merge":
        plan.merge(frozen, bad)
    elif where == "eval step":
        rp.train.make_eval_step(plan, lambda p, b: {"loss": _loss(p, b)})(bad, frozen, x)
    else:
        opt = optax.sgd(0.1)
        rp.train.make_train_step(plan, _loss, opt)(rp.train.init_state(bad, opt, jax.random.key(0)), frozen, x)
    return f"{where} ran on trainables that do not fit the plan"


def other_plans(make):
    return lambda trainable: _pair(make())[2]


MIXUPS = [("rank-2 plan, rank-4 trainables", lambda: rp.lora(2), other_plans(lambda: rp.lora(4)), "a/kernel"),
          ("lora plan, vera trainables", lambda: rp.lora(2), other_plans(lambda: rp.vera(2)), "a/kernel"),
          ("lora plan, dora trainables", lambda: rp.lora(2), other_plans(lambda: rp.dora(2)), "a/kernel"),
          ("pissa plan, lora(4) trainables", lambda: rp.pissa(2), other_plans(lambda: rp.lora(4)), "a/kernel"),
          ("an extra entry", lambda: rp.lora(2),
           lambda tr: {**tr, "a": {"kernel": {**tr["a"]["kernel"], "C": jnp.zeros((2, 2))}}}, "a/kernel"),
          ("a missing entry", lambda: rp.lora(2), lambda tr: {**tr, "a": {"kernel": {"A": tr["a"]["kernel"]["A"]}}},
           "a/kernel"),
          ("trainables on an unadapted leaf", lambda: rp.lora(2),
           lambda tr: {**tr, "b": {**tr["b"], "kernel": {"w": jnp.zeros((6, 4))}}}, "b/kernel"),
          ("bf16 trainables", lambda: rp.lora(2), lambda tr: jax.tree.map(lambda x: x.astype(jnp.bfloat16), tr),
           "a/kernel")]
for case, make, other, path in MIXUPS:
    for where in ("apply", "train step"):
        add("tree mix-ups", f"{case} ({where})", functools.partial(mixup, make, other, where), path)
add("tree mix-ups", "rank-2 plan, rank-4 trainables (merge)",
    functools.partial(mixup, lambda: rp.lora(2), other_plans(lambda: rp.lora(4)), "merge"), "a/kernel")
add("tree mix-ups", "rank-2 plan, rank-4 trainables (eval step)",
    functools.partial(mixup, lambda: rp.lora(2), other_plans(lambda: rp.lora(4)), "eval step"), "a/kernel")
add("tree mix-ups", "lora plan, pissa trainables of the same shapes (apply)",
    functools.partial(mixup, lambda: rp.lora(2), other_plans(lambda: rp.pissa(2)), "apply"), "a/kernel",
    note="the trees have the same structure, shapes and dtypes, and the trace-time check sees only those (values "
         "would cost a device read per step); a checkpoint's plan fingerprint tells the two apart on restore "
         "(checkpoints / restored into another plan (pissa))")
add("tree mix-ups", "an extra parameter",
    functools.partial(mixup, lambda: rp.lora(2), lambda tr: {**tr, "c": {"kernel": {"A": jnp.zeros((2, 2))}}},
                      "apply"), "c/kernel")
add("tree mix-ups", "a missing parameter", functools.partial(mixup, lambda: rp.lora(2), lambda tr: {"a": tr["a"]},
                                                             "apply"), "b/bias")
add("tree mix-ups", "an array in place of the entries",
    functools.partial(mixup, lambda: rp.lora(2), lambda tr: {**tr, "a": {"kernel": jnp.zeros((8, 6))}}, "apply"),
    "a/kernel")


def _frozen_mixup(change) -> str:
    plan, frozen, trainable = _pair(rp.lora(2))
    plan.apply(change(frozen), trainable)
    return "apply ran on a frozen tree that does not fit the plan"


add("tree mix-ups", "vera's frozen in a lora plan", lambda: _frozen_mixup(lambda f: _pair(rp.vera(2))[1]), "a/kernel")
add("tree mix-ups", "a transposed base in frozen",
    lambda: _frozen_mixup(lambda f: {**f, "a": {"kernel": {"base": f["a"]["kernel"]["base"].T}}}), "a/kernel")


def support(idx, form="plain") -> str:
    t = rp.sparse.from_support("given", lambda key, w, calib: jnp.asarray(idx))
    shape = (3, 8, 6) if form == "stacked" else (8, 6)
    t = {"plain": t, "in_basis": rp.in_basis(rp.dct_basis(), t), "stacked": rp.on_axes(t, batch_axes=(0,))}[form]
    return planned([("a/kernel", t)], {"a": {"kernel": jnp.ones(shape)}})


for case, idx in [("out of range", [0, 5, 48]), ("negative", [-1, 3]), ("repeated", [3, 7, 3]),
                  ("float", [0.0, 1.5]), ("2-D", [[0, 1], [2, 3]])]:
    add("tree mix-ups", f"a sparse support {case}", functools.partial(support, idx), "a/kernel")
add("tree mix-ups", "a sparse support out of range (in_basis)", functools.partial(support, [0, 48], "in_basis"),
    "a/kernel")
add("tree mix-ups", "a sparse support out of range (stacked)", functools.partial(support, [0, 48], "stacked"),
    "a/kernel")


# --- PEFT load -----------------------------------------------------------------------------------------------
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
KEY_A = "base_model.model.enc.l0.lora_A.weight"


def _adapter(directory: str):
    params = {"params": {"enc": {"l0": {"kernel": jax.random.normal(KEY, (6, 5))}}}}
    plan = rp.plan([(r".*/kernel", rp.lora(2, alpha=4))], params)
    frozen, trainable = plan.init(jax.random.key(1), params)
    trainable = jax.tree.map(lambda x: x + 0.1, trainable)
    rpeft.export(plan, frozen, trainable, directory)
    return plan, frozen, trainable


def peft(damage: Callable) -> str:
    """An exported LoRA adapter, ``damage(directory)``, then load."""
    with tempfile.TemporaryDirectory() as d:
        plan, frozen, _ = _adapter(d)
        damage(d)
        got = rpeft.load(plan, frozen, d)
        return f"loaded ({', '.join(sorted({str(x.dtype) for x in jax.tree.leaves(got)}))} trainables)"


def edit_config(d: str, **changes) -> None:
    path = os.path.join(d, CONFIG)
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(path, "w") as f:
        json.dump({k: v for k, v in cfg.items() if v is not ...}, f)


def write(name: str, data: bytes) -> Callable:
    def damage(d):
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)
    return damage


def edit_tensors(change: Callable) -> Callable:
    def damage(d):
        path = os.path.join(d, WEIGHTS)
        tensors = load_file(path)
        change(tensors)
        save_file(tensors, path)
    return damage


def bytes_of(change: Callable) -> Callable:
    def damage(d):
        path = os.path.join(d, WEIGHTS)
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(change(data))
    return damage


for changes, word in [
        ({"lora_alpha": ...}, "lora_alpha"), ({"lora_alpha": ..., "lora_alpah": 4}, "lora_alpha"),
        ({"r": ...}, "'r'"), ({"r": 0}, "r=0"), ({"r": -3}, "r=-3"), ({"r": True}, "r=True"), ({"r": "8"}, "r='8'"),
        ({"lora_alpha": -4}, "lora_alpha=-4"), ({"lora_alpha": 0}, "lora_alpha=0"),
        ({"lora_alpha": math.nan}, "lora_alpha=nan"), ({"lora_alpha": math.inf}, "lora_alpha=inf"),
        ({"alpha_pattern": {"enc.l0": -2}}, "alpha_pattern"), ({"rank_pattern": {"enc.l0": 0}}, "rank_pattern"),
        ({"use_rslora": "yes"}, "use_rslora"), ({"fan_in_fan_out": True}, "fan_in_fan_out"),
        ({"peft_type": ...}, "peft_type"), ({"peft_type": "IA3"}, "peft_type"),
        ({"r": 4}, ("r=4", "rank"))]:
    name = ", ".join(f"{k}={'<absent>' if v is ... else repr(v)}" for k, v in changes.items())
    add("PEFT load", f"config {name}", functools.partial(peft, lambda d, c=changes: edit_config(d, **c)), CONFIG,
        word)
for name, data in [("truncated", b"{not json"), ("empty", b""), ("binary", b"\xff\xfe\x00garbage"),
                   ("a list", b"[1, 2]"), ("a string", b'"LORA"')]:
    add("PEFT load", f"config file {name}", functools.partial(peft, write(CONFIG, data)), CONFIG)
for name, damage, word in [
        ("truncated", bytes_of(lambda b: b[:-7]), WEIGHTS), ("zeros", bytes_of(lambda b: b"\x00" * 64), WEIGHTS),
        ("a broken header", bytes_of(lambda b: b[:8] + b"}}}}" + b[12:]), WEIGHTS),
        ("an int32 tensor", edit_tensors(lambda t: t.update({KEY_A: (t[KEY_A] * 100).astype(np.int32)})), KEY_A),
        ("a NaN tensor", edit_tensors(lambda t: t.update({KEY_A: np.full_like(t[KEY_A], np.nan)})), KEY_A),
        ("a tensor missing", edit_tensors(lambda t: t.pop(KEY_A.replace("lora_A", "lora_B"))), "lora_B"),
        ("a tensor transposed", edit_tensors(lambda t: t.update({KEY_A: np.ascontiguousarray(t[KEY_A].T)})), KEY_A),
        ("a tensor for a module the plan lacks",
         edit_tensors(lambda t: t.update({KEY_A.replace("l0", "l9"): t[KEY_A]})), "enc.l9")]:
    add("PEFT load", f"weights file: {name}", functools.partial(peft, damage), word)
add("PEFT load", "weights file missing", functools.partial(peft, lambda d: os.remove(os.path.join(d, WEIGHTS))),
    WEIGHTS)
add("PEFT load", "config file missing", functools.partial(peft, lambda d: os.remove(os.path.join(d, CONFIG))),
    CONFIG)


# --- runner configs --------------------------------------------------------------------------------------------
RUN_TINY = {"methods": "lora", "hidden": (16, 16), "pretrain_steps": 5, "adapt_steps": 5, "batch_size": 32,
            "checkpoint_every": 0, "eval_every": 5, "calib_batches": 1, "progress": False}
COMPOSE_TINY = {"hidden": (16, 16), "pretrain_steps": 5, "full_steps": 5, "sparse_steps": 5, "batch_size": 32,
                "eval_every": 5, "timing_warmup": 1, "progress": False}


def cli(module: str, config_file: str, tiny: dict, *flags) -> str:
    """``python -m module --config=config_file`` with ``tiny`` and ``flags``; a non-zero exit raises Exited."""
    with tempfile.TemporaryDirectory() as d:
        args = [f"--config.{k}={v}" for k, v in {**tiny, "output_dir": os.path.join(d, "out")}.items()]
        proc = subprocess.run([sys.executable, "-m", module, f"--config={config_file}", *args, *flags], cwd=ROOT,
                              capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=200)
    if proc.returncode == 0:
        return f"exit code 0 with {' '.join(flags)}"
    last = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1:] or [""]
    raise Exited(f"exit code {proc.returncode}: {last[0]}", "Traceback (most recent call last)" in proc.stderr)


def in_process(module: str, tiny: dict, **overrides) -> str:
    """``module.run(config)`` on its config file's ``get_config()`` with ``tiny`` and ``overrides``."""
    import importlib
    run = importlib.import_module(f"experiments.{module}").run
    config = importlib.import_module(f"experiments.configs.{'digits' if module == 'run' else module}").get_config()
    with tempfile.TemporaryDirectory() as d:
        for k, v in {**tiny, "output_dir": os.path.join(d, "out"), **overrides}.items():
            config[k] = v
        results = run(config)
        kept = sorted(os.listdir(os.path.join(d, "out", "checkpoints", "lora"))) \
            if os.path.isdir(os.path.join(d, "out", "checkpoints", "lora")) else None
    accs = {k: round(v["acc"], 3) for k, v in results.get("methods", {}).items()}
    return f"ran to the end (accuracy {accs or 'n/a'}" + (f"; checkpoints kept: {kept}" if kept is not None else "") + ")"


for key, value, word in [
        ("adapt_stpes", 3, "adapt_stpes"), ("foo", 1, "foo"), ("checkpoint_evry", 5, "checkpoint_evry")]:
    add("runner configs", f"run: unknown key --config.{key}",
        functools.partial(cli, "experiments.run", "experiments/configs/digits.py", RUN_TINY, f"--config.{key}={value}"),
        word, timeout=240)
add("runner configs", "run: a diverging run (pretrain_lr=1e30), exit code",
    functools.partial(cli, "experiments.run", "experiments/configs/digits.py", RUN_TINY, "--config.pretrain_lr=1e30"),
    "learning rate", timeout=240)
add("runner configs", "run: an unknown method (--config.methods=lroa), exit code",
    functools.partial(cli, "experiments.run", "experiments/configs/digits.py", RUN_TINY, "--config.methods=lroa"),
    "lroa", timeout=240)
add("runner configs", "compose: a diverging run (pretrain_lr=1e30), exit code",
    functools.partial(cli, "experiments.compose", "experiments/configs/compose.py", COMPOSE_TINY,
                      "--config.pretrain_lr=1e30"), "learning rate", timeout=240)
add("runner configs", "compose: unknown key --config.sparse_stpes",
    functools.partial(cli, "experiments.compose", "experiments/configs/compose.py", COMPOSE_TINY,
                      "--config.sparse_stpes=3"), "sparse_stpes", timeout=240)
for overrides, word in [
        ({"adapt_steps": 0}, "adapt_steps"), ({"pretrain_steps": -3}, "pretrain_steps"),
        ({"batch_size": 0}, "batch_size"), ({"eval_every": 0}, "eval_every"),
        ({"keep_checkpoints": 0, "checkpoint_every": 5}, "keep_checkpoints"),
        ({"checkpoint_every": -1}, "checkpoint_every"), ({"adapt_lr": 0.0}, "adapt_lr"),
        ({"pretrain_lr": math.nan}, "pretrain_lr"), ({"weight_decay": -1e-4}, "weight_decay"),
        ({"test_fraction": 1.0}, "test_fraction"), ({"calib_batches": 0, "methods": "corda"}, "calib_batches"),
        ({"timing_warmup": -1}, "timing_warmup"), ({"rank": 0}, ("rank", "r=0")), ({"alpha": -16.0}, "alpha"),
        ({"methods": "sparse", "density": 2.0}, "density"), ({"methods": "lroa"}, "lroa"),
        ({"resume": True, "checkpoint_every": 0}, "resume"), ({"base_dtype": "int8"}, "base_dtype"),
        ({"adapt_lr": 1e30}, "learning rate"), ({"methods": ""}, "methods"), ({"methods": "lora,lora"}, "lora"),
        ({"hidden": (0,)}, "hidden")]:
    name = ", ".join(f"{k}={v!r}" for k, v in overrides.items())
    add("runner configs", f"run: {name}", functools.partial(in_process, "run", RUN_TINY, **overrides), word,
        timeout=240)
for overrides, word in [
        ({"full_steps": 0}, "full_steps"), ({"sparse_lr": 0.0}, "sparse_lr"), ({"replay": 1.0}, "replay"),
        ({"density": 0.0}, "density"), ({"task_b": (4, 9)}, "task_b"), ({"l1": -1.0}, "l1")]:
    name = ", ".join(f"{k}={v!r}" for k, v in overrides.items())
    add("runner configs", f"compose: {name}", functools.partial(in_process, "compose", COMPOSE_TINY, **overrides),
        word, timeout=240)


# --- checkpoints -------------------------------------------------------------------------------------------------
RUN_CONFIG = {"lr": 0.01, "method": "lora", "rank": 2}


def _state(t, opt=None):
    params = {"l1": {"kernel": jax.random.normal(KEY, (8, 6))},
              "l2": {"kernel": jax.random.normal(jax.random.key(1), (6, 3)), "bias": jnp.zeros((3,))}}
    plan = rp.plan([(r"l1/kernel", t), (r"l2/.*", rp.full())], params)
    return plan, rp.train.init_state(plan.init(jax.random.key(2), params)[1], opt or optax.adam(1e-2),
                                     jax.random.key(4))


def checkpoint(damage: Callable = lambda d: None, now=None, config=None, opt=None, step=None) -> str:
    """A LoRA state saved (with its plan where the checkout can), ``damage(directory)``, then restored into the
    state of ``now`` (another transform) or under ``config``."""
    plan, state = _state(rp.lora(2, alpha=4))
    with tempfile.TemporaryDirectory() as d:
        directory = os.path.join(d, "ck")
        mgr = rp.checkpoint.manager(directory)
        rp.checkpoint.save(mgr, state, RUN_CONFIG, **kw(rp.checkpoint.save, plan=plan))
        mgr.close()
        damage(directory)
        plan_now, like = _state(now or rp.lora(2, alpha=4), opt)
        got = rp.checkpoint.restore(rp.checkpoint.manager(directory), like=like, config=config or RUN_CONFIG,
                                    step=step, **kw(rp.checkpoint.restore, plan=plan_now))
        if got is None:
            return "restore found no checkpoint"
        same = all(bool(jnp.all(a == b)) for a, b in zip(jax.tree.leaves(got.trainable), jax.tree.leaves(like.trainable))
                   if a.shape == b.shape)
        return f"restored step {int(got.step)} ({'the saved values' if same else 'other values'})"


def damage_file(pattern: str, how: str) -> Callable:
    def damage(directory):
        paths = sorted(glob.glob(os.path.join(directory, "0", pattern)))
        if not paths:
            raise FileNotFoundError(f"trial: no {pattern} in the checkpoint")
        with open(paths[0], "rb") as f:
            data = f.read()
        with open(paths[0], "wb") as f:
            f.write(data[:len(data) // 2] if how == "truncated" else bytes(b ^ 0x5A for b in data))
    return damage


for pattern in ("config/metadata", "state/_METADATA", "state/array_metadatas/process_0", "state/d/*",
                "state/manifest.ocdbt"):
    for how in ("truncated", "garbage"):
        add("checkpoints", f"{pattern} {how}", functools.partial(checkpoint, damage_file(pattern, how)), "damaged",
            pattern.split("/")[0])
for name, now in [("pissa", lambda: rp.pissa(2)), ("alpha 8", lambda: rp.lora(2, alpha=8)),
                  ("rank 4", lambda: rp.lora(4, alpha=4)), ("rslora", lambda: rp.lora(2, alpha=4, rslora=True))]:
    add("checkpoints", f"restored into another plan ({name}), same config",
        lambda now=now: checkpoint(now=now()), "l1/kernel")
add("checkpoints", "restore of a step that was never saved", functools.partial(checkpoint, step=5), "5")
add("checkpoints", "restored under another config", functools.partial(checkpoint, config={**RUN_CONFIG, "lr": 0.1}),
    "lr")
add("checkpoints", "restored into another optimizer's state", functools.partial(checkpoint, opt=optax.sgd(0.1, 0.9)),
    "opt_state")


def _empty_step(directory):
    os.makedirs(os.path.join(directory, "7"))


def _empty_step_case():
    got = checkpoint(_empty_step)
    return Handled("an empty step directory skipped: " + got) if got.startswith("restored step 0 (the saved") \
        else got


add("checkpoints", "an empty later step directory", _empty_step_case, "7")


# --- files -----------------------------------------------------------------------------------------------------
def export_through_symlink(name: str):
    with tempfile.TemporaryDirectory() as d:
        directory = os.path.join(d, "adapter")
        plan, frozen, trainable = _adapter(directory)
        outside = os.path.join(d, "outside.txt")
        with open(outside, "w") as f:
            f.write("not yours")
        os.remove(os.path.join(directory, name))
        os.symlink(outside, os.path.join(directory, name))
        rpeft.export(plan, frozen, trainable, directory)
        with open(outside) as f:
            intact = f.read() == "not yours"
        if intact and not os.path.islink(os.path.join(directory, name)):
            return Handled("the symlink was replaced by the file; its target left alone")
        return "wrote through the symlink into a file outside the directory" if not intact else "kept the symlink"


def load_through_symlink(name: str):
    def damage(d):
        outside = d + f"_elsewhere_{name}"
        os.replace(os.path.join(d, name), outside)
        os.symlink(outside, os.path.join(d, name))
    return peft(damage)


def restore_through_symlink(pattern: str):
    def damage(directory):
        path = os.path.join(directory, "0", pattern)
        outside = directory + "_elsewhere_" + pattern.replace("/", "_")
        os.replace(path, outside)
        os.symlink(outside, path)
    return checkpoint(damage)


def export_fails_midway():
    with tempfile.TemporaryDirectory() as d:
        plan, frozen, trainable = _adapter(d)
        with open(os.path.join(d, CONFIG), "rb") as f:
            before = f.read()
        dump = rpeft.json.dump

        def fail(obj, fh, **kwargs):
            fh.write('{"peft_type": "LO')
            raise OSError("disk full")
        rpeft.json.dump = fail
        try:
            rpeft.export(plan, frozen, jax.tree.map(jnp.zeros_like, trainable), d)
        except OSError:
            pass
        finally:
            rpeft.json.dump = dump
        with open(os.path.join(d, CONFIG), "rb") as f:
            intact = f.read() == before
        left = sorted(set(os.listdir(d)) - {CONFIG, WEIGHTS, "reparam_plan.json"})
        if intact and not left:
            return Handled("the previous adapter_config.json is whole, no temporary file left")
        return ("the previous adapter_config.json was half overwritten" if not intact else "") + \
            (f"; left behind {left}" if left else "")


def export_onto_a_file():
    with tempfile.TemporaryDirectory() as d:
        target = os.path.join(d, "adapter_here")
        open(target, "w").close()
        _adapter(target)
        return "exported onto a file"


def load_missing_directory():
    with tempfile.TemporaryDirectory() as d:
        plan, frozen, _ = _adapter(os.path.join(d, "adapter"))
        rpeft.load(plan, frozen, os.path.join(d, "missing_adapter"))
        return "loaded from a directory that does not exist"


add("files", "export through a symlinked adapter_config.json", functools.partial(export_through_symlink, CONFIG))
add("files", "export through a symlinked safetensors file", functools.partial(export_through_symlink, WEIGHTS))
add("files", "load a config symlinked from outside", functools.partial(load_through_symlink, CONFIG), "symlink", CONFIG)
add("files", "load weights symlinked from outside", functools.partial(load_through_symlink, WEIGHTS), "symlink",
    WEIGHTS)
add("files", "restore a config symlinked from outside", functools.partial(restore_through_symlink, "config/metadata"),
    "symlink", "metadata")
add("files", "restore a state directory symlinked from outside",
    functools.partial(restore_through_symlink, "state"), "symlink", "state")
add("files", "export that fails midway", export_fails_midway)
add("files", "export onto a path that is a file", export_onto_a_file, "adapter_here")
add("files", "load from a directory that does not exist", load_missing_directory, "missing_adapter")


# --- in_basis keeps the inner transform's penalty --------------------------------------------------------------
def penalty_kept(make, shape=(8, 8), **plan_kw):
    params = {"w": jax.random.normal(KEY, shape)}
    plan = rp.plan([("w", make())], params, **plan_kw)
    frozen, trainable = plan.init(jax.random.key(1), params)
    moved = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(2), x.shape, x.dtype), trainable)
    p = float(plan.penalty(frozen, moved))
    return Handled(f"penalty {p:.3g} after a step away from init") if p > 0 else \
        "trains without the regulariser: the penalty is 0 away from init"


add("in_basis penalty", "in_basis(dct_basis(), sorsa(4))",
    functools.partial(penalty_kept, lambda: rp.in_basis(rp.dct_basis(), rp.sorsa(4))))
add("in_basis penalty", "in_basis(wavelet_basis(), sorsa(2))",
    functools.partial(penalty_kept, lambda: rp.in_basis(rp.wavelet_basis(), rp.sorsa(2))))
add("in_basis penalty", "in_basis(dct_basis(), sorsa(2)) on stacked layers",
    functools.partial(penalty_kept, lambda: rp.on_axes(rp.in_basis(rp.dct_basis(), rp.sorsa(2)), batch_axes=(0,)),
                      shape=(3, 8, 8)))
add("in_basis penalty", "add(sorsa(2), sparse.random(k=4))",
    functools.partial(penalty_kept, lambda: rp.add(rp.sorsa(2), rp.sparse.random(k=4))))
