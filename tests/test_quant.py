"""Quantised bases (reparam.quant): round trips within each format's bound, QLoRA's NF4 table, GGUF blocks
equal to the gguf package's dequantisation, and the errors for bad input."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

import reparam as rp
from reparam import quant

deq = jax.jit(quant.dequantize)
GAP = float(np.max(np.diff(quant.NF4)))       # the widest step between neighbouring NF4 values


def _blocks(w, q):
    """``w`` as ``[*rest, n_blocks, block]``, the layout of ``q``'s scales."""
    x = np.moveaxis(np.asarray(w, np.float64), q.axis, -1)
    return x.reshape(*x.shape[:-1], -1, q.block)


def _bound(w, q):
    """Per block, the largest ``|w - ŵ|`` the format allows (f16 scales: their rounding, 2⁻¹¹ relative, doubled)."""
    x = _blocks(w, q)
    amax, lo, hi = np.abs(x).max(-1), x.min(-1), x.max(-1)
    if q.fmt == "int8":
        return np.asarray(q.scales) / 2 + 1e-6 * amax
    if q.fmt == "nf4":
        s = np.asarray(quant._scales(q), np.float64)
        dq = 0.0 if not quant.is_quantized(q.scales) else float(np.asarray(q.scales.scales).max()) / 2
        return s * GAP / 2 + dq + 1e-6 * amax
    d = np.asarray(q.scales, np.float64)
    if q.fmt == "q8_0":
        return d / 2 + 2 ** -10 * amax
    return d / 2 + 2 ** -10 * (np.abs(lo) + hi - lo)           # q4_1


@settings(max_examples=24, deadline=None)
@given(fmt=st.sampled_from(["int8", "nf4", "nf4+dq", "q8_0", "q4_1"]), k=st.integers(1, 3),
       d_out=st.integers(1, 5), stacked=st.booleans(), seed=st.integers(0, 2 ** 16), log_scale=st.floats(-2, 2))
def test_round_trip_within_the_format_bound(fmt, k, d_out, stacked, seed, log_scale):
    base = fmt.split("+")[0]
    block = {"int8": 7, "nf4": 64, "q8_0": 32, "q4_1": 32}[base]
    shape = (2,) * stacked + (k * block, d_out)
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(shape) * 10.0 ** log_scale).astype(np.float32)
    w[..., :block, 0] = 0.0                     # an all-zero block: no division by a zero scale
    q = quant.quantize_array(w, base, double_quant=fmt.endswith("+dq"))
    assert q.shape == w.shape and q.dtype == np.float32
    err = np.abs(_blocks(np.asarray(deq(q)), q) - _blocks(w, q)).max(-1)
    assert np.all(err <= _bound(w, q)), (fmt, float((err - _bound(w, q)).max()))


def test_layout_and_bytes():
    w = jax.random.normal(jax.random.key(0), (3, 128, 96))
    q = quant.quantize_array(w, "nf4")
    assert q.codes.shape == (3, 96, 2, 32) and q.codes.dtype == jnp.uint8        # two 4-bit codes a byte
    assert q.nbytes == w.size // 2 + 4 * w.size // 64                            # 4.5 bits a weight
    dq = quant.quantize_array(w, "nf4", double_quant=True)
    assert dq.nbytes < 0.131 * w.nbytes                                          # 4.127 bits (+ padding)
    layer = jax.tree.map(lambda a: a[1], dq)                                     # a scanned layer's slice
    np.testing.assert_array_equal(deq(layer), deq(dq)[1])
    t = quant.transpose(quant.quantize_array(w[0].T, "q4_1", axis=-1))
    assert t.shape == (128, 96) and t.axis == -2


def test_nf4_values_are_qloras_table():
    """QLoRA's construction (bitsandbytes ``create_normal_map(offset=0.9677083)``): 8 positive and 7 negative
    quantiles of N(0, 1) and a zero, scaled to [-1, 1]."""
    from scipy.stats import norm
    offset = 0.9677083
    pos = norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
    neg = -norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
    v = np.sort(np.concatenate([pos, [0.0], neg]))
    np.testing.assert_allclose(quant.NF4, v / v.max(), atol=2e-7)
    assert quant.NF4[7] == 0.0 and quant.NF4[0] == -1.0 and quant.NF4[-1] == 1.0


