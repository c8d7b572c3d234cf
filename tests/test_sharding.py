"""reparam.sharding: meshes, partition rules, adapter specs derived from the base, the sharded train step.

Spec logic is checked here on abstract meshes (no devices needed). Training on meshes of 8 host devices,
the compiled step's all-gathers and two processes joined by jax.distributed run in subprocesses
(tests/sharding_check.py): the device count is fixed when JAX is imported, which this process has done.
"""
import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

import reparam as rp
from reparam import sharding as sh
from tests import hlo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECK = os.path.join(ROOT, "tests", "sharding_check.py")
TIMEOUT = 300   # seconds; a hung collective fails the test instead of blocking CI
TOL = 1e-5


def _abstract(**axes):
    return AbstractMesh(tuple(axes.values()), tuple(axes))


def _shapes(tree):
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a, jnp.float32), tree,
                                  is_leaf=lambda x: isinstance(x, tuple))


PARAMS = _shapes({"query": {"kernel": (16, 4, 8), "bias": (4, 8)}, "out": {"kernel": (4, 8, 16)},
                  "mlp": {"kernel": (16, 32), "bias": (32,)}, "head": {"kernel": (32, 8)}})


# --- meshes ------------------------------------------------------------------------------------------------
def test_mesh_from_string():
    n = len(jax.devices())
    m = sh.mesh(f"data:{n}")
    assert m.axis_names == ("data",) and m.shape["data"] == n
    m = sh.mesh("data:-1, model:1")
    assert dict(m.shape) == {"data": n, "model": 1}
    assert sh.data_axes(m) == ("data",) and sh.data_spec(m) == P(("data",))
    assert sh.data_spec(sh.mesh("model:-1")) == P(None)


@pytest.mark.parametrize("spec, message", [
    ("data:4;model:2", r"item 'data:4;model:2' is not 'name:size'"),
    ("tensor:2", r"unknown axis 'tensor'; axes are data, fsdp, model"),
    ("data:2,data:4", r"axis 'data' appears twice"),
    ("data:-1,model:-1", r"at most one size may be -1"),
    ("data:0", r"axis 'data' has size 0"),
    ("", r"names no axis"),
])
def test_mesh_errors(spec, message):
    with pytest.raises(rp.ReparamError, match=message):
        sh.mesh(spec)


def test_mesh_size_must_match_devices():
    n = len(jax.devices())
    with pytest.raises(rp.ReparamError, match=rf"axis sizes multiply to {2 * n + 2} but there are {n} devices"):
        sh.mesh(f"data:{n + 1},model:2")
    with pytest.raises(rp.ReparamError, match=rf"fixed sizes multiply to {n + 1}, which does not divide the {n}"):
        sh.mesh(f"data:-1,model:{n + 1}")


# --- partition rules -----------------------------------------------------------------------------------------
def test_default_rules():
    specs = sh.param_specs(PARAMS, _abstract(data=2, model=4))
    assert specs["query"]["kernel"] == P(None, "model", None)       # heads over model; fsdp not in the mesh
    assert specs["out"]["kernel"] == P("model", None, None)         # row parallel
    assert specs["mlp"]["kernel"] == P(None, "model")               # column parallel
    assert specs["query"]["bias"] == P(None, None) and specs["mlp"]["bias"] == P(None)
    specs = sh.param_specs(PARAMS, _abstract(fsdp=2, model=4))
    assert specs["mlp"]["kernel"] == P("fsdp", "model") and specs["out"]["kernel"] == P("model", None, "fsdp")
    assert sh.param_specs(PARAMS, _abstract(data=8))["mlp"]["kernel"] == P(None, None)


def test_rules_first_match_and_per_rank():
    rules = [(r"mlp/bias", P("model")), (r".*kernel", {2: P(None, "model")}),
             (r"query/kernel", P(None, None, "model"))]
    specs = sh.param_specs(PARAMS, _abstract(data=2, model=4), rules)
    assert specs["mlp"]["bias"] == P("model")
    assert specs["head"]["kernel"] == P(None, "model")
    assert specs["query"]["kernel"] == P(None, None, "model")       # no 3-D entry in rule 1: rule 2 applies
    assert specs["out"]["kernel"] == P(None, None, None)            # unmatched: replicated


