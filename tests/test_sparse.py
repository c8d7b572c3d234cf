"""Sparse-mask family: errors, which support each method picks, optimizer state, composition, LT-SFT end to end."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import reparam as rp
from reparam import sparse
from reparam.core import ReparamError

D_IN, D_OUT = 8, 6


def _w(seed=0, shape=(D_IN, D_OUT)):
    return jax.random.normal(jax.random.key(seed), shape)


def _init(t, w, calib=None, seed=1):
    """``(plan, frozen, trainable)`` for ``t`` on the single leaf ``{"w": w}``."""
    plan = rp.plan([("w", t)], {"w": w})
    frozen, trainable = plan.init(jax.random.key(seed), {"w": w}, calib=None if calib is None else {"w": calib})
    return plan, frozen, trainable


def _support(frozen):
    return set(np.asarray(frozen["w"]["idx"]).tolist())


# --- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [sparse.random, sparse.magnitude])
@pytest.mark.parametrize("density", [0.0, -0.1, 1.5])
def test_density_outside_unit_interval(make, density):
    with pytest.raises(ReparamError, match=r"density=.* must be in \(0, 1\]"):         # at construction
        rp.plan([("w", make(density=density))], {"w": jax.ShapeDtypeStruct((D_IN, D_OUT), jnp.float32)})


@pytest.mark.parametrize("make", [sparse.random, sparse.magnitude])
def test_k_above_entries_and_k_and_density(make):
    shape = {"w": jax.ShapeDtypeStruct((D_IN, D_OUT), jnp.float32)}
    with pytest.raises(ReparamError, match=r"parameter 'w'.*k=49 exceeds the 48 entries of a 8x6 weight"):
        rp.plan([("w", make(k=49))], shape)
    with pytest.raises(ReparamError, match="exactly one of k"):
        rp.plan([("w", make(k=3, density=0.1))], shape)
    assert rp.plan([("w", make(k=48))], shape).trainable_counts() == [48]


def test_structured_errors():
    shape = {"w": jax.ShapeDtypeStruct((D_IN, D_OUT), jnp.float32)}
    cases = [(dict(axis="out", k=7), "k=7 exceeds the 6 columns"),
             (dict(axis="in", k=2, group=3), "group=3 does not divide d_in=8"),
             (dict(rows=[0, 8]), r"unit indices must be in \[0, 8\)"),
             (dict(rows=[1, 1]), "distinct"),
             (dict(rows=[1], cols=[2]), "not both"),
             (dict(rows=[1], k=1), "drop k"),
             (dict(axis="diag", k=1), "axis must be"),
             (dict(k=1, select="grad"), "select must be")]
    for kw, msg in cases:
        with pytest.raises(ReparamError, match=msg):
            rp.plan([("w", sparse.structured(**kw))], shape)


@pytest.mark.parametrize("t,kind", [(sparse.sensitivity(k=3), "grad"), (sparse.lt_sft(k=3), "diff"),
                                    (rp.add(rp.lora(2), sparse.sensitivity(k=3)), "grad")])
def test_missing_calibration_through_plan_init(t, kind):
    w = _w()
    plan = rp.plan([("w", t)], {"w": w})
    assert plan.calibrated() == {"w": kind}
    with pytest.raises(ReparamError, match=rf"parameter 'w'.*needs calibration data \({kind}\)"):
        plan.init(jax.random.key(0), {"w": w})
    with pytest.raises(ReparamError, match=rf"needs calib\['{kind}'\]"):   # calib present, wrong kind
        plan.init(jax.random.key(0), {"w": w}, calib={"w": {"cov": jnp.eye(D_IN)}})


def test_wrong_shaped_calibration():
    w = _w()
    for t, kind, fix in [(sparse.sensitivity(k=3), "grad", "capture_grads"), (sparse.lt_sft(), "diff", "diffs")]:
        with pytest.raises(ReparamError, match=rf"calib\['{kind}'\] has shape \(6, 8\) but the weight has "
                                               rf"shape \(8, 6\).*{fix}"):
            _init(t, w, {kind: jnp.ones((D_OUT, D_IN))})


def test_diffs_errors():
    p0 = {"a": {"kernel": _w()}}
    with pytest.raises(ReparamError, match="not parameter paths"):
        sparse.diffs(p0, p0, ["a/bias"])
    with pytest.raises(ReparamError, match="differ in shape"):
        sparse.diffs(p0, {"a": {"kernel": jnp.ones((2, 2))}}, ["a/kernel"])
    d = sparse.diffs(p0, {"a": {"kernel": p0["a"]["kernel"] + 1.0}}, "a/kernel")
    np.testing.assert_allclose(d["a/kernel"]["diff"], np.ones((D_IN, D_OUT)), rtol=1e-6)


# --- the supports chosen -----------------------------------------------------------------------

def test_magnitude_picks_smallest_or_largest():
    w = _w()
    order = np.argsort(np.abs(np.asarray(w)).reshape(-1))
    for largest, expect in [(False, order[:5]), (True, order[-5:])]:
        plan, frozen, trainable = _init(sparse.magnitude(k=5, largest=largest), w)
        assert _support(frozen) == set(expect.tolist())
        assert trainable["w"]["values"].shape == (5,)
        assert frozen["w"]["base"] is w
    _, frozen, _ = _init(sparse.magnitude(density=0.25), w)
    assert _support(frozen) == set(order[:12].tolist())


def test_sensitivity_and_lt_sft_pick_largest_calibration():
    w, g = _w(), _w(7)
    expect = set(np.argsort(np.abs(np.asarray(g)).reshape(-1))[-4:].tolist())
    for t, kind in [(sparse.sensitivity(k=4), "grad"), (sparse.lt_sft(k=4), "diff")]:
        plan, frozen, trainable = _init(t, w, {kind: g})
        assert _support(frozen) == expect
        assert np.array_equal(plan.apply(frozen, trainable)["w"], w)   # values reset: W = θ0
    # lt_sft's default density: 1% of the entries, at least one
    _, frozen, _ = _init(sparse.lt_sft(), _w(0, (20, 30)), {"diff": _w(3, (20, 30))})
    assert len(_support(frozen)) == 6


def test_sensitivity_with_capture_grads():
    x = jax.random.normal(jax.random.key(2), (16, D_IN))
    y = jax.random.normal(jax.random.key(3), (16, D_OUT))
    params = {"dense": {"kernel": _w()}}
    loss = lambda p, b: jnp.mean((b[0] @ p["dense"]["kernel"] - b[1]) ** 2)
    plan = rp.plan([("dense/kernel", sparse.sensitivity(k=5))], params)
    calib = rp.capture_grads(loss, params, [(x, y)], paths=list(plan.calibrated()), progress=False)
    frozen, _ = plan.init(jax.random.key(0), params, calib=calib)
    g = np.abs(np.asarray(jax.grad(loss)(params, (x, y))["dense"]["kernel"])).reshape(-1)
    assert set(np.asarray(frozen["dense"]["kernel"]["idx"]).tolist()) == set(np.argsort(g)[-5:].tolist())


def test_structured_rows_cols_and_heads():
    w = _w()
    # explicit rows: ΔW is the block at those rows, 0 elsewhere
    plan, frozen, trainable = _init(sparse.structured(rows=[5, 1]), w)
    assert np.asarray(frozen["w"]["rows"]).tolist() == [1, 5] and trainable["w"]["values"].shape == (2, D_OUT)
    v = jax.random.normal(jax.random.key(4), (2, D_OUT))
    dw = np.asarray(plan.apply(frozen, {"w": {"values": v}})["w"] - w)
    np.testing.assert_allclose(dw[[1, 5]], v, atol=1e-6)
    assert np.all(dw[[0, 2, 3, 4, 6, 7]] == 0)
    # columns by largest norm
    norms = np.linalg.norm(np.asarray(w), axis=0)
    _, frozen, trainable = _init(sparse.structured(axis="out", k=2, select="norm"), w)
    assert set(np.asarray(frozen["w"]["cols"]).tolist()) == set(np.argsort(norms)[-2:].tolist())
    assert trainable["w"]["values"].shape == (D_IN, 2)
    # random rows: a fixed, distinct draw
    _, frozen, _ = _init(sparse.structured(axis="in", density=0.5), w)
    rows = np.asarray(frozen["w"]["rows"])
    assert len(set(rows.tolist())) == 4 and np.all(np.diff(rows) > 0)


def test_structured_heads_of_a_dense_general_kernel():
    """group=head_dim on a q kernel [d, heads, hd]: one whole head is trained, the others untouched."""
    d, h, hd = 8, 4, 3
    params = {"attn": {"query": {"kernel": _w(0, (d, h, hd))}}}
    plan = rp.plan([(".*/query/kernel", sparse.structured(cols=[2], group=hd))], params)
    assert plan.trainable_counts() == [d * hd]
    frozen, trainable = plan.init(jax.random.key(0), params)
    trained = jax.tree_util.tree_map(jnp.ones_like, trainable)
    dw = np.asarray(plan.apply(frozen, trained)["attn"]["query"]["kernel"] - params["attn"]["query"]["kernel"])
    assert np.allclose(dw[:, 2], 1.0) and np.all(dw[:, [0, 1, 3]] == 0)


@pytest.mark.parametrize("t,n", [(sparse.random(k=7), 7), (sparse.magnitude(density=0.25), 12),
                                 (sparse.structured(axis="in", k=3), 3 * D_OUT),
                                 (sparse.structured(axis="out", k=2, group=2), 2 * 2 * D_IN)])
def test_optimizer_state_is_support_size(t, n):
    _, _, trainable = _init(t, _w())
    state = optax.adam(1e-3).init(trainable)
    assert sum(x.size for x in jax.tree_util.tree_leaves(trainable)) == n
    assert sum(x.size for x in jax.tree_util.tree_leaves(state) if x.ndim > 0) == 2 * n


# --- composition -------------------------------------------------------------------------------

def _trained(trainable, seed):
    return jax.tree_util.tree_map(lambda x: jax.random.normal(jax.random.key(seed), x.shape), trainable)


def test_merge_disjoint_sparse_diffs_equals_applying_both():
    w = _w()
    params = {"w": w, "b": jnp.arange(3.0)}
    pa = rp.plan([("w", sparse.magnitude(k=6))], params)                  # smallest |W0|
    pb = rp.plan([("w", sparse.magnitude(k=6, largest=True))], params)    # largest: disjoint
    fa, ta = pa.init(jax.random.key(0), params)
    fb, tb = pb.init(jax.random.key(0), params)
    assert not _support(fa) & _support(fb)
    ta, tb = _trained(ta, 1), _trained(tb, 2)
    merged = rp.merge_adapters([(pa, fa, ta), (pb, fb, tb)], params)
    both = pb.apply({"w": {**fb["w"], "base": pa.apply(fa, ta)["w"]}, "b": fb["b"]}, tb)   # b's diff on top of a's
    np.testing.assert_allclose(merged["w"], both["w"], atol=1e-6)
    assert merged["b"] is params["b"]
    # weights: task arithmetic W0 + Σ w_i ΔW_i
    half = rp.merge_adapters([(pa, fa, ta), (pb, fb, tb)], params, weights=[0.5, -2.0])
    expect = w + 0.5 * (pa.apply(fa, ta)["w"] - w) - 2.0 * (pb.apply(fb, tb)["w"] - w)
    np.testing.assert_allclose(half["w"], expect, atol=1e-6)


def test_merge_any_transform_one_plan_and_errors():
    params = {"w": _w().astype(jnp.bfloat16)}
    plan = rp.plan([("w", rp.pissa(2))], params)              # rewrites the base: ΔW is measured from W0
    frozen, t = plan.init(jax.random.key(0), params)
    t1, t2 = _trained(t, 1), _trained(t, 2)
    merged = rp.merge_adapters([(plan, frozen, t1), (plan, frozen, t2)], params)
    w0 = params["w"].astype(jnp.float32)
    expect = w0 + (plan.apply(frozen, t1)["w"].astype(jnp.float32) - w0) + (
        plan.apply(frozen, t2)["w"].astype(jnp.float32) - w0)
    assert merged["w"].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(merged["w"], np.float32), expect, atol=0.05)
    # one adapter: W0 + (merge - W0) is merge again (bf16 values, f32 differences: exact), compared with the
    # same jitted program (plan.merge), not the eager plan.apply, which XLA may round differently
    assert np.array_equal(rp.merge_adapters([(plan, frozen, t)], params)["w"], plan.merge(frozen, t)["w"])
    with pytest.raises(ReparamError, match="2 weights for 1 adapters"):
        rp.merge_adapters([(plan, frozen, t)], params, weights=[1.0, 1.0])
    with pytest.raises(ReparamError, match="another params structure"):
        rp.merge_adapters([(plan, frozen, t)], {"v": params["w"]})


def test_orthogonality_penalty_zero_iff_orthogonal():
    w = _w()
    pen = rp.orthogonality_penalty
    # disjoint sparse supports: 0 in the Frobenius sense, but not row-orthogonal in general
    pa, fa, ta = _init(sparse.magnitude(k=6), w)
    pb, fb, tb = _init(sparse.magnitude(k=6, largest=True), w)
    da, db = rp.weight_deltas(pa, fa, _trained(ta, 1)), rp.weight_deltas(pb, fb, _trained(tb, 2))
    assert set(da) == {"w"} and da["w"].shape == (D_IN, D_OUT)
    assert float(pen(da, db, kind="frobenius")) == 0.0
    assert float(pen(da, da, kind="frobenius")) > 0.0
    # disjoint rows -> orthogonal input spaces ("in"); disjoint columns -> "out"
    for kw, kind in [(dict(axis="in"), "in"), (dict(axis="out"), "out")]:
        p1, f1, t1 = _init(sparse.structured(**kw, k=3), w, seed=1)
        chosen = f1["w"]["rows" if kind == "in" else "cols"]
        rest = sorted(set(range(w.shape[0 if kind == "in" else 1])) - set(np.asarray(chosen).tolist()))
        p2, f2, t2 = _init(sparse.structured(**({"rows": rest} if kind == "in" else {"cols": rest})), w)
        d1, d2 = rp.weight_deltas(p1, f1, _trained(t1, 3)), rp.weight_deltas(p2, f2, _trained(t2, 4))
        assert float(pen(d1, d2, kind=kind)) == 0.0
        assert float(pen(d1, d2, kind="out" if kind == "in" else "in")) > 0.0
    # LoRA with orthogonal A's (input subspaces) / orthogonal B's (output subspaces)
    q, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(5), (D_IN, D_IN)))
    b1, b2 = _w(6, (2, D_OUT)), _w(7, (2, D_OUT))
    # "0" up to float32 round-off: relative to ‖ΔW_1‖²‖ΔW_2‖² (QR's orthogonality differs between CPUs / kernels)
    rel = lambda x, y, kind: float(pen(x, y, kind=kind) / (jnp.sum(x ** 2) * jnp.sum(y ** 2)))
    assert rel(q[:, :2] @ b1, q[:, 2:4] @ b2, "in") < 1e-6
    assert rel(q[:, :2] @ b1, q[:, 1:3] @ b2, "in") > 1e-3
    r, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(8), (D_OUT, D_OUT)))
    a1, a2 = _w(9, (D_IN, 2)), _w(10, (D_IN, 2))
    assert rel(a1 @ r[:, :2].T, a2 @ r[:, 2:4].T, "out") < 1e-6
    assert rel(a1 @ r[:, :2].T, a2 @ r[:, 1:3].T, "out") > 1e-3
    # both exact forms of "in" agree (d_out > d_in takes the Gram form), and three adapters sum pairwise
    x, y, z = _w(11, (3, 5)), _w(12, (3, 5)), _w(13, (3, 5))
    np.testing.assert_allclose(pen(x, y), np.sum((x.T @ y) ** 2), rtol=1e-5)
    np.testing.assert_allclose(pen(x, y, z), pen(x, y) + pen(x, z) + pen(y, z), rtol=1e-5)
    with pytest.raises(ReparamError, match="kind must be"):
        pen(x, y, kind="cols")
    with pytest.raises(ReparamError, match="no parameter path is common"):
        pen({"a": x}, {"b": y})


def test_orthogonality_penalty_in_a_loss_is_differentiable():
    """Orthogonal adaptation: train adapter b against a fixed adapter a; the penalty's gradient reaches b."""
    params = {"w": _w()}
    plan = rp.plan([("w", rp.lora(2))], params)
    frozen, ta = plan.init(jax.random.key(0), params)
    ta, tb = _trained(ta, 1), _trained(ta, 2)
    da = jax.lax.stop_gradient(rp.weight_deltas(plan, frozen, ta))
    x = jax.random.normal(jax.random.key(3), (16, D_IN))

    def loss(tb, lam):
        out = x @ plan.apply(frozen, tb)["w"]
        return jnp.mean(out ** 2) + lam * rp.orthogonality_penalty(da, rp.weight_deltas(plan, frozen, tb))

    g0, g1 = jax.grad(loss)(tb, 0.0), jax.grad(loss)(tb, 1.0)
    for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
        assert np.all(np.isfinite(b)) and not np.allclose(a, b)
    pen = lambda t: rp.orthogonality_penalty(da, rp.weight_deltas(plan, frozen, t))
    step = jax.jit(lambda t: jax.tree_util.tree_map(lambda p, g: p - 1e-3 * g, t, jax.grad(pen)(t)))
    t = tb
    for _ in range(20):
        t = step(t)
    assert float(pen(t)) < float(pen(tb))