@pytest.fixture(scope="module")
def smollm2():
    import gguf
    from experiments.models import llama
    reader = llama.read_gguf(llama.smollm2_path())
    return gguf, {t.name: t for t in reader.tensors}


@pytest.mark.parametrize("name", ["token_embd.weight", "blk.0.attn_k.weight", "blk.3.ffn_down.weight"])
def test_gguf_blocks_equal_the_gguf_package(smollm2, name):
    gguf, tensors = smollm2
    t = tensors[name]
    q = quant.from_gguf_tensor(t)
    assert q.fmt == {"Q8_0": "q8_0", "Q4_1": "q4_1"}[t.tensor_type.name]
    assert q.nbytes == t.data.nbytes                           # the file's blocks, as they are
    np.testing.assert_array_equal(deq(q), gguf.quants.dequantize(t.data, t.tensor_type))


# --- bad input --------------------------------------------------------------------------------------------
def test_unknown_format():
    with pytest.raises(rp.ReparamError, match=r"'layer/kernel'.*unknown format 'nf3'.*nf4"):
        quant.quantize({"layer": {"kernel": jnp.ones((64, 8))}}, "nf3")


def test_block_that_does_not_divide():
    with pytest.raises(rp.ReparamError, match=r"'layer/kernel' \(96, 8\): nf4 blocks of 64 .*length 96.*block="):
        quant.quantize({"layer": {"kernel": jnp.ones((96, 8))}}, "nf4")


def test_integer_leaf():
    params = {"layer": {"kernel": jnp.ones((64, 8))}, "ids": jnp.arange(64).reshape(8, 8)}
    assert quant.quantize(params, "int8")["ids"] is params["ids"]          # the default leaves it out
    with pytest.raises(rp.ReparamError, match=r"'ids' \(8, 8\) has dtype int32.*narrow `where`"):
        quant.quantize(params, "int8", where=r"ids")


def test_where_that_matches_nothing():
    with pytest.raises(rp.ReparamError, match=r"matches no parameter path.*layer/kernel"):
        quant.quantize({"layer": {"kernel": jnp.ones((64, 8))}}, "nf4", where=r"kernel")


def test_unsupported_gguf_type():
    import gguf
    t = types.SimpleNamespace(name="blk.0.attn_q.weight", tensor_type=gguf.GGMLQuantizationType.Q4_K,
                              shape=np.array([256, 4]), data=np.zeros((4, 144), np.uint8))
    with pytest.raises(rp.ReparamError, match=r"'blk.0.attn_q.weight' has type Q4_K.*Q4_1.*gguf.quants.dequantize"):
        quant.from_gguf_tensor(t)


# --- a quantised base under a plan --------------------------------------------------------------------------
def _mlp():
    k = jax.random.split(jax.random.key(0), 4)
    params = {"l1": {"kernel": jax.random.normal(k[0], (64, 64)) / 8, "bias": jnp.zeros(64)},
              "l2": {"kernel": jax.random.normal(k[1], (64, 4)) / 8}}
    x = jax.random.normal(k[2], (32, 64))
    y = jax.random.randint(k[3], (32,), 0, 4)
    return params, (x, y)