def test_rule_errors():
    mesh = _abstract(data=2, model=3)
    with pytest.raises(rp.ReparamError, match=r"parameter 'mlp/kernel' \(16, 32\), partition rule 0 .*: dim 1 "
                                              r"\(size 32\) is not divisible by mesh axis 'model' of size 3"):
        sh.param_specs(PARAMS, mesh, [(r"mlp/kernel", P(None, "model"))])
    with pytest.raises(rp.ReparamError, match=r"'head/kernel' .*mesh axis 'tensor' is not in the mesh"):
        sh.param_specs(PARAMS, mesh, [(r"head/kernel", P("tensor"))])
    with pytest.raises(rp.ReparamError, match=r"'mlp/bias' .*spec .* has 2 entries but the array has 1 dims"):
        sh.param_specs(PARAMS, mesh, [(r"mlp/bias", P(None, "data"))])
    with pytest.raises(rp.ReparamError, match=r"uses a mesh axis twice"):
        sh.param_specs(PARAMS, _abstract(data=2, model=2), [(r"mlp/kernel", P("model", "model"))])
    with pytest.raises(rp.ReparamError, match=r"partition rule 0 must be \(regex, PartitionSpec\)"):
        sh.param_specs(PARAMS, mesh, [(r"mlp/kernel", ("model",))])


# --- derived specs -------------------------------------------------------------------------------------------
def _derived(rules, params=PARAMS, mesh=None, part_rules=sh.DEFAULT_RULES, optimizer=None):
    mesh = mesh or _abstract(data=2, model=4)
    plan = rp.plan(rules, params)
    frozen, trainable = jax.eval_shape(plan.init, jax.random.key(0), params)
    return sh.specs(plan, mesh, frozen, trainable, part_rules, optimizer=optimizer), trainable


def test_lora_follows_the_base():
    specs, _ = _derived([(r".*kernel", rp.lora(4))], mesh=_abstract(fsdp=2, model=4))
    assert specs.frozen["query"]["kernel"]["base"] == P("fsdp", "model", None)
    assert specs.trainable["query"]["kernel"] == {"A": P("fsdp", None), "B": P(None, "model")}   # [d, 4*8]: heads'
    assert specs.trainable["out"]["kernel"] == {"A": P("model", None), "B": P(None, "fsdp")}     # [4*8, d]
    assert specs.trainable["mlp"]["kernel"] == {"A": P("fsdp", None), "B": P(None, "model")}
    assert specs.frozen["mlp"]["bias"] == {"base": P(None)} and specs.trainable["mlp"]["bias"] == {}


def test_flattened_group_sharded_off_its_leading_axis_is_replicated():
    rules = [(r"query/kernel", P(None, None, "model"))]     # hd sharded, heads not: [16, 4*8] has no block layout
    specs, _ = _derived([(r"query/kernel", rp.lora(4))], part_rules=rules)
    assert specs.frozen["query"]["kernel"]["base"] == P(None, None, "model")
    assert specs.trainable["query"]["kernel"] == {"A": P(None, None), "B": P(None, None)}


@pytest.mark.parametrize("t, expect", [
    (rp.dora(4), {"A": P(None, None), "B": P(None, "model"), "m": P("model")}),
    (rp.pissa(4), {"A": P(None, None), "B": P(None, "model")}),
    (rp.vera(8), {"d": P(None), "b": P("model")}),
    (rp.lokr(4), {"A": P(None, None), "B": P(None, None)}),
    (rp.sparse.random(k=24), {"values": P(None)}),
    (rp.waveft(k=24), {"values": P(None)}),
    (rp.full(), {"w": P(None, "model")}),
])
def test_every_family(t, expect):
    specs, _ = _derived([(r"mlp/kernel", t)])
    assert specs.trainable["mlp"]["kernel"] == expect
    fr = specs.frozen["mlp"]["kernel"]
    if "base" in fr:
        assert fr["base"] == P(None, "model")                 # PiSSA's residual too
    for k, v in jax.tree_util.tree_leaves_with_path(fr, is_leaf=lambda s: isinstance(s, P)):
        if jax.tree_util.keystr(k) != "['base']":
            assert all(e is None for e in v), (k, v)          # keys, indices: replicated


def test_stacked_layers_keep_the_batch_spec():
    params = _shapes({"layers": {"kernel": (4, 16, 32)}})
    rules = [(r"layers/kernel", P("data", None, "model"))]
    specs, _ = _derived([(r"layers/kernel", rp.on_axes(rp.lora(4), batch_axes=(0,)))], params, part_rules=rules)
    assert specs.trainable["layers"]["kernel"] == {"A": P("data", None, None), "B": P("data", None, "model")}


