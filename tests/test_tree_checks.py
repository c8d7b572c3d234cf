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