# --- LT-SFT end to end -------------------------------------------------------------------------

def test_lt_sft_end_to_end():
    """Full FT θ0 → θ1, keep the top 5% of |θ1 − θ0|, reset to θ0, train only those: the loss decreases."""
    d_in, d_out = 16, 12
    key = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(key[0], (64, d_in))
    params0 = {"dense": {"kernel": jax.random.normal(key[1], (d_in, d_out)), "bias": jnp.zeros((d_out,))}}
    # the task moves a few entries of θ0 (a sparse "ticket" for LT-SFT to find)
    task = jax.random.choice(key[2], d_in * d_out, (8,), replace=False)
    shift = jnp.zeros(d_in * d_out).at[task].set(jnp.sign(jax.random.normal(key[3], (8,)))).reshape(d_in, d_out)
    y = x @ (params0["dense"]["kernel"] + shift)
    batch = (x, y)
    loss_fn = lambda p, b, rng=None: jnp.mean((b[0] @ p["dense"]["kernel"] + p["dense"]["bias"] - b[1]) ** 2)
    def run(plan, frozen, trainable, steps, opt):
        step = rp.train.make_train_step(plan, loss_fn, opt)
        state = rp.train.init_state(trainable, opt, jax.random.key(1))
        losses = []
        for _ in range(steps):
            state, m = step(state, frozen, batch)
            losses.append(float(m["loss"]))
        return state.trainable, losses

    # phase 1: full fine-tuning
    full = rp.plan([("dense/kernel", rp.full())], params0)
    f_full, t_full = full.init(jax.random.key(0), params0)
    t_full, _ = run(full, f_full, t_full, 10, optax.sgd(0.1))
    params1 = full.merge(f_full, t_full)
    # phase 2: top 5% of the diff, reset to θ0
    plan = rp.plan([("dense/kernel", sparse.lt_sft(density=0.05))], params0)
    calib = sparse.diffs(params0, params1, list(plan.calibrated()))
    frozen, trainable = plan.init(jax.random.key(0), params0, calib=calib)
    k = round(0.05 * d_in * d_out)
    assert sum(plan.trainable_counts(trainable)) == k
    diff = np.abs(np.asarray(params1["dense"]["kernel"] - params0["dense"]["kernel"])).reshape(-1)
    chosen = np.zeros(diff.size, bool)
    chosen[np.asarray(frozen["dense"]["kernel"]["idx"])] = True
    assert diff[chosen].min() >= diff[~chosen].max()          # the top k (up to ties)
    assert np.array_equal(plan.apply(frozen, trainable)["dense"]["kernel"], params0["dense"]["kernel"])
    assert len(set(np.asarray(task).tolist()) & set(np.asarray(frozen["dense"]["kernel"]["idx"]).tolist())) >= 6
    trained, losses = run(plan, frozen, trainable, 30, optax.adam(3e-2))
    assert losses[-1] < 0.5 * losses[0]
    # the trained sparse diff touches only its support, and merges back onto θ0
    merged = rp.merge_adapters([(plan, frozen, trained)], params0)
    changed = np.flatnonzero(np.asarray(merged["dense"]["kernel"] - params0["dense"]["kernel"]).reshape(-1))
    assert set(changed.tolist()) <= set(np.asarray(frozen["dense"]["kernel"]["idx"]).tolist())


def test_stacked_layers_choose_per_layer():
    """nn.scan-stacked kernels [L, d_in, d_out]: each layer gets its own support (vmapped init)."""
    w, g = _w(0, (3, D_IN, D_OUT)), _w(1, (3, D_IN, D_OUT))
    params = {"layers": {"kernel": w}}
    for t, calib, score in [(sparse.magnitude(k=3, largest=True), None, w),
                            (sparse.sensitivity(k=3), {"layers/kernel": {"grad": g}}, g)]:
        plan = rp.plan([(".*kernel", rp.on_axes(t, batch_axes=(0,)))], params)
        frozen, trainable = plan.init(jax.random.key(0), params, calib=calib)
        idx = np.asarray(frozen["layers"]["kernel"]["idx"])
        assert trainable["layers"]["kernel"]["values"].shape == (3, 3)
        for i in range(3):
            assert set(idx[i].tolist()) == set(np.argsort(np.abs(np.asarray(score[i])).reshape(-1))[-3:].tolist())