def test_optimizer_state_follows_trainables():
    specs, trainable = _derived([(r".*kernel", rp.lora(4))], optimizer=optax.adamw(1e-3))
    mu = specs.state.opt_state[0].mu
    assert mu["mlp"]["kernel"]["B"] == P(None, "model") and mu == specs.state.opt_state[0].nu == specs.trainable
    assert specs.state.opt_state[0].count == P() and specs.state.step == P() and specs.state.rng == P()
    # a state that does not mirror the params (factored second moments): every spec still fits its array
    mesh = _abstract(data=2, model=4)
    state = jax.eval_shape(optax.adafactor(1e-3, min_dim_size_to_factor=8).init, trainable)
    opt = sh.opt_specs(optax.adafactor(1e-3, min_dim_size_to_factor=8), trainable, specs.trainable, mesh)
    flat_s = jax.tree_util.tree_leaves(opt, is_leaf=lambda s: isinstance(s, P))
    flat_x = jax.tree_util.tree_leaves(state)
    assert len(flat_s) == len(flat_x)
    for s, x in zip(flat_s, flat_x):
        assert len(s) <= x.ndim and all(n % (1 if e is None else mesh.shape[e]) == 0 for e, n in zip(s, x.shape))


# --- HLO parsing ---------------------------------------------------------------------------------------------
HLO = """
  %all-gather.1 = f32[16,32]{1,0} all-gather(f32[16,8]{1,0} %p0), channel_id=1, dimensions={1}
  %ag-start = (f32[4,16]{1,0}, f32[16,16]{1,0}) all-gather-start(f32[4,16]{1,0} %p1), dimensions={0}
  %ag-done = f32[16,16]{1,0} all-gather-done((f32[4,16]{1,0}, f32[16,16]{1,0}) %ag-start)
  %combined = (f32[8]{0}, bf16[4,8,16]{2,1,0}) all-gather(f32[2]{0} %a, bf16[1,8,16]{2,1,0} %b), dimensions={0}
  %all-reduce.2 = f32[16,4,8]{2,1,0} all-reduce(f32[16,4,8]{2,1,0} %x), to_apply=%add
"""


def test_all_gather_parser():
    assert hlo.all_gathers(HLO) == [(16, 32), (16, 16), (8,), (4, 8, 16)]
    plan = rp.plan([(r"query/kernel", rp.lora(2)), (r"out/kernel", rp.lora(2)), (r"head/kernel", rp.full())],
                   PARAMS)
    # [16, 32] is query's matrix view [d, heads*hd]; [4, 8, 16] is out's kernel itself
    assert hlo.gathered_weights(HLO, plan) == ["out/kernel", "query/kernel"]
    assert hlo.gathered_weights(HLO.replace("f32[16,32]", "f32[16,31]"), plan) == ["out/kernel"]
    assert hlo.gathered_weights(HLO.replace("f32[16,32]", "f32[32,8]").replace("[4,8,16]", "[4,8,15]"), plan) == []


