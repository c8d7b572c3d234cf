"""The laws every method obeys, for all shapes and ranks (hypothesis) and on a small Flax model.

- a fresh adapter leaves the weight (and so the model's output) unchanged;
- merge equals apply;
- gradients reach every trainable array, and only trainable arrays change;
- changing adapter values does not retrace the jitted step;
- trainable counts equal the method's formula.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

import reparam as rp
from tests.methods import METHODS, calib_for, normal, perturb, rel_err, valid

NAMES = sorted(METHODS)


def make(name, d_in, d_out, rank, seed=0):
    """A one-weight params tree, its plan and (frozen, trainable)."""
    factory = METHODS[name][0]
    w = jnp.asarray(normal(seed, (d_in, d_out), 1 / np.sqrt(d_in)))       # numpy draws: no compile per shape
    params = {"layer": {"kernel": w, "bias": jnp.asarray(np.zeros(d_out, np.float32))}}
    t = factory(rank)
    plan = rp.plan([(r"layer/kernel", t)], params)
    frozen, trainable = plan.init(jax.random.key(seed + 1), params,
                                  calib=calib_for(t, "layer/kernel", w, jax.random.key(seed + 2)))
    return params, plan, frozen, trainable


@st.composite
def shapes(draw):
    d_in = draw(st.integers(2, 24))
    d_out = draw(st.integers(2, 24))
    return d_in, d_out, draw(st.integers(1, min(d_in, d_out)))


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(shape=shapes())
def test_init_is_noop_and_merge_equals_apply(name, shape):
    d_in, d_out, rank = shape
    assume(valid(name, d_in, d_out, rank))
    params, plan, frozen, trainable = make(name, d_in, d_out, rank)
    tol = METHODS[name][2]
    assert rel_err(plan.apply(frozen, trainable)["layer"]["kernel"], params["layer"]["kernel"]) <= tol
    trained = perturb(trainable, jax.random.key(3))
    applied = plan.apply(frozen, trained)
    merged = plan.merge(frozen, trained)
    assert rel_err(merged["layer"]["kernel"], applied["layer"]["kernel"]) <= 1e-6
    assert merged["layer"]["bias"] is not None and np.array_equal(merged["layer"]["bias"], params["layer"]["bias"])


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(shape=shapes())
def test_trainable_count_matches_formula(name, shape):
    d_in, d_out, rank = shape
    assume(valid(name, d_in, d_out, rank))
    factory, formula = METHODS[name][:2]
    t = factory(rank)
    if t.calib:     # data-driven: shapes are known after init only
        _, plan, _, trainable = make(name, d_in, d_out, rank)
        counts = plan.trainable_counts(trainable)
    else:           # abstract: no arrays are made
        plan = rp.plan([(r"w", t)], {"w": jax.ShapeDtypeStruct((d_in, d_out), jnp.float32)})
        counts = plan.trainable_counts()
    assert sum(counts) == formula(d_in, d_out, rank)


def test_lora_count_768():
    params = {"q": {"kernel": jax.ShapeDtypeStruct((768, 768), jnp.float32)}}
    plan = rp.plan([(r"q/kernel", rp.lora(8))], params)
    assert plan.trainable_counts() == [12_288]
    assert "12,288" in plan.summary()


def _mlp_params(key, dims=(12, 16, 16, 10)):
    """Three dense layers; every method under test accepts the 12x16 and 16x16 kernels at rank 3."""
    keys = jax.random.split(key, len(dims))
    return {f"dense_{i}": {"kernel": jax.random.normal(k, (a, b)) / np.sqrt(a), "bias": 0.01 * jnp.ones((b,))}
            for i, (a, b, k) in enumerate(zip(dims[:-1], dims[1:], keys))}


def _forward(params, x):
    for i in range(len(params)):
        x = x @ params[f"dense_{i}"]["kernel"] + params[f"dense_{i}"]["bias"]
        x = jnp.tanh(x) if i < len(params) - 1 else x
    return x


def _loss(params, batch, rng):
    x, y = batch
    logits = _forward(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), {"acc": (logits.argmax(-1) == y).mean()}


@pytest.mark.parametrize("name", NAMES)
def test_train_step_updates_only_trainables_without_retracing(name):
    params = _mlp_params(jax.random.key(0))
    factory = METHODS[name][0]
    t = factory(3)
    plan = rp.plan([(r"dense_[01]/kernel", t)], params)
    calib = None
    if t.calib:
        calib = {}
        for p in plan.adapted():
            layer = p.split("/")[0]
            calib.update(calib_for(t, p, params[layer]["kernel"], jax.random.key(5)))
    frozen, trainable = plan.init(jax.random.key(1), params, calib=calib)
    # the model's output is unchanged by a fresh adapter
    x = jax.random.normal(jax.random.key(2), (32, 12))
    y = jax.random.randint(jax.random.key(3), (32,), 0, 10)
    assert rel_err(_forward(plan.apply(frozen, trainable), x), _forward(params, x)) <= 10 * METHODS[name][2] + 1e-7

    traces = []

    def loss_fn(p, batch, rng):
        traces.append(1)
        return _loss(p, batch, rng)

    opt = optax.adam(1e-2)
    step = rp.train.make_train_step(plan, loss_fn, opt)
    trainable = perturb(trainable, jax.random.key(4), 0.05)   # LoRA's B = 0 would zero A's gradient
    before = trainable
    state = rp.train.init_state(jax.tree_util.tree_map(jnp.copy, trainable), opt, jax.random.key(6))
    state, metrics = step(state, frozen, (x, y))
    state, metrics = step(state, frozen, (x, y))
    # new adapter values (same shapes) -> no new trace
    state = state._replace(trainable=perturb(state.trainable, jax.random.key(7)))
    state, _ = step(state, frozen, (x, y))
    assert len(traces) == 1
    assert np.isfinite(float(metrics["loss"]))
    for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(state.trainable)):
        assert not np.allclose(a, b), "a trainable array received no update"
    # leaves no rule matched are exactly the originals
    out = plan.apply(frozen, state.trainable)
    for layer in ("dense_0", "dense_1", "dense_2"):
        assert np.array_equal(out[layer]["bias"], params[layer]["bias"])
    assert np.array_equal(out["dense_2"]["kernel"], params["dense_2"]["kernel"])
    # optimizer state exists only for trainable arrays
    n_train = sum(x.size for x in jax.tree_util.tree_leaves(state.trainable))
    n_opt = sum(x.size for x in jax.tree_util.tree_leaves(state.opt_state) if x.ndim > 0)
    assert n_opt == 2 * n_train