def _loss(p, batch, rng):
    logits = jnp.tanh(batch[0] @ p["l1"]["kernel"] + p["l1"]["bias"]) @ p["l2"]["kernel"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()


METHODS = {"lora": rp.lora(4), "dora": rp.dora(4), "pissa": rp.pissa(4), "vera": rp.vera(4), "lokr": rp.lokr(4),
           "sparse.random": rp.sparse.random(density=0.05)}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_on_an_nf4_base(name):
    """A fresh adapter leaves the dequantised base (PiSSA: its residual re-quantised, within nf4's bound of it);
    merge equals apply; the train step on the quantised base equals the step on its dequantised copy and
    lowers the loss; the untouched quantised leaf (l2) is dequantised by apply."""
    params, batch = _mlp()
    q = quant.quantize(params, "nf4")                                # both kernels; the bias stays f32
    w0 = quant.dequantize(q)
    plan = rp.plan([(r"l1/kernel", METHODS[name])], q)
    frozen, trainable = plan.init(jax.random.key(1), q)
    assert quant.is_quantized(frozen["l1"]["kernel"]["base"]) and quant.is_quantized(frozen["l2"]["kernel"]["base"])
    out = plan.apply(frozen, trainable)
    np.testing.assert_array_equal(out["l2"]["kernel"], w0["l2"]["kernel"])
    if name == "pissa":         # W_res = W0 - A@B re-quantised: off W0 by at most nf4's error on W_res
        res = w0["l1"]["kernel"] - trainable["l1"]["kernel"]["A"] @ trainable["l1"]["kernel"]["B"]
        err = jnp.abs(out["l1"]["kernel"] - w0["l1"]["kernel"]).max()
        assert 0 < err <= GAP / 2 * jnp.abs(res).max() * 1.001
    else:
        np.testing.assert_array_equal(out["l1"]["kernel"], w0["l1"]["kernel"])
    merged = plan.merge(frozen, trainable)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), merged, out)

    opt = optax.adam(3e-2)
    step = rp.train.make_train_step(plan, _loss, opt, donate=False)
    states = {}
    for kind, fr in (("quantised", frozen), ("dequantised", quant.dequantize(frozen))):
        state = rp.train.init_state(trainable, opt, jax.random.key(2))
        losses = []
        for _ in range(8):
            state, m = step(state, fr, batch)
            losses.append(float(m["loss"]))
        states[kind] = (state, losses)
    (sq, lq), (sd, ld) = states["quantised"], states["dequantised"]
    assert lq[-1] < lq[0], lq
    np.testing.assert_allclose(lq, ld, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), sq.trainable, sd.trainable)


def test_qpissa_error_below_nf4():
    """QPiSSA (Meng et al. 2024, §5): the principal r components in full precision, the residual in nf4, is
    closer to the full-precision weight than plain nf4 -- on SmolLM2's own q projection (measured: 0.54×
    at r=16). The plan initialises from the f32 weight; the frozen residual is then quantised."""
    w = jax.random.normal(jax.random.key(0), (256, 128)) @ jnp.diag(1.0 / jnp.arange(1, 129) ** 0.5) @ \
        jax.random.orthogonal(jax.random.key(1), 128) + 0.05 * jax.random.normal(jax.random.key(2), (256, 128))
    params = {"w": w}
    plan = rp.plan([("w", rp.pissa(16))], params)
    frozen, trainable = plan.init(jax.random.key(3), params)
    frozen = quant.quantize(frozen, "nf4", where=r"w/base")
    qpissa = jnp.linalg.norm(w - plan.apply(frozen, trainable)["w"])
    nf4 = jnp.linalg.norm(w - quant.dequantize(quant.quantize_array(w, "nf4")))
    assert qpissa < 0.8 * nf4, (float(qpissa), float(nf4))


def test_summary_shows_formats_and_bytes():
    params, _ = _mlp()
    q = quant.quantize(params, "nf4", where=r"l1/kernel")
    plan = rp.plan([(r"l1/kernel", rp.lora(4))], q)
    frozen, trainable = plan.init(jax.random.key(0), q)
    text = plan.summary(trainable, frozen=frozen)
    assert "nf4 2,304 B" in text                                     # 64·64/2 codes + 64 f32 scales
    assert "frozen: 3,584 bytes (nf4: 1 arrays, 2,304 bytes (0.141 of f32); unquantised: 2 arrays, 1,280 bytes)" in text


