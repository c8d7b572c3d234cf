"""Multi-device checks of reparam.sharding, run by tests/test_sharding.py in subprocesses.

JAX fixes its device count when it is imported, and the pytest process has already imported it, so
these checks run as scripts with ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` in their
environment. Each prints one JSON object as its last stdout line.

    python tests/sharding_check.py curves              # N=8: every family, sharded vs one-device training
    python tests/sharding_check.py hlo                 # N=8: all-gathers in the compiled LoRA step
    python tests/sharding_check.py single              # N=1: the 2-process run's reference
    python tests/sharding_check.py decoder             # N=8: the nn.scan decoder, sharded vs one device
    python tests/sharding_check.py decoder_nf4         # N=8: the same on an nf4 base
    python tests/sharding_check.py worker PID PORT     # N=4: one of 2 processes joined by jax.distributed

The model is a tiny attention block (DenseGeneral q/k/v [16, 4, 8], out [4, 8, 16]) and an MLP
([16, 32], [32, 16]); in ``RULES`` one method of every family adapts one of its kernels and the head is
trained in full. 3 tokens per example keep activations from having a kernel's shape (the HLO check
sees only shapes).
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn   # noqa: E402
import jax                # noqa: E402
import jax.numpy as jnp   # noqa: E402
import numpy as np        # noqa: E402
import optax              # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P   # noqa: E402

import reparam as rp      # noqa: E402
from reparam import sharding as sh   # noqa: E402
from reparam.plan import path_str     # noqa: E402
from tests import hlo as H            # noqa: E402

BATCH, SEQ, STEPS = 16, 3, 20
MESHES = ("data:8", "data:4,model:2", "data:2,model:4")
RULES = [
    (r"query/kernel", rp.lora(4, alpha=8)),                     # low-rank
    (r"key/kernel", rp.vera(8)),                                # random basis
    (r"value/kernel", rp.waveft(k=24)),                         # bases (wavelet)
    (r"out/kernel", rp.pissa(4)),                               # SVD-principal
    (r"mlp_in/kernel", rp.lokr(4)),                             # Kronecker
    (r"mlp_out/kernel", rp.sparse.random(k=64)),                # sparse mask
    (r"head/.*", rp.full()),
]
LORA_RULES = [(r"(query|key|value|out|mlp_in|mlp_out)/kernel", rp.lora(4)), (r"head/.*", rp.full())]


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):                                      # [B, S, 16]
        q = nn.DenseGeneral((4, 8), name="query")(x)            # kernel [16, 4, 8]
        k = nn.DenseGeneral((4, 8), name="key")(x)
        v = nn.DenseGeneral((4, 8), name="value")(x)
        a = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(8.0), axis=-1)
        x = x + nn.DenseGeneral(16, axis=(-2, -1), name="out")(jnp.einsum("bhqk,bkhd->bqhd", a, v))  # [4, 8, 16]
        x = x + nn.Dense(16, name="mlp_out")(nn.relu(nn.Dense(32, name="mlp_in")(x)))
        return nn.Dense(8, name="head")(x.mean(axis=1))


MODEL = Block()


def loss_fn(params, batch, rng):
    logits = MODEL.apply({"params": params}, batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def setup(rules=RULES):
    """params, plan, frozen, trainable, optimizer and the STEPS global batches, the same in every process.
    (Params and batches come from numpy and plan.init is jitted: compiles dominate these checks' time.)"""
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(MODEL.init, jax.random.key(0), jnp.ones((1, SEQ, 16)))["params"]
    params = jax.tree_util.tree_map(lambda s: (0.3 * rng.normal(size=s.shape)).astype(np.float32), shapes)
    plan = rp.plan(rules, params)
    frozen, trainable = jax.jit(plan.init)(jax.random.key(1), params)
    batches = [{"x": rng.normal(size=(BATCH, SEQ, 16)).astype(np.float32),
                "y": rng.integers(0, 8, size=(BATCH,)).astype(np.int32)} for _ in range(STEPS)]
    return params, plan, frozen, trainable, optax.adam(3e-3), batches


def flat(tree) -> dict:
    """``{path: value}`` of a pytree (arrays as nested lists, PartitionSpecs as strings)."""
    is_spec = lambda s: isinstance(s, P)
    return {path_str(p): str(x) if is_spec(x) else np.asarray(x).tolist()
            for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_spec)[0]}


