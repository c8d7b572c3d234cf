"""The methods under test: one factory per method, its exact trainable-count formula, its calibration.

Each family may add ``tests/methods_<family>.py`` defining ``METHODS`` (same form as below) and
optionally ``CALIB`` (``{kind: maker(key, w) -> value}`` for the calibration kinds its transforms
declare); they are merged here, so the laws of ``test_laws.py`` run over every method.
"""
from __future__ import annotations

import importlib
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

import reparam as rp

# name -> (factory(rank), trainable count formula (d_in, d_out, r), tolerance of the init no-op
#          [, valid(d_in, d_out, r) -> bool: the shapes the method accepts, when not all])
METHODS = {
    "lora": (lambda r: rp.lora(r, alpha=2 * r), lambda i, o, r: r * (i + o), 0.0),
    "rslora": (lambda r: rp.lora(r, alpha=2 * r, rslora=True), lambda i, o, r: r * (i + o), 0.0),
    "lora_gauss": (lambda r: rp.lora(r, init="gaussian"), lambda i, o, r: r * (i + o), 0.0),
    "dora": (lambda r: rp.dora(r, alpha=2 * r), lambda i, o, r: r * (i + o) + o, 1e-5),
    "dora_grad_norm": (lambda r: rp.dora(r, detach_norm=False), lambda i, o, r: r * (i + o) + o, 1e-5),
    "lora_xs": (lambda r: rp.lora_xs(r), lambda i, o, r: r * r, 0.0),
    "lora_sb": (lambda r: rp.lora_xs(r, basis="gradient"), lambda i, o, r: r * r, 1e-5),
    "dylora": (lambda r: rp.dylora(r), lambda i, o, r: r * (i + o), 0.0),
    "pissa": (lambda r: rp.pissa(r, alpha=2 * r), lambda i, o, r: r * (i + o), 1e-5),
    "pissa_rsvd": (lambda r: rp.pissa(r, niter=2), lambda i, o, r: r * (i + o), 1e-5),
    "milora": (lambda r: rp.milora(r), lambda i, o, r: r * (i + o), 1e-5),
    "svfit": (lambda r: rp.svfit(r), lambda i, o, r: r, 1e-5),
    "sorsa": (lambda r: rp.sorsa(r), lambda i, o, r: r * (i + o) + r, 1e-5),
    "corda_ipm": (lambda r: rp.corda(r), lambda i, o, r: r * (i + o), 1e-5),
    "corda_kpm": (lambda r: rp.corda(r, mode="kpm"), lambda i, o, r: r * (i + o), 1e-5),
    "eva": (lambda r: rp.eva(r), lambda i, o, r: r * (i + o), 0.0),
    "lora+pissa": (lambda r: rp.add(rp.lora(r), rp.pissa(r)), lambda i, o, r: 2 * r * (i + o), 1e-5),
    "full": (lambda r: rp.full(), lambda i, o, r: i * o, 0.0),
}


def rng(key) -> np.random.Generator:
    """A numpy generator seeded by ``key`` (an int or a JAX key): test data of a new shape without a compile
    (``jax.random.normal`` compiles one XLA program per shape, most of a hypothesis example's time)."""
    return np.random.default_rng(key if isinstance(key, (int, np.integer)) else
                                 np.asarray(jax.random.key_data(key)).ravel().tolist())


def normal(key, shape, scale=1.0) -> np.ndarray:
    """``scale ×`` a standard-normal float32 array drawn by numpy from ``key`` (see :func:`rng`)."""
    return (scale * rng(key).standard_normal(shape)).astype(np.float32)


def _cov(key, w):
    d_in = w.shape[0]
    x = normal(key, (4 * d_in + 8, d_in)) * np.linspace(0.2, 2.0, d_in, dtype=np.float32)
    return jnp.asarray(x.T @ x / x.shape[0])


CALIB = {"cov": _cov, "grad": lambda key, w: jnp.asarray(normal(key, w.shape))}

for _f in sorted(pathlib.Path(__file__).parent.glob("methods_*.py")):
    _m = importlib.import_module(f"tests.{_f.stem}")
    METHODS.update(_m.METHODS)
    CALIB.update(getattr(_m, "CALIB", {}))


def valid(name: str, d_in: int, d_out: int, rank: int) -> bool:
    """Whether method ``name`` accepts a ``d_in x d_out`` weight at ``rank`` (the optional 4th entry)."""
    entry = METHODS[name]
    return len(entry) < 4 or bool(entry[3](d_in, d_out, rank))


def calib_for(t: rp.Reparam, path: str, w, key) -> dict | None:
    """Synthetic calibration stats for a data-driven transform on the weight ``w`` at ``path``."""
    if not t.calib:
        return None
    kinds = t.calib.split(",")
    return {path: {k: CALIB[k](jax.random.fold_in(key, i), w) for i, k in enumerate(kinds)}}


def perturb(tree, key, scale=0.1):
    """Random nonzero values for every float array of ``tree`` (keeps structure, dtype): each array plus
    ``scale ×`` standard-normal noise, drawn by numpy (see :func:`normal`)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    g = rng(key)
    return treedef.unflatten([jnp.asarray((np.asarray(x, np.float64) + scale * g.standard_normal(np.shape(x)))
                                          .astype(x.dtype)) for x in leaves])


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-12))
