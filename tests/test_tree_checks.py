"""Bad leaves and mixed-up trees: each is an error at the boundary (rp.plan, or trace time of apply / merge /
the train step) that names the path, the rule and the fix; never a silently wrong result."""
import jax
import jax.numpy as jnp
import optax
import pytest

import reparam as rp


def _params(dtype=jnp.float32):
    return {"q": {"kernel": jnp.ones((8, 6), dtype)}, "step": {"count": jnp.zeros((4, 4), jnp.int32)},
            "mask": {"keep": jnp.ones((4, 4), bool)}}


@pytest.mark.parametrize("path, t", [
    ("step/count", rp.lora(2)), ("mask/keep", rp.lora(2)), ("step/count", rp.full()), ("mask/keep", rp.pissa(2)),
    ("step/count", rp.sparse.random(k=3)), ("mask/keep", rp.vera(2)),
], ids=lambda v: v if isinstance(v, str) else v.name)
def test_a_trained_transform_on_an_integer_or_bool_leaf_is_refused(path, t):
    dtype = "int32" if path == "step/count" else "bool"
    with pytest.raises(rp.ReparamError, match=rf"parameter '{path}' \(4, 4\), rule 0 \('{path}' -> .*\): "
                                              rf".* trains a floating-point weight, and this leaf is {dtype}.*"
                                              r"exclude it from the rule \(narrow the regex"):
        rp.plan([(path, t)], _params())


def test_frozen_takes_any_leaf_and_unmatched_int_leaves_are_fine():
    plan = rp.plan([("step/count", rp.frozen()), ("q/kernel", rp.lora(2))], _params())
    frozen, trainable = plan.init(jax.random.key(0), _params())
    assert plan.apply(frozen, trainable)["mask"]["keep"].dtype == bool


@pytest.mark.parametrize("dtype", [jnp.int32, "int8", bool, "no-such-dtype"], ids=str)
def test_trainable_dtype_must_be_floating(dtype):
    with pytest.raises(rp.ReparamError, match=r"plan: trainable_dtype=.* must be a floating dtype \(e.g. "
                                              r"trainable_dtype=jnp.float32 or jnp.bfloat16\), or None"):
        rp.plan([("q/kernel", rp.lora(2))], _params(), trainable_dtype=dtype)


def _two(t):
    params = {"a": {"kernel": jax.random.normal(jax.random.key(0), (8, 6))},
              "b": {"kernel": jax.random.normal(jax.random.key(1), (6, 4)), "bias": jnp.zeros((4,))}}
    plan = rp.plan([(r"a/kernel", t), (r"b/bias", rp.full())], params)
    return plan, params, *plan.init(jax.random.key(2), params)


def _loss(p, batch, rng):
    return jnp.mean((jnp.tanh(batch @ p["a"]["kernel"]) @ p["b"]["kernel"] + p["b"]["bias"]) ** 2)


def _extra(tr):
    return {**tr, "a": {"kernel": {**tr["a"]["kernel"], "C": jnp.zeros((2, 2))}}}


def _missing(tr):
    return {**tr, "a": {"kernel": {"A": tr["a"]["kernel"]["A"]}}}


def _stray(tr):
    return {**tr, "b": {**tr["b"], "kernel": {"w": jnp.zeros((6, 4))}}}


A = r"parameter 'a/kernel', rule 0 \('a/kernel' -> {}\): "
MIXUPS = [      # (case, the plan's transform, another's or a change of the trainables, what the error must say)
    ("rank 2 plan, rank 4 trainables", rp.lora(2), rp.lora(4),
     A.format(r"lora\(r=2\)") + r"'A': expected float32\[8, 2\], got float32\[8, 4\], 'B': expected float32\[2, 6\], "
                                r"got float32\[4, 6\]"),
    ("lora plan, vera trainables", rp.lora(2), rp.vera(2),
     A.format(r"lora\(r=2\)") + r"unexpected entry 'b' float32\[6\], unexpected entry 'd' float32\[2\], missing 'A'"),
    ("lora plan, dora trainables", rp.lora(2), rp.dora(2), A.format(r"lora\(r=2\)") + r"unexpected entry 'm' float32\[6\]"),
    ("pissa plan, lora(4) trainables", rp.pissa(2), rp.lora(4),
     A.format(r"pissa\(r=2\)") + r"'A': expected float32\[8, 2\], got float32\[8, 4\]"),
    ("extra entry", rp.lora(2), _extra, A.format(r"lora\(r=2\)") + r"unexpected entry 'C' float32\[2, 2\]"),
    ("missing entry", rp.lora(2), _missing, A.format(r"lora\(r=2\)") + r"missing 'B' float32\[2, 6\]"),
    ("trainables on an unadapted leaf", rp.lora(2), _stray,
     r"parameter 'b/kernel', not adapted by any rule: unexpected entry 'w' float32\[6, 4\]"),
    ("bf16 trainables", rp.lora(2), lambda tr: jax.tree.map(lambda x: x.astype(jnp.bfloat16), tr),
     A.format(r"lora\(r=2\)") + r"'A': expected float32\[8, 2\], got bfloat16\[8, 2\]"),
]


def _mixed(t, other):
    plan, params, frozen, trainable = _two(t)
    bad = other(trainable) if callable(other) and not isinstance(other, rp.Reparam) else \
        _two(other)[3]
    return plan, frozen, bad