def one_device(setup_out):
    """Loss curve and final trainable of the plain (unsharded) train step on one device."""
    _, plan, frozen, trainable, opt, batches = setup_out
    step = rp.train.make_train_step(plan, loss_fn, opt)
    state = rp.train.init_state(jax.tree_util.tree_map(jnp.copy, trainable), opt, jax.random.key(2))  # donated
    losses = []
    for b in batches:
        state, m = step(state, frozen, b)
        losses.append(float(m["loss"]))
    return losses, flat(state.trainable)


def sharded(plan, frozen, trainable, opt, mesh, batch0, **kw):
    """(step compiled for ``mesh``, placed state, placed frozen, specs)."""
    specs = sh.specs(plan, mesh, frozen, trainable, optimizer=opt)
    fr = sh.put(frozen, specs.frozen, mesh)
    state = sh.put(rp.train.init_state(trainable, opt, jax.random.key(2)), specs.state, mesh)
    step = sh.make_train_step(plan, kw.pop("loss", loss_fn), opt, mesh, specs, **kw)
    return step.lower(state, fr, sh.shard_batch(batch0, mesh)).compile(), state, fr, specs


def curves():
    """Every family's adapters trained 20 steps on each mesh vs on one device."""
    assert jax.device_count() == 8, jax.devices()
    s = setup()
    _, plan, frozen, trainable, opt, batches = s
    ref_losses, ref_params = one_device(s)
    out = {"one_device": ref_losses, "meshes": {}}
    for spec in MESHES:
        mesh = sh.mesh(spec)
        step, state, fr, specs = sharded(plan, frozen, trainable, opt, mesh, batches[0])
        losses = []
        for b in batches:
            state, m = step(state, fr, sh.shard_batch(b, mesh))
            losses.append(float(m["loss"]))
        got = flat(state.trainable)
        out["meshes"][spec] = {
            "losses": losses,
            "param_err": {k: float(np.max(np.abs(np.asarray(got[k]) - np.asarray(v)), initial=0.0))
                          for k, v in ref_params.items()},
            "base_specs": flat(specs.base), "trainable_specs": flat(specs.trainable),
            "opt_specs": flat(specs.state.opt_state),
            "placed": {k: str(x.sharding.spec) for k, x in zip(flat(state.trainable),
                                                                 jax.tree_util.tree_leaves(state.trainable))},
        }
    return out


def hlo():
    """All-gathers in the compiled LoRA step under model parallelism, and in a variant that forces the
    effective weights to be replicated (which must gather the sharded bases: the check can fail)."""
    assert jax.device_count() == 8, jax.devices()
    _, plan, frozen, trainable, opt, batches = setup(LORA_RULES)
    out = {}
    for spec in ("data:4,model:2", "data:2,model:4"):
        step, *_ = sharded(plan, frozen, trainable, opt, sh.mesh(spec), batches[0])
        text = step.as_text()
        out[spec] = {"gathers": [list(g) for g in H.all_gathers(text)],
                     "gathered_weights": H.gathered_weights(text, plan)}
    mesh = sh.mesh("data:4,model:2")
    everywhere = NamedSharding(mesh, P())
    replicated = lambda p, b, r: loss_fn(jax.lax.with_sharding_constraint(p, everywhere), b, r)
    step, *_ = sharded(plan, frozen, trainable, opt, mesh, batches[0], loss=replicated)
    out["replicated"] = {"gathered_weights": H.gathered_weights(step.as_text(), plan)}
    return out