def test_smollm2_blocks_dequantise_to_the_f32_loader(smollm2):
    """``gguf_params(blocks=True)``: the file's Q4_1 / Q8_0 blocks, q/k rows unpermuted block-wise and kernels
    transposed without touching a code, dequantise to exactly what the f32 loader gives (stacked layers:
    ``jax.tree.map(np.stack, ...)`` over the layers' QArrays)."""
    from experiments.models import llama
    reader = llama.read_gguf(llama.smollm2_path())
    cfg = llama.gguf_config(reader, layers=2, scan=True)
    blocks, dense = llama.gguf_params(reader, cfg, blocks=True), llama.gguf_params(reader, cfg)
    kernels = [x for x in jax.tree.leaves(blocks, is_leaf=quant.is_quantized) if quant.is_quantized(x)]
    assert len(kernels) == 1 + 7 and {k.fmt for k in kernels} == {"q4_1", "q8_0"}
    assert kernels[1].shape[0] == 2 and kernels[1].axis == -2                 # [layers, d_in, d_out] kernels
    jax.tree.map(np.testing.assert_array_equal, deq(blocks), dense)


def test_weight_deltas_on_a_quantised_base():
    params, _ = _mlp()
    q = quant.quantize(params, "nf4")
    plan = rp.plan([(r"l1/kernel", rp.lora(4))], q)
    frozen, trainable = plan.init(jax.random.key(0), q)
    trainable = jax.tree.map(lambda a: a + 0.1, trainable)
    d = rp.weight_deltas(plan, frozen, trainable)["l1/kernel"]
    np.testing.assert_allclose(d, (trainable["l1"]["kernel"]["A"] @ trainable["l1"]["kernel"]["B"]), atol=1e-5)


# --- the hot path on a quantised base --------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["linen", "linen_scan", "nnx", "nnx_scan", "function"])
def test_every_model_form_trains_on_an_nf4_base_like_autodiff(form):
    """The decoder of the hot-path tests in each form, its projections in nf4 (blocks of 8 along the last axis)
    and one method per projection (lora, dora, pissa -- its residual re-quantised --, vera, lokr, sparse,
    lora + sparse): two hot-path steps equal plain autodiff on the same quantised base to 1e-5, every use is
    routed, and the LoRA step forms no xᵀg (autodiff's does: the check can fail)."""
    from experiments.models import decoder_forms as D
    from tests.test_route import CFG, METHODS as ROUTE_METHODS, _run, _weight_grads
    params, loss, rules_for = D.make(form, CFG)
    names = D.PROJ[form]
    t = {name: ROUTE_METHODS[m]() for name, m in zip(names, ("lora", "dora", "pissa", "vera", "lokr", "sparse"))}
    t.update({name: ROUTE_METHODS["lora+sparse"]() for name in names[6:]})
    where = "|".join(f"(?:{r})" for r, _ in rules_for(t))
    q = quant.quantize(params, "nf4", where=where, block=8, axis=-1)
    plan = rp.plan(rules_for(t), q)
    frozen, trainable = plan.init(jax.random.key(1), q)
    assert all(quant.is_quantized(frozen_leaf["base"]) for frozen_leaf, leaf in
               zip(plan.treedef.flatten_up_to(frozen), plan.leaves) if leaf.transform is not None)
    trainable = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(2), a.shape, a.dtype)
                             if jnp.issubdtype(a.dtype, jnp.floating) else a, trainable)
    ref_losses, ref, _ = _run(plan, loss, frozen, trainable, "autodiff")
    losses, got, step = _run(plan, loss, frozen, trainable, "auto")
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    assert set(step.routing.uses) == set(plan.adapted()) and not step.routing.fallbacks(), step.routing.report()

    lplan = rp.plan(rules_for(rp.lora(4)), q)
    lfrozen, ltrainable = lplan.init(jax.random.key(1), q)
    assert _weight_grads(lplan, loss, lfrozen, ltrainable, "autodiff")
    assert not _weight_grads(lplan, loss, lfrozen, ltrainable, "auto")