@pytest.mark.parametrize("case, t, other, message", MIXUPS, ids=[m[0] for m in MIXUPS])
@pytest.mark.parametrize("where", ["apply", "merge", "jit(apply)", "train step", "eval step"])
def test_trees_of_another_plan_are_refused_at_trace_time(case, t, other, message, where):
    plan, frozen, bad = _mixed(t, other)
    x = jnp.ones((3, 8))
    run = {"apply": lambda: plan.apply(frozen, bad), "merge": lambda: plan.merge(frozen, bad),
           "jit(apply)": lambda: jax.jit(plan.apply)(frozen, bad),
           "train step": lambda: rp.train.make_train_step(plan, _loss, optax.sgd(0.1))(
               rp.train.init_state(bad, optax.sgd(0.1), jax.random.key(0)), frozen, x),
           "eval step": lambda: rp.train.make_eval_step(plan, lambda p, b: _loss(p, b, None))(bad, frozen, x)}[where]
    with pytest.raises(rp.ReparamError, match=r"trainable does not fit this plan: "
                                              + f"{message}.*Pass the trainable tree that this plan's init "
                                              r"returned"):
        run()


def test_frozen_of_another_plan_is_refused():
    plan, _, frozen, trainable = _two(rp.lora(2))
    other = _two(rp.pissa(2))[2]
    plan.apply(other, trainable)                         # lora and pissa keep the same frozen entries ...
    vera_frozen = _two(rp.vera(2))[2]
    with pytest.raises(rp.ReparamError, match=r"frozen does not fit this plan: parameter 'a/kernel', rule 0 "
                                              r"\('a/kernel' -> lora\(r=2\)\): unexpected entry 'key'"):
        plan.apply(vera_frozen, trainable)              # ... vera's hold its key
    with pytest.raises(rp.ReparamError, match=r"frozen does not fit.*'a/kernel'.*'base': expected float32\[8, 6\], "
                                              r"got float32\[6, 8\]"):
        plan.apply({**frozen, "a": {"kernel": {"base": frozen["a"]["kernel"]["base"].T}}}, trainable)


def test_checks_cost_nothing_per_step():
    """The check is Python on shapes: a jitted apply traces (and checks) once, then runs without it."""
    plan, _, frozen, trainable = _two(rp.lora(2))
    calls = []
    check = plan.check
    plan.check = lambda *a: (calls.append(1), check(*a))
    f = jax.jit(plan.apply)
    for _ in range(3):
        f(frozen, trainable)
    assert len(calls) == 1


@pytest.mark.parametrize("change, message", [
    (lambda tr: {**tr, "c": {"kernel": {"A": jnp.zeros((2, 2))}}}, r"entries under no parameter of the plan: \['c/kernel/A'\]"),
    (lambda tr: {"a": tr["a"]}, r"parameters with no entries: \['b/bias'\]"),
    (lambda tr: {**tr, "a": {"kernel": jnp.zeros((8, 6))}}, r"'a/kernel', rule 0 .*: a bare float32\[8, 6\] in place of the entries, missing 'A'"),
], ids=["extra parameter", "missing parameter", "array for a dict"])
def test_trees_of_other_params_are_refused(change, message):
    plan, _, frozen, trainable = _two(rp.lora(2))
    with pytest.raises(rp.ReparamError, match=message + r".*Pass the trainable tree that this plan's init returned"):
        plan.apply(frozen, change(trainable))


SUPPORTS = [("out of range", [0, 5, 48], r"support index 48 \(1 of 3 out of range\) is not an entry of a 8x6 weight: "
                                         r"flat indices row \* d_out \+ col must be in \[0, 48\)"),
            ("negative", [-1, 3], r"support index -1 \(1 of 2 out of range\)"),
            ("repeated", [3, 7, 3], r"support indices repeat \(\[3\]\)"),
            ("float", [0.0, 1.5], r"the support must be a 1-D array of integer flat indices .* got float32\[2\]"),
            ("2-D", [[0, 1], [2, 3]], r"the support must be a 1-D array of integer flat indices .* got int32\[2, 2\]")]


@pytest.mark.parametrize("case, idx, message", SUPPORTS, ids=[c[0] for c in SUPPORTS])
@pytest.mark.parametrize("form", ["plain", "in_basis", "stacked"])
def test_a_support_given_as_data_is_checked_when_the_plan_is_made(case, idx, message, form):
    """A sparse support from a list or a file (``sparse.from_support``) that names no entry of the weight is an
    error at rp.plan naming the path, the rule and the fix, not silent training of an entry that does not exist."""
    t = rp.sparse.from_support("given", lambda key, w, calib: jnp.asarray(idx))
    params = {"a": {"kernel": jnp.ones((3, 8, 6) if form == "stacked" else (8, 6))}}
    t = {"plain": t, "in_basis": rp.in_basis(rp.dct_basis(), t), "stacked": rp.on_axes(t, batch_axes=(0,))}[form]
    with pytest.raises(rp.ReparamError, match=r"parameter 'a/kernel' .*, rule 0 \('a/kernel' -> .*\): given: "
                                              + message + r".*fix the indices .* or narrow the rule's regex"):
        rp.plan([("a/kernel", t)], params)


def test_a_valid_support_trains_exactly_its_entries():
    params = {"a": {"kernel": jnp.zeros((8, 6))}}
    plan = rp.plan([("a/kernel", rp.sparse.from_support("given", lambda key, w, calib: jnp.asarray([47, 0, 13])))],
                   params)
    frozen, trainable = plan.init(jax.random.key(0), params)
    w = plan.apply(frozen, {"a": {"kernel": {"values": jnp.array([1.0, 2.0, 3.0])}}})["a"]["kernel"].reshape(-1)
    assert [int(i) for i in jnp.nonzero(w)[0]] == [0, 13, 47] and float(w[47]) == 3.0