def decoder(fmt: str = ""):
    """The nn.scan decoder (stacked DenseGeneral / Einsum kernels, views read from the model) with LoRA on
    every projection: 10 steps on data:4,model:2 vs one device, its specs, and the all-gathers of its step.
    ``fmt``: its kernels quantised in that format first (blocks of 8 along the last axis)."""
    assert jax.device_count() == 8, jax.devices()
    from experiments.models import decoder_forms as D
    cfg = D.Config(vocab=64, d=32, layers=2, heads=4, kv_heads=2, ffn=64)
    params, loss, _ = D.make("linen_scan", cfg)
    params = jax.tree_util.tree_map(np.asarray, params)
    if fmt:
        params = rp.quant.quantize(params, fmt, where=r"layers/.*/kernel", block=8, axis=-1)
    batches = [D.batch(cfg, n=8, t=6, seed=i) for i in range(10)]
    plan = rp.plan([(r"layers/.*/kernel", rp.lora(4, alpha=8))], params, model=loss, example=(batches[0], None))
    frozen, trainable = jax.jit(plan.init)(jax.random.key(1), params)
    opt = optax.adam(3e-3)
    step = rp.train.make_train_step(plan, loss, opt)
    state = rp.train.init_state(jax.tree_util.tree_map(jnp.copy, trainable), opt, jax.random.key(2))
    ref = []
    for b in batches:
        state, m = step(state, frozen, b)
        ref.append(float(m["loss"]))
    ref_params = flat(state.trainable)
    mesh = sh.mesh("data:4,model:2")
    compiled, state, fr, specs = sharded(plan, frozen, trainable, opt, mesh, batches[0], loss=loss)
    text = compiled.as_text()
    losses = []
    for b in batches:
        state, m = compiled(state, fr, sh.shard_batch(b, mesh))
        losses.append(float(m["loss"]))
    got = flat(state.trainable)
    return {"one_device": ref, "losses": losses,
            "param_err": {k: float(np.max(np.abs(np.asarray(got[k]) - np.asarray(v)), initial=0.0))
                          for k, v in ref_params.items()},
            "base_specs": flat(specs.base), "trainable_specs": flat(specs.trainable),
            "frozen_specs": flat(specs.frozen),
            "placed": {k: str(x.sharding.spec) for k, x in zip(flat(fr), jax.tree_util.tree_leaves(fr))},
            "gathered_weights": H.gathered_weights(text, plan),
            "gathers": sorted(set(H.all_gathers(text))),
            "quantised_shapes": {k: list(np.shape(x)) for k, x in zip(flat(fr), jax.tree_util.tree_leaves(fr))
                                 if np.asarray(x).dtype in (np.uint8, np.int8)}}


def worker(pid: int, port: int, nproc: int = 2):
    """One of ``nproc`` processes: joins the others, trains on mesh data:4,model:2 over all their devices,
    each process feeding its consecutive slice of every global batch."""
    sh.initialize(f"localhost:{port}", nproc, pid, initialization_timeout=60)
    assert jax.process_count() == nproc and jax.device_count() == 4 * nproc, (jax.process_count(), jax.devices())
    _, plan, frozen, trainable, opt, batches = setup()
    mesh = sh.mesh("data:4,model:2")
    specs = sh.specs(plan, mesh, frozen, trainable, optimizer=opt)
    fr = sh.put(frozen, specs.frozen, mesh)
    state = sh.put(rp.train.init_state(trainable, opt, jax.random.key(2)), specs.state, mesh)
    step = sh.make_train_step(plan, loss_fn, opt, mesh, specs)
    rows = BATCH // nproc
    losses = []
    for b in batches:
        local = jax.tree_util.tree_map(lambda x: x[pid * rows:(pid + 1) * rows], b)
        state, m = step(state, fr, sh.global_batch(local, mesh))
        losses.append(float(m["loss"].addressable_data(0)))
    from jax.experimental import multihost_utils
    params = multihost_utils.process_allgather(state.trainable, tiled=True)
    out = {"pid": pid, "processes": jax.process_count(), "devices": jax.device_count(),
           "local_devices": jax.local_device_count(), "losses": losses, "params": flat(params)}
    jax.distributed.shutdown()
    return out


def single():
    losses, params = one_device(setup())
    return {"losses": losses, "params": params}


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "worker":
        result = worker(int(sys.argv[2]), int(sys.argv[3]))
    else:
        result = {"curves": curves, "hlo": hlo, "single": single, "decoder": decoder,
                  "decoder_nf4": lambda: decoder("nf4")}[mode]()
    print(json.dumps(result))
