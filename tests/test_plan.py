"""Plans over real Flax models: matrix views, stacked layers, nnx, calibration, bad input, mixed precision."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import reparam as rp
from tests.methods import perturb, rel_err


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):                       # x [B, T, 16]
        q = nn.DenseGeneral((4, 8), name="query")(x)                  # kernel [16, 4, 8]
        o = nn.DenseGeneral(16, axis=(-2, -1), name="out")(q)         # kernel [4, 8, 16]
        c = nn.Conv(16, (3,), name="conv")(o)                         # kernel [3, 16, 16]
        return nn.Dense(5, name="head")(c.mean(1))


@pytest.fixture(scope="module")
def block():
    m = Block()
    x = jax.random.normal(jax.random.key(0), (4, 6, 16))
    return m, m.init(jax.random.key(1), x)["params"], x


def test_default_views_and_no_copy_of_the_base(block):
    m, params, x = block
    plan = rp.plan([(r"(query|out|conv)/kernel", rp.lora(4)), (r"head/.*", rp.full())], params)
    views = {leaf.path: (leaf.view.inp, leaf.view.out) for leaf in plan.leaves if leaf.view is not None}
    assert views["query/kernel"] == ((0,), (1, 2))
    assert views["out/kernel"] == ((0, 1), (2,))
    assert views["conv/kernel"] == ((0, 1), (2,))
    frozen, trainable = plan.init(jax.random.key(2), params)
    assert trainable["query"]["kernel"]["A"].shape == (16, 4) and trainable["query"]["kernel"]["B"].shape == (4, 32)
    assert trainable["conv"]["kernel"]["A"].shape == (48, 4)
    for name in ("query", "out", "conv"):          # the frozen base IS the caller's array: no copy
        assert frozen[name]["kernel"]["base"] is params[name]["kernel"]
    assert trainable["head"]["kernel"]["w"] is not params["head"]["kernel"]   # donated later: must be fresh
    y0 = m.apply({"params": params}, x)
    assert rel_err(m.apply({"params": plan.apply(frozen, trainable)}, x), y0) == 0.0
    trained = perturb(trainable, jax.random.key(3))
    merged = plan.merge(frozen, trained)
    assert rel_err(m.apply({"params": merged}, x), m.apply({"params": plan.apply(frozen, trained)}, x)) < 1e-6
    # the conv's delta is the matrix-view delta reshaped back
    d = merged["conv"]["kernel"] - params["conv"]["kernel"]
    A, B = trained["conv"]["kernel"]["A"], trained["conv"]["kernel"]["B"]
    np.testing.assert_allclose(d.reshape(48, 16), A @ B, rtol=1e-5, atol=1e-6)


def test_pissa_on_a_dense_general_kernel_rewrites_the_base_in_its_own_layout(block):
    _, params, _ = block
    plan = rp.plan([(r"query/kernel", rp.pissa(4))], params)
    frozen, trainable = plan.init(jax.random.key(0), params)
    assert frozen["query"]["kernel"]["base"].shape == (16, 4, 8)
    assert rel_err(plan.apply(frozen, trainable)["query"]["kernel"], params["query"]["kernel"]) < 1e-5


class Stacked(nn.Module):
    @nn.compact
    def __call__(self, x):
        class Layer(nn.Module):
            @nn.compact
            def __call__(self, h, _):
                return jnp.tanh(nn.Dense(12, name="dense")(h)), None
        h, _ = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)(name="layers")(x, None)
        return h


def test_scan_stacked_layers_get_one_adapter_each_by_vmap():
    m = Stacked()
    x = jax.random.normal(jax.random.key(0), (5, 12))
    params = m.init(jax.random.key(1), x)["params"]
    assert params["layers"]["dense"]["kernel"].shape == (3, 12, 12)
    with pytest.raises(rp.ReparamError, match=r"layers/dense/kernel.*model=.*batch_axes=\(\.\.\.\) only for axes that stack"):
        rp.plan([(r".*dense/kernel", rp.lora(2))], params)      # ambiguous without a declaration
    t = rp.on_axes(rp.pissa(2), batch_axes=(0,))
    plan = rp.plan([(r".*dense/kernel", t)], params)
    frozen, trainable = plan.init(jax.random.key(2), params)
    assert trainable["layers"]["dense"]["kernel"]["A"].shape == (3, 12, 2)
    assert rel_err(m.apply({"params": plan.apply(frozen, trainable)}, x), m.apply({"params": params}, x)) < 1e-5
    # layer l's weight is exactly the one-matrix transform applied to layer l's slice
    trained = perturb(trainable, jax.random.key(3))
    out = plan.apply(frozen, trained)["layers"]["dense"]["kernel"]
    f, tr = frozen["layers"]["dense"]["kernel"], trained["layers"]["dense"]["kernel"]
    for layer in range(3):
        one = rp.pissa(2).apply(jax.tree_util.tree_map(lambda a: a[layer], f),
                                jax.tree_util.tree_map(lambda a: a[layer], tr))
        np.testing.assert_allclose(out[layer], one, rtol=1e-6)
    assert "b(0,) in(1,) out(2,)" in plan.summary(trained)


def test_nnx_state_paths_and_roundtrip():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.fc1 = nnx.Linear(6, 8, rngs=rngs)
            self.fc2 = nnx.Linear(8, 3, rngs=rngs)

        def __call__(self, x):
            return self.fc2(jax.nn.relu(self.fc1(x)))

    net = Net(nnx.Rngs(0))
    graphdef, state = nnx.split(net, nnx.Param)
    plan = rp.plan([(r"fc1/kernel", rp.lora(2)), (r"fc2/.*", rp.full())], state)
    assert set(plan.adapted()) == {"fc1/kernel", "fc2/kernel", "fc2/bias"}
    frozen, trainable = plan.init(jax.random.key(1), state)
    x = jnp.ones((2, 6))
    y = nnx.merge(graphdef, plan.apply(frozen, perturb(trainable, jax.random.key(2))))(x)
    assert y.shape == (2, 3) and not np.allclose(y, net(x))
    np.testing.assert_allclose(nnx.merge(graphdef, plan.apply(frozen, trainable))(x), net(x), rtol=1e-6)


# --- bad input: clear errors naming the path, the rule and the fix ------------------------------------
PARAMS = {"enc": {"query": {"kernel": jnp.ones((8, 6))}, "value": {"kernel": jnp.ones((8, 6))}}}


def test_rule_that_matches_nothing_lists_near_misses():
    with pytest.raises(rp.ReparamError, match=r"rule 1 .*'quer/kernel'.*matches no parameter path.*near misses"):
        rp.plan([(r".*value/kernel", rp.lora(2)), (r"quer/kernel", rp.lora(2))], PARAMS)
    with pytest.raises(rp.ReparamError, match=r"re.fullmatch: prefix with '\.\*/'"):
        rp.plan([(r"query/kernel", rp.lora(2))], PARAMS)


def test_rank_above_min_dim_names_path_rule_and_fix():
    with pytest.raises(rp.ReparamError, match=r"'enc/query/kernel' \(8, 6\), rule 0 .*rank 7 exceeds "
                                              r"min\(d_in, d_out\) = 6.*use rank <= 6"):
        rp.plan([(r".*/query/kernel", rp.lora(7))], PARAMS)
    with pytest.raises(rp.ReparamError, match=r"enc/value/kernel.*pissa: rank 9"):
        rp.plan([(r".*/value/kernel", rp.pissa(9))], PARAMS)
    with pytest.raises(rp.ReparamError, match=r"'e/kernel' \(0, 6\), rule 0 .*lora: the 0x6 weight is empty; "
                                              r"exclude it from the rule"):
        rp.plan([(r"e/kernel", rp.lora(2))], {"e": {"kernel": jnp.ones((0, 6))}})


def test_non_2d_kernel_without_declaration_and_bad_rule_shapes():
    params = {"mix": {"kernel": jnp.ones((4, 5, 6))}, "b": jnp.ones((3,))}
    with pytest.raises(rp.ReparamError, match=r"'mix/kernel'.*\(4, 5, 6\).*cannot be inferred.*model=.*rp.on_axes"):
        rp.plan([(r"mix/kernel", rp.lora(2))], params)
    plan = rp.plan([(r"mix/kernel", rp.on_axes(rp.lora(2), in_axes=(0, 1)))], params)
    assert plan.leaves[1].view == rp.views.View((), (0, 1), (2,))
    with pytest.raises(rp.ReparamError, match=r"'b'.*>= 2 dims.*rp.full\(\)"):
        rp.plan([(r"b", rp.lora(2))], params)
    with pytest.raises(rp.ReparamError, match=r"rule 0 must be a \(regex, transform\) pair"):
        rp.plan([("mix/kernel",)], params)
    with pytest.raises(rp.ReparamError, match=r"exactly once each.*Fix the rp.on_axes declaration: name each axis in exactly one of"):
        rp.plan([(r"mix/kernel", rp.on_axes(rp.lora(2), in_axes=(0,), out_axes=(0, 2)))], params)


def test_calibration_errors(block):
    m, params, x = block
    plan = rp.plan([(r"query/kernel", rp.corda(2))], params)
    with pytest.raises(rp.ReparamError, match=r"'query/kernel'.*needs calibration data \(cov\).*capture_inputs"):
        plan.init(jax.random.key(0), params)
    with pytest.raises(rp.ReparamError, match=r"'query/kernel'.*calib\['cov'\] of shape \(16, 16\).*\(5, 5\)"):
        plan.init(jax.random.key(0), params, calib={"query/kernel": {"cov": jnp.eye(5)}})
    with pytest.raises(rp.ReparamError, match=r"no rule adapts: \['head/kernel'\]"):
        plan.init(jax.random.key(0), params, calib={"head/kernel": {"cov": jnp.eye(20)}})
    with pytest.raises(rp.ReparamError, match=r"calibration batch 1 with input shapes \[\(4, 6, 12\)\] does not fit the model \(batch 0 had \[\(4, 6, 16\)\]\)"):
        rp.capture_inputs(m, {"params": params}, [x, x[..., :12]], progress=False)
    with pytest.raises(rp.ReparamError, match=r"found no module input for \['nope/kernel'\]"):
        rp.capture_inputs(m, {"params": params}, [x], paths=["nope/kernel"], progress=False)
    with pytest.raises(rp.ReparamError, match=r"lora_sb needs calib\['grad'\]"):
        rp.plan([(r"head/kernel", rp.lora_xs(2, basis="gradient"))], params).init(
            jax.random.key(0), params, calib={"head/kernel": {"grad": jnp.ones((3, 3))}})


def test_add_refuses_a_non_additive_part():
    with pytest.raises(rp.ReparamError, match=r"dora.*not additive"):
        rp.add(rp.lora(2), rp.dora(2))


# --- calibration statistics are what the math says --------------------------------------------------------
def test_capture_inputs_covariances(block):
    m, params, x = block
    calib = rp.capture_inputs(m, {"params": params}, [x, 2 * x], progress=False)
    xs = jnp.concatenate([x, 2 * x]).reshape(-1, 16)
    np.testing.assert_allclose(calib["query/kernel"]["cov"], xs.T @ xs / xs.shape[0], rtol=1e-5)
    assert calib["query/kernel"]["n"] == 2 * 4 * 6
    assert calib["out/kernel"]["cov"].shape == (32, 32)
    # conv: the captured patches P satisfy conv(x) = P @ kernel.reshape(-1, c_out), so C = PᵀP/N
    q = x @ params["query"]["kernel"].reshape(16, 32) + params["query"]["bias"].reshape(32)
    q = q @ params["out"]["kernel"].reshape(32, 16) + params["out"]["bias"]          # the conv's input
    patches = rp.calibrate._patches(q, params["conv"]["kernel"].shape, nn.Conv(16, (3,)))
    conv = nn.Conv(16, (3,)).apply({"params": params["conv"]}, q)
    np.testing.assert_allclose(patches @ params["conv"]["kernel"].reshape(48, 16), conv, rtol=1e-4, atol=1e-5)
    assert calib["conv/kernel"]["cov"].shape == (48, 48)


def test_capture_grads_is_the_mean_gradient():
    params = {"w": jnp.arange(6.0).reshape(2, 3)}
    loss = lambda p, b: jnp.sum(p["w"] * b)
    g = rp.capture_grads(loss, params, [jnp.ones((2, 3)), 3 * jnp.ones((2, 3))], paths=["w"], progress=False)
    np.testing.assert_allclose(g["w"]["grad"], 2 * jnp.ones((2, 3)))


# --- method facts -------------------------------------------------------------------------------------------
def test_corda_with_identity_covariance_is_pissa():
    w = jax.random.normal(jax.random.key(0), (10, 7))
    f1, t1 = rp.corda(3, damp=0.0).init(None, w, {"cov": jnp.eye(10)})
    f2, t2 = rp.pissa(3).init(None, w)
    np.testing.assert_allclose(f1["base"], f2["base"], atol=1e-5)
    np.testing.assert_allclose(jnp.abs(t1["A"]), jnp.abs(t2["A"]), atol=1e-5)
    fk, tk = rp.corda(3, mode="kpm", damp=0.0).init(None, w, {"cov": jnp.eye(10)})
    fm, tm = rp.milora(3).init(None, w)
    np.testing.assert_allclose(fk["base"], fm["base"], atol=1e-5)


def test_eva_takes_the_top_input_directions_and_allocates_ranks():
    c = jnp.diag(jnp.array([1.0, 9.0, 4.0, 0.1]))
    _, t = rp.eva(2).init(None, jnp.ones((4, 3)), {"cov": c})
    np.testing.assert_allclose(jnp.abs(t["A"]), jnp.eye(4)[:, [1, 2]], atol=1e-6)
    calib = {"a": {"cov": jnp.diag(jnp.array([10.0, 0.1, 0.1, 0.1]))},      # one dominant direction
             "b": {"cov": jnp.eye(4)}}                                        # flat spectrum
    ranks = {p: c["rank"] for p, c in rp.eva_allocate(calib, rank=2, rho=2).items()}
    assert ranks == {"a": 1, "b": 3}
    with pytest.raises(rp.ReparamError, match=r"eva_allocate: rho=0.5 must be a finite number >= 1"):
        rp.eva_allocate(calib, 2, rho=0.5)


def test_dylora_eval_rank_truncates_and_training_samples_a_prefix():
    w = jnp.zeros((6, 5))
    f, t = rp.dylora(4, alpha=4, eval_rank=2).init(jax.random.key(0), w)
    t = perturb(t, jax.random.key(1))
    full = rp.dylora(4, alpha=4).apply(f, t)
    two = rp.dylora(4, alpha=4, eval_rank=2).apply(f, t)
    np.testing.assert_allclose(two, (4 / 2) * t["A"][:, :2] @ t["B"][:2], rtol=1e-6)
    np.testing.assert_allclose(full, t["A"] @ t["B"], rtol=1e-6)
    sampled = {float(jnp.linalg.matrix_rank(rp.dylora(4).apply(f, t, rng=jax.random.key(i)))) for i in range(20)}
    assert sampled == {1.0, 2.0, 3.0, 4.0}


def test_sorsa_penalty_is_zero_at_init_and_positive_after():
    w = jax.random.normal(jax.random.key(0), (12, 9))
    t = rp.sorsa(4, gamma=1.0)
    f, tr = t.init(None, w)
    assert float(t.penalty(f, tr)) < 1e-7        # f32 round-off of the SVD factors
    assert float(t.penalty(f, perturb(tr, jax.random.key(1)))) > 1e-3


def test_randomized_svd_matches_exact_on_a_decaying_spectrum():
    u, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(0), (60, 40)))
    v, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(1), (40, 40)))
    w = (u * 0.7 ** jnp.arange(40)) @ v.T
    ue, se, vte = rp.truncated_svd(w, 5)
    ur, sr, vtr = rp.truncated_svd(w, 5, niter=2, key=jax.random.key(2))
    np.testing.assert_allclose(sr, se, rtol=1e-5)
    np.testing.assert_allclose((ur * sr) @ vtr, (ue * se) @ vte, atol=1e-5)


# --- mixed precision and training ---------------------------------------------------------------------------
def test_bf16_base_with_f32_adapters_trains():
    k = jax.random.split(jax.random.key(0), 4)
    params = {"l1": {"kernel": jax.random.normal(k[0], (16, 32)) / 4}, "l2": {"kernel": jax.random.normal(k[1], (32, 4)) / 6}}
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), params)
    x = jax.random.normal(k[2], (64, 16)).astype(jnp.bfloat16)
    y = jax.random.randint(k[3], (64,), 0, 4)
    plan = rp.plan([(r"l1/kernel", rp.pissa(4)), (r"l2/kernel", rp.dora(4))], params)
    frozen, trainable = plan.init(jax.random.key(1), params)
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(trainable))
    assert frozen["l1"]["kernel"]["base"].dtype == jnp.bfloat16
    applied = plan.apply(frozen, trainable)
    assert applied["l1"]["kernel"].dtype == jnp.bfloat16 and applied["l2"]["kernel"].dtype == jnp.bfloat16

    def loss_fn(p, batch, rng):
        logits = jnp.tanh(batch[0] @ p["l1"]["kernel"]) @ p["l2"]["kernel"]
        return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch[1]).mean()

    opt = optax.adam(3e-2)
    step = rp.train.make_train_step(plan, loss_fn, opt)
    state = rp.train.init_state(trainable, opt, jax.random.key(2))
    losses = []
    for _ in range(30):
        state, m = step(state, frozen, (x, y))
        losses.append(float(m["loss"]))
    assert np.isfinite(losses).all() and losses[-1] < 0.8 * losses[0]
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(state.trainable))


def test_caller_params_survive_donation():
    params = {"head": {"kernel": jnp.ones((4, 2))}}
    plan = rp.plan([(r"head/.*", rp.full())], params)
    frozen, trainable = plan.init(jax.random.key(0), params)
    opt = optax.sgd(0.1)
    step = rp.train.make_train_step(plan, lambda p, b, r: jnp.sum(p["head"]["kernel"] ** 2), opt)
    step(rp.train.init_state(trainable, opt, jax.random.key(0)), frozen, None)
    assert float(params["head"]["kernel"].sum()) == 8.0


def test_summary_lists_rules_and_totals(block):
    _, params, _ = block
    plan = rp.plan([(r"query/kernel", rp.lora(4)), (r"head/.*", rp.full())], params)
    s = plan.summary()
    assert "query/kernel" in s and "lora(r=4)" in s and "rule 1: 'head/.*' -> full: 2 leaves, 85 trainable" in s
    n_total = sum(a.size for a in jax.tree_util.tree_leaves(params))
    assert f"total: {4 * (16 + 32) + 85:,} trainable of {n_total:,} base params" in s


def _mlp_params(dims=(12, 16, 16)):
    keys = jax.random.split(jax.random.key(0), len(dims) - 1)
    return {f"dense_{i}": {"kernel": jax.random.normal(k, (a, b))} for i, (a, b, k) in
            enumerate(zip(dims[:-1], dims[1:], keys))}


# --- trainables shared by every leaf of a rule (Compacter's S_i) -------------------------------------------
def _gain_lora(rank):
    """ΔW = g · A@B with one gain ``g`` shared by all leaves of the rule."""
    base = rp.lora(rank)
    return base._replace(name="gain_lora", shared=lambda key: {"g": jnp.ones(())},
                         apply=lambda f, t, shared: f["base"] + shared["g"] * (t["A"] @ t["B"]),
                         delta=lambda f, t, shared: shared["g"] * (t["A"] @ t["B"]))


def test_shared_trainables_live_once_and_reach_every_leaf():
    params = _mlp_params()
    plan = rp.plan([(r"dense_[01]/kernel", _gain_lora(2))], params)
    frozen, trainable = plan.init(jax.random.key(0), params)
    assert "shared" in trainable["dense_0"]["kernel"] and "shared" not in trainable["dense_1"]["kernel"]
    assert sum(plan.trainable_counts(trainable)) == sum(plan.trainable_counts()) == 2 * (12 + 16) + 2 * (16 + 16) + 1
    tr = perturb(trainable, jax.random.key(1))
    out = plan.apply(frozen, tr)
    g = tr["dense_0"]["kernel"]["shared"]["g"]
    for layer in ("dense_0", "dense_1"):
        t = tr[layer]["kernel"]
        np.testing.assert_allclose(out[layer]["kernel"], params[layer]["kernel"] + g * t["A"] @ t["B"], rtol=1e-6)
    # the shared gain's gradient sums the contributions of both layers
    loss = lambda t: sum(jnp.sum(plan.apply(frozen, t)[layer]["kernel"]) for layer in ("dense_0", "dense_1"))
    grad = jax.grad(loss)(tr)["dense_0"]["kernel"]["shared"]["g"]
    expected = sum(jnp.sum(tr[layer]["kernel"]["A"] @ tr[layer]["kernel"]["B"]) for layer in ("dense_0", "dense_1"))
    np.testing.assert_allclose(grad, expected, rtol=1e-5)


def test_shared_trainables_on_stacked_layers_are_not_vmapped():
    m = Stacked()
    params = m.init(jax.random.key(1), jnp.ones((2, 12)))["params"]
    plan = rp.plan([(r".*dense/kernel", rp.on_axes(_gain_lora(2), batch_axes=(0,)))], params)
    frozen, trainable = plan.init(jax.random.key(2), params)
    assert trainable["layers"]["dense"]["kernel"]["shared"]["g"].shape == ()
    tr = perturb(trainable, jax.random.key(3))
    w = plan.apply(frozen, tr)["layers"]["dense"]["kernel"]
    t = tr["layers"]["dense"]["kernel"]
    np.testing.assert_allclose(w, params["layers"]["dense"]["kernel"] + t["shared"]["g"] * t["A"] @ t["B"], rtol=1e-5)


def test_weight_shaped_calibration_follows_the_matrix_view(block):
    m, params, x = block
    plan = rp.plan([(r"query/kernel", rp.sparse.sensitivity(k=5)), (r"out/kernel", rp.lora_xs(2, basis="gradient"))],
                   params)
    loss = lambda p, b: jnp.sum(m.apply({"params": p}, b) ** 2)
    calib = rp.capture_grads(loss, params, [x], paths=list(plan.calibrated()), progress=False)
    assert calib["query/kernel"]["grad"].shape == (16, 4, 8)          # the kernel's own shape
    frozen, trainable = plan.init(jax.random.key(0), params, calib=calib)
    g = calib["query/kernel"]["grad"].reshape(16, 32)
    top = np.sort(np.argsort(-np.abs(np.asarray(g)).ravel())[:5])
    np.testing.assert_array_equal(frozen["query"]["kernel"]["idx"], top)
    assert rel_err(plan.apply(frozen, trainable)["out"]["kernel"], params["out"]["kernel"]) < 1e-5


def test_transform_identity_is_structured(tmp_path):
    """A transform's method and hyperparameters are fields (read by interop and sharding), not parsed text."""
    t = rp.lora(8, alpha=16)
    assert (t.ident.method, t.ident.hparams, t.name) == ("lora", {"r": 8, "alpha": 16}, "lora(r=8, alpha=16)")
    assert rp.on_axes(t, batch_axes=(0,)).ident.hparams == {"r": 8, "alpha": 16}
    assert rp.lora(4, rslora=True).ident.method == "rslora" and rp.full().ident.method == "full"
    both = rp.add(rp.lora(2), rp.sparse.random(density=0.1))
    assert both.ident.method == "add" and [p.method for p in both.ident.hparams["parts"]] == ["lora", "sparse.random"]
    assert rp.waveft(k=20).ident.method == "waveft" and rp.waveft(k=20).ident.hparams["k"] == 20
    # a display name that says otherwise changes nothing: PEFT export reads the fields
    renamed = t._replace(name=rp.core.Ident("lora", r=8, alpha=16, text="my adapter"))
    params = {"q": {"kernel": jnp.ones((16, 8))}}
    plan = rp.plan([(r"q/kernel", renamed)], params)
    frozen, trainable = plan.init(jax.random.key(0), params)
    cfg = rp.interop.peft.export(plan, frozen, trainable, str(tmp_path), module_map={"q/kernel": "q"})
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["lora_alpha"] == 16