@pytest.mark.slow
def test_minilm_lora_step_on_an_nf4_base_holds_no_f32_copy_of_it():
    """MiniLM, LoRA r=8 on its 36 attention and feed-forward kernels in nf4, a batch of 2 x 16 tokens (so that the
    weights, not the activations, dominate): XLA's memory estimate of the compiled step (arguments + temporaries)
    is below the f32 model's size, its temporaries exceed the f32-base step's by less than two f32 kernels (one
    layer's weight at a time, never the whole base: 42.5 MB), and it has no xᵀg dot."""
    import re

    from experiments.configs.tweets import ADAPTED
    from experiments.models import bert
    from reparam.plan import path_str
    from tests.hlo import dot_shapes
    clf, params, _ = bert.minilm_classifier(jax.random.key(0), n_classes=3)
    ids, mask = jnp.ones((2, 16), jnp.int32), jnp.ones((2, 16), jnp.int32)
    batch = (ids, mask, jnp.zeros((2,), jnp.int32))

    def loss(p, b, rng=None):
        return optax.softmax_cross_entropy_with_integer_labels(clf.apply({"params": p}, b[0], b[1]), b[2]).mean()
    rules = [(ADAPTED, rp.lora(8, alpha=16)), (r"head/.*", rp.full())]
    opt = optax.adamw(1e-3)
    stats = {}
    for name, base in (("f32", params), ("nf4", quant.quantize(params, "nf4", where=ADAPTED))):
        plan = rp.plan(rules, base)
        frozen, trainable = plan.init(jax.random.key(1), base)
        step = rp.train.make_train_step(plan, loss, opt, donate=False)
        compiled = step.lower(rp.train.init_state(trainable, opt, jax.random.key(2)), frozen, batch).compile()
        m = compiled.memory_analysis()
        xtg = [d for d in dot_shapes(compiled.as_text()) if 32 in d[1] and len(d[0]) == 2 and min(d[0]) >= 384]
        stats[name] = (m.argument_size_in_bytes, m.temp_size_in_bytes, xtg)
    kernels = [a for kp, a in jax.tree_util.tree_leaves_with_path(params) if re.fullmatch(ADAPTED, path_str(kp))]
    f32_model = sum(a.size * 4 for a in jax.tree.leaves(params))
    largest = max(a.size * 4 for a in kernels)
    (_, temp_f32, _), (args, temp, xtg) = stats["f32"], stats["nf4"]
    assert args + temp < f32_model, (args, temp, f32_model)
    assert temp - temp_f32 < 2 * largest, (temp, temp_f32, largest)
    assert not xtg and not stats["f32"][2], xtg


@pytest.mark.parametrize("name", sorted(__import__("tests.methods", fromlist=["METHODS"]).METHODS))
def test_every_registered_method_on_an_nf4_base(name):
    """Every method of every family (tests/methods*.py) on an nf4 base ``[64, 48]`` at rank 4: the fresh adapter
    leaves the dequantised base (to the method's own init tolerance; a method that rewrites the base -- the
    SVD family's residual, re-quantised -- to within nf4's error); merge equals apply; five Adam steps of the
    hot-path train step on the quantised base lower the loss."""
    from tests import methods as M
    factory, _, tol = M.METHODS[name][:3]
    d_in, d_out, r = 64, 48, 4
    if not M.valid(name, d_in, d_out, r):
        d_in, d_out = 64, 64
    assert M.valid(name, d_in, d_out, r), name
    k = jax.random.split(jax.random.key(0), 3)
    w = jnp.asarray(M.normal(k[0], (d_in, d_out), 1 / 8))
    q = {"w": quant.quantize_array(w, "nf4")}
    w0 = quant.dequantize(q["w"])
    t = factory(r)
    plan = rp.plan([("w", t)], q)
    frozen, trainable = plan.init(k[1], q, M.calib_for(t, "w", w0, k[2]))
    out = plan.apply(frozen, trainable)["w"]
    if quant.is_quantized(frozen["w"].get("base")) and frozen["w"]["base"] is not q["w"]:   # re-quantised residual
        assert float(jnp.abs(out - w0).max()) <= GAP / 2 * float(jnp.abs(w0).max()) * 1.5
    else:
        np.testing.assert_allclose(out, w0, atol=max(tol, 1e-6) * float(jnp.abs(w0).max()) * 10)
    np.testing.assert_allclose(plan.merge(frozen, trainable)["w"], out, atol=1e-6)

    x = jnp.asarray(M.normal(k[2], (32, d_in)))
    target = jnp.asarray(M.normal(k[0], (32, d_out)))
    loss = lambda p, b, rng: jnp.mean((b @ p["w"] - target) ** 2)
    opt = optax.adam(1e-2)
    step = rp.train.make_train_step(plan, loss, opt, donate=False)
    state = rp.train.init_state(trainable, opt, jax.random.key(2))
    losses = []
    for _ in range(5):
        state, m = step(state, frozen, x)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0], losses