# --- many devices, in subprocesses ---------------------------------------------------------------------------
def _env(devices: int) -> dict:
    # LLVM optimisation level 0 halves XLA:CPU compile time, which dominates these runs; every run compared
    # uses the same flags
    flags = f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
    return {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu",
            "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _result(proc_out: str, proc_err: str, rc: int) -> dict:
    assert rc == 0, proc_err[-3000:]
    return json.loads(proc_out.strip().splitlines()[-1])


def _run(mode: str, devices: int) -> dict:
    p = subprocess.run([sys.executable, CHECK, mode], env=_env(devices), capture_output=True, text=True,
                       timeout=TIMEOUT, cwd=ROOT)
    return _result(p.stdout, p.stderr, p.returncode)


@pytest.mark.slow
def test_sharded_training_matches_one_device():
    r = _run("curves", 8)
    ref = np.asarray(r["one_device"])
    assert ref.shape == (20,) and ref[-1] < ref[0] - 0.05                     # it trains
    for spec, m in r["meshes"].items():
        np.testing.assert_allclose(m["losses"], ref, atol=TOL, rtol=0, err_msg=spec)
        bad = {k: e for k, e in m["param_err"].items() if not e < TOL}
        assert not bad, (spec, bad)
        assert m["placed"] == m["trainable_specs"], spec                       # the step keeps the layout
    mp = r["meshes"]["data:4,model:2"]
    assert mp["base_specs"]["query/kernel"] == str(P(None, "model", None))
    assert mp["base_specs"]["out/kernel"] == str(P("model", None, None))
    assert mp["trainable_specs"]["query/kernel/B"] == str(P(None, "model"))   # LoRA B: heads' spec
    assert mp["trainable_specs"]["out/kernel/A"] == str(P("model", None))     # PiSSA A: heads' spec
    assert mp["trainable_specs"]["key/kernel/b"] == str(P("model"))           # VeRA b [d_out]
    assert mp["opt_specs"]["0/mu/query/kernel/B"] == str(P(None, "model"))
    assert r["meshes"]["data:8"]["base_specs"]["query/kernel"] == str(P(None, None, None))


@pytest.mark.slow
def test_lora_step_never_gathers_a_base_weight():
    r = _run("hlo", 8)
    for spec in ("data:4,model:2", "data:2,model:4"):
        assert r[spec]["gathers"], spec                  # the parser sees the step's (activation) all-gathers
        assert r[spec]["gathered_weights"] == [], (spec, r[spec]["gathers"])
    # forcing replicated effective weights gathers every sharded base: the check above can fail
    assert set(r["replicated"]["gathered_weights"]) >= {"query/kernel", "key/kernel", "value/kernel",
                                                        "out/kernel", "mlp_in/kernel", "mlp_out/kernel"}


@pytest.mark.slow
def test_scanned_decoder_shards_like_one_device():
    """The nn.scan decoder on a 4x2 mesh: 10 steps equal one device's; the stacked kernels shard their heads
    (q/k/v) and rows (o, down) over model with the layer axis unsharded, LoRA A/B follow them, and the
    compiled step all-gathers no base weight."""
    r = _run("decoder", 8)
    np.testing.assert_allclose(r["losses"], r["one_device"], atol=1e-5, rtol=0)
    bad = {k: e for k, e in r["param_err"].items() if not e < 1e-5}
    assert not bad, bad
    base, tr = r["base_specs"], r["trainable_specs"]
    assert base["layers/q/kernel"] == str(P(None, None, "model", None))          # [L, d, heads, hd]
    assert base["layers/o/kernel"] == str(P(None, "model", None, None))          # [L, heads, hd, d]: rows
    assert base["layers/down/kernel"] == str(P(None, "model", None))             # [L, ffn, d]: rows
    assert tr["layers/q/kernel/B"] == str(P(None, None, "model"))                # [L, r, heads*hd]
    assert tr["layers/o/kernel/A"] == str(P(None, "model", None))                # [L, heads*hd, r]
    # the fused gate/up kernel [L, 2, d, ffn] is sharded on ffn, the minor factor of its view's d_out = 2*ffn:
    # the op forms its weight as [d, 2, ffn] (views.Matrix.grouped), which keeps it sharded
    assert r["gathered_weights"] == [], r["gathered_weights"]


@pytest.mark.slow
def test_scanned_decoder_on_an_nf4_base_shards_like_one_device():
    """The same on an nf4 base: 10 steps equal one device's, and each stacked kernel's codes and scales are
    placed as its logical weight is sharded (q: heads over model; down: rows), the blocks' axes unsharded."""
    r = _run("decoder_nf4", 8)
    np.testing.assert_allclose(r["losses"], r["one_device"], atol=1e-5, rtol=0)
    bad = {k: e for k, e in r["param_err"].items() if not e < 1e-5}
    assert not bad, bad
    placed, shapes = r["placed"], r["quantised_shapes"]
    assert shapes["layers/q/kernel/base/codes"] == [2, 32, 4, 1, 4]              # [L, d, heads, hd/8, 8/2]
    assert placed["layers/q/kernel/base/codes"] == str(P(None, None, "model", None, None))
    assert placed["layers/q/kernel/base/scales"] == str(P(None, None, "model", None))
    assert placed["layers/down/kernel/base/codes"] == str(P(None, "model", None, None))    # [L, ffn, d/8, 4]
    assert r["gathered_weights"] == [], r["gathered_weights"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one():
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, CHECK, "worker", str(i), str(port)], env=_env(4), cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    procs.append(subprocess.Popen([sys.executable, CHECK, "single"], env=_env(1), cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=TIMEOUT)
            outs.append(_result(out, err, p.returncode))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    *workers, ref = outs
    assert [w["pid"] for w in workers] == [0, 1]
    assert all(w["processes"] == 2 and w["devices"] == 8 and w["local_devices"] == 4 for w in workers)
    for w in workers:
        np.testing.assert_allclose(w["losses"], ref["losses"], atol=TOL, rtol=0)
        for k, v in ref["params"].items():
            np.testing.assert_allclose(w["params"][k], v, atol=TOL, rtol=0, err_msg=k)