@pytest.mark.parametrize("make, message", [
    (lambda: rp.lora(0), r"lora: r=0 must be a positive int"),
    (lambda: rp.lora(True), r"lora: r=True must be a positive int"),
    (lambda: rp.lora(4, alpha=-1.0), r"lora: alpha=-1.0 must be a finite number > 0"),
    (lambda: rp.lora(4, alpha=float("nan")), r"lora: alpha=nan must be a finite number > 0"),
    (lambda: rp.dora(0), r"dora: r=0"), (lambda: rp.pissa(-2), r"pissa: r=-2"), (lambda: rp.corda(0), r"corda: r=0"),
    (lambda: rp.dylora(0), r"dylora: r=0"), (lambda: rp.svfit(0), r"svfit: r=0"), (lambda: rp.compacter(4, 0), r"compacter: r=0"),
    (lambda: rp.sparse.random(density=0.0), r"sparse.random: density=0.0 must be in \(0, 1\]"),
    (lambda: rp.sparse.random(density=1.5), r"density=1.5 must be in \(0, 1\]"),
    (lambda: rp.fourierft(0), r"fourierft: n=0 must be a positive int"),
    (lambda: rp.waveft(k=True), r"waveft: k=True must be a positive int"),
    (lambda: rp.wara(0), r"wara: r=0"),
    (lambda: rp.pissa(2, niter=-1), r"pissa: niter=-1 must be an int >= 0 \(power iterations\), or None"),
    (lambda: rp.sorsa(2, gamma=-1.0), r"sorsa: gamma=-1.0 must be a finite number >= 0"),
    (lambda: rp.sorsa(2, gamma=float("nan")), r"sorsa: gamma=nan must be a finite number >= 0"),
    (lambda: rp.vera(2, d_init=float("nan")), r"vera: d_init=nan must be a finite number \(e.g. d_init=0.1\)"),
    (lambda: rp.fourierft(10, scale=float("inf")), r"fourierft: s=inf must be a finite non-zero number"),
    (lambda: rp.krona(scale=0.0), r"krona: s=0.0 must be a finite non-zero number"),
    (lambda: rp.sparse.random(k=3, scale=float("nan")), r"sparse.random: scale=nan must be a finite non-zero"),
    (lambda: rp.eva_allocate({}, 0), r"eva_allocate: rank=0 must be a positive int"),
    (lambda: rp.lora(2, rslora="no"), r"rslora: rslora='no' must be True or False"),
    (lambda: rp.dora(2, rslora=1), r"dora: rslora=1 must be True or False"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_hyperparameters_fail_at_construction(make, message):
    """Ranks, counts, alpha and density are checked when the transform is made: the error names the method,
    the argument and what it must be (bool is not a rank)."""
    with pytest.raises(rp.ReparamError, match=message):
        make()


def test_rule_errors_name_the_rule():
    params = {"a": {"kernel": jnp.ones((4, 4))}, "b": {"kernel": jnp.ones((4, 4))}}
    with pytest.raises(rp.ReparamError, match=r"rule 1 \('\(a' -> lora\(r=2\)\): invalid regex: .*\. Fix the regex \(Python re syntax"):
        rp.plan([(r"a/kernel", rp.lora(2)), (r"(a", rp.lora(2))], params)
    with pytest.raises(rp.ReparamError, match=r"rule 1 \('a/kernel' -> lora\(r=2\)\) is shadowed: every path it "
                                              r"matches \(\['a/kernel'\]\) is taken by earlier rule\(s\) \[0\]"):
        rp.plan([(r".*/kernel", rp.lora(4)), (r"a/kernel", rp.lora(2))], params)


@pytest.mark.parametrize("kw, what, axis", [(dict(in_axes=(0,), out_axes=(4, 5)), "out_axes", 4),
                                            (dict(in_axes=(3,), out_axes=(1, 2)), "in_axes", 3),
                                            (dict(batch_axes=(-4,), in_axes=(1,), out_axes=(2,)), "batch_axes", -4)])
def test_on_axes_naming_an_axis_the_kernel_lacks_is_refused(kw, what, axis):
    """Axes beyond the kernel's rank were taken modulo the rank (out_axes=(4, 5) on a 3-D kernel meant (1, 2))."""
    params = {"w": jnp.ones((4, 5, 6))}
    with pytest.raises(rp.ReparamError, match=rf"'w' \(4, 5, 6\).*{what}=.* names axis {axis}, but the kernel has 3"):
        rp.plan([("w", rp.on_axes(rp.lora(2), **kw))], params)