def test_default_where_leaves_norms_and_embeddings_out():
    """Without ``where``: the weight matrices only -- a stacked norm scale ``[layers, d]`` and the embedding table
    have two dims but stay as they are."""
    params = {"embed": {"embedding": jnp.ones((32, 64))}, "layers": {"attn_norm": {"scale": jnp.ones((2, 64))},
              "q": {"kernel": jnp.ones((2, 64, 64))}}}
    q = quant.quantize(params, "nf4")
    assert quant.is_quantized(q["layers"]["q"]["kernel"])
    assert q["embed"]["embedding"] is params["embed"]["embedding"]
    assert q["layers"]["attn_norm"]["scale"] is params["layers"]["attn_norm"]["scale"]


@pytest.mark.parametrize("fmt, kw", [("nf4", {}), ("nf4", {"double_quant": True}), ("int8", {}), ("q4_1", {})],
                         ids=["nf4", "nf4+dq", "int8", "q4_1"])
def test_merge_requantized_is_within_the_format_bound_of_the_merge(fmt, kw):
    """``plan.merge(..., requantize=True)``: each adapted leaf's merged weight in its base's own format (block,
    axis, double quantisation), dequantising within that format's bound of the full-precision merge -- and
    not the base's codes again (the adapter moved it); an unadapted quantised leaf is its base, untouched."""
    params, _ = _mlp()
    q = quant.quantize(params, fmt, **kw)
    plan = rp.plan([(r"l1/kernel", rp.lora(4))], q)
    frozen, trainable = plan.init(jax.random.key(0), q)
    trainable = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(1), a.shape), trainable)
    merged = plan.merge(frozen, trainable)
    mq = plan.merge(frozen, trainable, requantize=True)
    base, got = frozen["l1"]["kernel"]["base"], mq["l1"]["kernel"]
    assert quant.is_quantized(got) and (got.fmt, got.block, got.axis) == (base.fmt, base.block, base.axis)
    assert quant.is_quantized(got.scales) == quant.is_quantized(base.scales)
    assert not np.array_equal(got.codes, base.codes)
    w = np.asarray(merged["l1"]["kernel"])
    err = np.abs(_blocks(np.asarray(deq(got)), got) - _blocks(w, got)).max(-1)
    assert np.all(err <= _bound(w, got)), float((err - _bound(w, got)).max())
    assert mq["l2"]["kernel"] is frozen["l2"]["kernel"]["base"]
    np.testing.assert_array_equal(mq["l1"]["bias"], merged["l1"]["bias"])


def test_report_counts_a_prng_key():
    """VeRA's frozen entry holds its PRNG key: the byte count takes it (8 bytes) as it does any array."""
    params, _ = _mlp()
    q = quant.quantize(params, "nf4", where=r"l1/kernel")
    plan = rp.plan([(r"l1/kernel", rp.vera(4))], q)
    frozen, trainable = plan.init(jax.random.key(0), q)
    assert quant.footprint(frozen)["unquantised"] == [3, 64 * 4 + 64 * 4 * 4 + 8, 4 * (64 + 64 * 4 + 1)]
    assert "frozen: 3,592 bytes (nf4: 1 arrays, 2,304 bytes" in plan.summary(trainable, frozen=frozen)
