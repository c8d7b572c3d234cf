"""Non-finite guards (issue 17): inf/NaN in a base weight or in calibration statistics is refused once, at
init or calibration time, with an error naming the parameter path (or the batch) and the fix -- never a hang
(+inf in W0 made an SVD init spin for minutes) or silently NaN weights."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reparam as rp
from reparam import sparse

D_IN, D_OUT = 8, 6
COV = {"cov": jnp.eye(D_IN)}


def _params(bad=None, at=(1, 2), stacked=False):
    w = np.array(jax.random.normal(jax.random.key(0), (3, D_IN, D_OUT) if stacked else (D_IN, D_OUT)))
    if bad is not None:
        w[(1,) + at if stacked else at] = bad
    return {"layer": {"kernel": jnp.asarray(w)}, "head": {"kernel": jnp.ones((D_OUT, 2))}}


WEIGHT_CASES = [
    (rp.pissa(2), None), (rp.pissa(2, niter=2), None), (rp.milora(2), None), (rp.svfit(2), None),
    (rp.sorsa(2), None), (rp.corda(2), COV), (rp.eva(2), COV), (rp.lora_xs(2), None),
    (rp.kronecker.soka(energy=0.9, a_shape=(2, 2)), None), (rp.lora(2), None), (sparse.magnitude(k=3), None),
]


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("t, calib", WEIGHT_CASES, ids=lambda v: getattr(v, "name", ""))
def test_a_non_finite_base_weight_is_refused_with_its_path(t, calib, bad):
    params = _params(bad)
    plan = rp.plan([(r"layer/kernel", t)], params)
    with pytest.raises(rp.ReparamError, match=(
            r"parameter 'layer/kernel' \(8, 6\), rule 0 \('layer/kernel' -> .*\): the weight has 1 non-finite "
            r"entry \(inf/NaN\), the first at \[1, 2\] = (-?inf|nan): .*fix the pretrained weights.*leave this "
            r"parameter out of the rule")):
        plan.init(jax.random.key(0), params, calib=calib and {"layer/kernel": calib})


def test_a_non_finite_stacked_layer_is_refused():
    """Stacked kernels are initialised under vmap, where values are abstract: the check runs before that."""
    params = _params(np.inf, stacked=True)
    plan = rp.plan([(r"layer/kernel", rp.pissa(2))], params, stacked=r"layer/.*")
    with pytest.raises(rp.ReparamError, match=r"'layer/kernel' \(3, 8, 6\).*1 non-finite entry.*first at \[1, 1, 2\]"):
        plan.init(jax.random.key(0), params)


def _bad(shape, value=np.nan, n=1):
    a = np.ones(shape, np.float32)
    a.reshape(-1)[:n] = value
    return jnp.asarray(a)


@pytest.mark.parametrize("t, calib", [
    (rp.corda(2), {"cov": _bad((D_IN, D_IN))}),
    (rp.corda(2, mode="kpm"), {"cov": _bad((D_IN, D_IN), np.inf)}),
    (rp.eva(2), {"cov": _bad((D_IN, D_IN))}),
    (sparse.sensitivity(k=3), {"grad": _bad((D_IN, D_OUT), n=D_IN * D_OUT)}),        # all-NaN gradient
    (sparse.lt_sft(k=3), {"diff": _bad((D_IN, D_OUT), np.inf)}),
    (rp.lora_xs(2, basis="gradient"), {"grad": _bad((D_IN, D_OUT))}),
], ids=lambda v: getattr(v, "name", ""))
def test_non_finite_calibration_statistics_are_refused(t, calib):
    params = _params()
    plan = rp.plan([(r"layer/kernel", t)], params)
    kind = next(iter(calib))
    with pytest.raises(rp.ReparamError, match=(rf"parameter 'layer/kernel' .*: calib\['{kind}'\] has \d+ non-finite "
                                               r"entr(y|ies).*recompute the calibration statistics from finite")):
        plan.init(jax.random.key(0), params, calib={"layer/kernel": calib})


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2, name="head")(nn.Dense(D_OUT, name="layer")(x))


def test_calibration_refuses_non_finite_batches_and_outputs():
    m = _Block()
    x = jnp.ones((4, D_IN))
    params = m.init(jax.random.key(0), x)["params"]
    with pytest.raises(rp.ReparamError, match=r"calibration batch 1, input 0 has 1 non-finite entry \(inf/NaN\), "
                                              r"the first at \[0, 0\] = nan: drop or clean that batch"):
        rp.capture_inputs(m, {"params": params}, [x, _bad((4, D_IN))], progress=False)
    # finite batches, but the model makes inf upstream of 'head'
    broken = jax.tree_util.tree_map(lambda a: a, params)
    broken["layer"]["bias"] = _bad((D_OUT,), np.inf)
    with pytest.raises(rp.ReparamError, match=r"capture_inputs: the input covariance of 'head/kernel' has \d+ "
                                              r"non-finite entries.*upstream of this layer"):
        rp.capture_inputs(m, {"params": broken}, [x], progress=False)
    loss = lambda p, b: jnp.sum(jnp.sqrt(p["layer"]["kernel"] * b))   # sqrt of negatives: NaN gradient
    with pytest.raises(rp.ReparamError, match=r"capture_grads: the mean gradient of 'layer/kernel' has \d+ "
                                              r"non-finite entr.*check loss_fn on each batch"):
        rp.capture_grads(loss, params, [jnp.full((D_IN, D_OUT), -1.0)], paths=["layer/kernel"], progress=False)
    with pytest.raises(rp.ReparamError, match=r"eva_allocate: calib\['layer/kernel'\]\['cov'\] has 1 non-finite"):
        rp.eva_allocate({"layer/kernel": {"cov": _bad((D_IN, D_IN))}}, 2)


def test_finite_inputs_still_initialise():
    params = _params()
    plan = rp.plan([(r"layer/kernel", rp.corda(2))], params)
    frozen, trainable = plan.init(jax.random.key(0), params, calib={"layer/kernel": COV})
    assert np.isfinite(np.asarray(trainable["layer"]["kernel"]["A"])).all()
