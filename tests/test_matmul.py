"""The hot path: structures, the custom-VJP matmul, the LayerNorm barrier and routing Flax modules.

Every path must give the values and gradients of plain autodiff through the materialised weight
(to 1e-5), and the compiled step must not contain the full weight gradient xᵀg.
"""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

import reparam as rp
from reparam import matmul as mm
from reparam import sampled
from reparam import structure as S, views
from tests.hlo import dot_shapes
from tests.methods import METHODS, calib_for, normal, perturb


def _structures(seed, d_in, d_out):
    """One structure of every kind (and a sum) for a d_in x d_out weight (d_in, d_out even). numpy draws
    the arrays: jax.random would compile once per shape, most of a hypothesis example's time."""
    g = np.random.default_rng(seed)
    draw = lambda *shape: jnp.asarray(g.standard_normal(shape).astype(np.float32))
    lr = S.LowRank(draw(d_in, 3), draw(3, d_out))
    kr = S.Kron(draw(2, 2, 2), draw(2, d_in // 2, d_out // 2))
    n = d_in * d_out
    idx = jnp.asarray(np.sort(g.choice(n, max(1, n // 5), replace=False)).astype(np.int32))
    sp = S.Sparse(idx, draw(*idx.shape), d_out)
    return {"lowrank": lr, "kron": kr, "sparse": sp, "sum": S.Sum((lr, sp)),
            # separable bases: complex (Fourier, 2N real rows) around a sum, real (Haar) around sparse
            "fourier": S.InBasis(S.Sum((lr, sp)), 7.0, rp.fourier_basis()),
            "haar": S.InBasis(sp, 0.5, rp.wavelet_basis("haar"))}


@settings(max_examples=3, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6), st.integers(1, 9), st.integers(0, 2 ** 16))
def test_matvec_equals_dense(hi, ho, n, seed):
    """x @ dense(s) == matvec(s, x) for every structure and shape."""
    d_in, d_out = 2 * hi, 2 * ho
    x = jnp.asarray(normal(seed, (n, d_in)))
    for name, s in _structures(seed + 1, d_in, d_out).items():
        np.testing.assert_allclose(S.matvec(s, x), x @ S.dense(s, (d_in, d_out)), atol=1e-4, rtol=1e-4,
                                   err_msg=name)
        np.testing.assert_allclose(S.dense_t(s, (d_in, d_out)), S.dense(s, (d_in, d_out)).T, atol=1e-5,
                                   rtol=1e-5, err_msg=name)
        per_token, form = S.costs(s, (d_in, d_out))
        assert per_token > 0 and form > 0


def test_grad_probe_is_a_trained_array_of_the_gradient():
    """What the backward's weight waits for (``reparam.matmul._tied``): one array of the structure's own gradient,
    for every kind, and for low rank the trained factor's, never a frozen one's cotangent (which XLA drops)."""
    x, g = jnp.asarray(normal(0, (5, 6))), jnp.asarray(normal(1, (5, 4)))
    pull = lambda s: s.pullback(x, g, S._lazy(lambda: x.T @ g))            # noqa: E731
    for name, s in _structures(2, 6, 4).items():
        d = pull(s)
        assert any(S.grad_probe(s, d) is leaf for leaf in jax.tree.leaves(d)), name
    kinds = _structures(2, 6, 4)
    for frozen, trained in (("", "l"), ("l", "r"), ("r", "l")):
        s = kinds["lowrank"].replace(frozen=frozen)
        d = pull(s)
        assert S.grad_probe(s, d) is getattr(d, trained), frozen
        assert S.grad_probe(S.Sum((s, kinds["sparse"])), S.Sum((d, pull(kinds["sparse"])))) is getattr(d, trained)


def _weight(base, s):
    """The effective weight, plainly: ``base + ΔW``, or ``(base + inner) · c`` for ``Scaled`` (DoRA)."""
    if isinstance(s, S.Scaled):
        return (base + S.dense(s.inner, base.shape)) * s.c
    return base + S.dense(s, base.shape)


def _assert_same(got, ref, x, s, g):
    """``got(x, s)`` and its gradients (w.r.t. x and every float structure array, at cotangent g) equal ``ref``'s."""
    np.testing.assert_allclose(got(x, s), ref(x, s), atol=1e-5, rtol=1e-5)
    gr = jax.grad(lambda x, s: jnp.sum(ref(x, s) * g), argnums=(0, 1), allow_int=True)(x, s)
    gg = jax.grad(lambda x, s: jnp.sum(got(x, s) * g), argnums=(0, 1), allow_int=True)(x, s)
    for a, b in zip(jax.tree.leaves(gr), jax.tree.leaves(gg)):
        if jnp.issubdtype(a.dtype, jnp.floating):
            np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["lowrank", "kron", "sparse", "sum", "scaled", "fourier", "haar"])
@pytest.mark.parametrize("factored", [True, False])
def test_structured_matmul_matches_autodiff(kind, factored):
    """Outputs and gradients (w.r.t. x and every structure array) equal plain autodiff."""
    d_in, d_out, n = 8, 12, 5
    structures = _structures(0, d_in, d_out)
    # DoRA's kind: a scale per output column around an inner sum (low rank + sparse: both gradient paths)
    c = 1.0 + 0.3 * jax.random.normal(jax.random.key(4), (d_out,))
    s = S.Scaled(structures["sum"], c) if kind == "scaled" else structures[kind]
    base = jax.random.normal(jax.random.key(1), (d_in, d_out))
    x = jax.random.normal(jax.random.key(2), (n, d_in))
    g = jax.random.normal(jax.random.key(3), (n, d_out))
    ref = lambda x, s: x @ _weight(base, s)
    got = lambda x, s: mm.structured_matmul(x, base, s, factored=factored)
    _assert_same(got, ref, x, s, g)


@pytest.mark.parametrize("kind", ["lowrank", "kron", "sparse", "sum", "scaled", "fourier", "haar"])
def test_deferred_base_matches_autodiff(kind):
    """A base that needs a transpose into its view (a fused ``[2, d, ffn]`` gate/up: ``d_in = d``, ``d_out = 2·ffn``),
    formed inside the op (the backward's ``Wᵀ`` in its own layout, :func:`reparam.matmul._weight_t`): values and
    gradients equal plain autodiff through the materialised weight."""
    d, ffn, n = 8, 6, 5
    structures = _structures(0, d, 2 * ffn)
    c = 1.0 + 0.3 * jax.random.normal(jax.random.key(4), (2 * ffn,))
    s = S.Scaled(structures["sum"], c) if kind == "scaled" else structures[kind]
    w = jax.random.normal(jax.random.key(1), (2, d, ffn))
    base = views.Matrix(w, (1,), (0, 2))
    dense = w.transpose(1, 0, 2).reshape(d, 2 * ffn)
    np.testing.assert_array_equal(base.array(), dense)
    x = jax.random.normal(jax.random.key(2), (n, d))
    g = jax.random.normal(jax.random.key(3), (n, 2 * ffn))
    ref = lambda x, s: x @ _weight(dense, s)
    got = lambda x, s: mm.structured_matmul(x, base, s, factored=False)
    _assert_same(got, ref, x, s, g)


def test_high_rank_gradient_from_one_gemm_matches_autodiff():
    """Rank 7 of a 6 x 8 weight at 200 tokens: dL, dR come from dW = xᵀg (cheaper), still exact."""
    k = jax.random.split(jax.random.key(0), 5)
    d_in, d_out, r, n = 6, 8, 7, 200
    assert S.lowrank_grad_by_gemm(r, n, d_in, d_out) and not S.lowrank_grad_by_gemm(8, 2048, 384, 384)
    assert S.lowrank_grad_by_gemm(256, 2048, 384, 384)                        # VeRA r=256 on MiniLM
    assert S.lowrank_grad_by_gemm(256, 2048, 384, 1536)                       # ... with both factors trained
    assert not S.lowrank_grad_by_gemm(256, 2048, 384, 1536, factors=1)        # VeRA's A is frozen
    s = S.LowRank(jax.random.normal(k[0], (d_in, r)), jax.random.normal(k[1], (r, d_out)))
    base, x = jax.random.normal(k[2], (d_in, d_out)), jax.random.normal(k[3], (n, d_in))
    g = jax.random.normal(k[4], (n, d_out))
    ref = lambda x, s: jnp.sum((x @ (base + s.l @ s.r)) * g)
    got = lambda x, s: jnp.sum(mm.structured_matmul(x, base, s, factored=False) * g)
    for a, b in zip(jax.tree.leaves(jax.grad(ref, (0, 1))(x, s)), jax.tree.leaves(jax.grad(got, (0, 1))(x, s))):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-3)


def test_scaled_is_not_additive():
    s = S.Scaled(S.LowRank(jnp.ones((4, 1)), jnp.ones((1, 6))), jnp.ones(6))
    for f in (lambda: S.dense(s, (4, 6)), lambda: S.matvec(s, jnp.ones((2, 4)))):
        with pytest.raises(TypeError, match="not additive"):
            f()
    assert S.costs(s, (4, 6)) == (1 * (4 + 6) + 6, 4 * 6 * 1 + 4 * 6)


def test_crossover():
    """LoRA: factored iff 2·N·r·(d+k) < d·k·r, i.e. below d·k / (2(d+k)) tokens."""
    s = S.LowRank(jnp.zeros((384, 8)), jnp.zeros((8, 384)))
    assert S.crossover(s, (384, 384)) == 96
    assert S.prefer_factored(s, (384, 384), 95) and not S.prefer_factored(s, (384, 384), 96)


def test_barrier_is_identity_with_same_gradient():
    one = mm.runtime_one(jnp.int32(3))
    f = lambda x: jnp.sum(jnp.sin(mm.cotangent_barrier(jnp.tanh(x), one)) ** 2)
    ref = lambda x: jnp.sum(jnp.sin(jnp.tanh(x)) ** 2)
    x = jnp.linspace(-2, 2, 7)
    assert float(f(x)) == float(ref(x))
    np.testing.assert_array_equal(jax.grad(f)(x), jax.grad(ref)(x))


class Block(nn.Module):
    """Dense, DenseGeneral q/k/v-style and out-style projections, LayerNorm: what the hook must route."""
    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm()(nn.Dense(16, name="up")(x))
        q = nn.DenseGeneral((2, 8), name="query")(h)                     # [d, heads, hd]
        o = nn.DenseGeneral(16, axis=(-2, -1), name="out")(jax.nn.gelu(q))   # [heads, hd, d]
        return nn.Dense(3, name="head")(nn.LayerNorm()(o + h))


def _model():
    m = Block()
    x = jax.random.normal(jax.random.key(0), (2, 5, 12))
    y = jax.random.randint(jax.random.key(1), (2, 5), 0, 3)
    params = m.init(jax.random.key(2), x)["params"]

    def loss_fn(p, batch, rng):
        logits = m.apply({"params": p}, batch[0])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()
    return params, loss_fn, (x, y)


STRUCTURED = sorted(n for n in METHODS if METHODS[n][0](2).structure is not None)
# variants that differ from a listed method only in init or scale share its structure code
VARIANTS = {"lora_gauss", "rslora", "pissa_rsvd", "corda_kpm", "milora", "randlora_peft", "lokr_r1_both",
            "sparse_random_density", "sparse_magnitude_smallest"}


def test_structured_methods_cover_every_structured_family():
    for name in ("lora", "pissa", "lora_xs", "svfit", "sorsa", "vera", "nola", "randlora", "krona", "lokr",
                 "compacter", "soka", "sparse_random_k", "lora+pissa", "fourierft", "waveft", "wara", "dct_sparse",
                 "sparse_s2ft_rows", "sparse_s2ft_cols"):
        if name in METHODS:
            assert name in STRUCTURED, name
    # a two-level Mallat DWT re-filters only the LL block: not separable, so plain autodiff
    assert "waveft_db2_l2" in METHODS and "waveft_db2_l2" not in STRUCTURED


@pytest.mark.parametrize("name", ["vera", "randlora", "svfit", "lora_xs", "lora_sb", "sparse_s2ft_rows",
                                  "sparse_s2ft_cols"])
def test_frozen_factor_hints_are_true(name):
    """A LowRank's ``frozen`` factor gets no derivative from any trainable array (the hint only steers the
    hot path's cost model, so a wrong one would not show in the gradients); square and transposed shapes."""
    t = METHODS[name][0](2)
    for d_in, d_out in ((6, 10), (10, 6)):
        w = jax.random.normal(jax.random.key(0), (d_in, d_out))
        calib = (calib_for(t, "w", w, jax.random.key(1)) or {}).get("w")
        frozen, trainable = t.init(jax.random.key(2), w, calib)
        trainable = perturb(trainable, jax.random.key(3))
        s = t.structure(frozen, trainable)
        assert isinstance(s, S.LowRank) and s.frozen in ("l", "r"), (name, s)
        factor = lambda tr: getattr(t.structure(frozen, tr), s.frozen)
        out, pull = jax.vjp(factor, trainable)
        for leaf in jax.tree.leaves(pull(jnp.ones_like(out))):
            assert not np.any(np.asarray(leaf)), (name, s.frozen)
        live = "r" if s.frozen == "l" else "l"
        out, pull = jax.vjp(lambda tr: getattr(t.structure(frozen, tr), live), trainable)
        assert any(np.any(np.asarray(leaf)) for leaf in jax.tree.leaves(pull(jnp.ones_like(out))))


# one method per structure kind (and the shared, stochastic and summed cases) runs every forward;
# the others run the custom-VJP (materialised) forward, the one plain autodiff does not share
EVERY_MODE = {"lora", "vera", "lokr", "compacter", "sparse_random_k", "dylora", "lora+pissa", "dora",
              "fourierft", "wara"}


@pytest.mark.parametrize("name", sorted(set(STRUCTURED) - VARIANTS))
def test_train_step_matches_autodiff(name):
    """Two steps with the hot path (auto / factored / materialised) equal plain autodiff to 1e-5."""
    params, loss_fn, batch = _model()
    t = METHODS[name][0](2)
    adapted = r"up/kernel" if t.calib else r"(up|query|out)/kernel"     # synthetic calib: 2-D kernels
    rules = [(adapted, t), (r"head/.*|.*LayerNorm.*/(scale|bias)", rp.full())]
    plan = rp.plan(rules, params)
    calib = calib_for(t, "up/kernel", params["up"]["kernel"], jax.random.key(7))
    frozen, trainable = plan.init(jax.random.key(3), params, calib)
    trainable = perturb(trainable, jax.random.key(4))          # B = 0 would hide errors in dA
    opt = optax.sgd(0.1)
    results = {}
    modes = ("auto", "factored", "materialised") if name in EVERY_MODE else ("materialised",)
    for mode in ("autodiff",) + modes:
        step = rp.train.make_train_step(plan, loss_fn, opt, matmul=mode, donate=False)
        state = rp.train.init_state(trainable, opt, jax.random.key(5))
        losses = []
        for _ in range(2):
            state, m = step(state, frozen, batch)
            losses.append(float(m["loss"]))
        results[mode] = (losses, state.trainable)
    ref_losses, ref_tr = results["autodiff"]
    for mode in modes:
        losses, tr = results[mode]
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-6, err_msg=mode)
        for a, b in zip(jax.tree.leaves(ref_tr), jax.tree.leaves(tr)):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5, err_msg=f"{name} {mode}")
    routed = {p for p, sites in step.routing.uses.items() if all(u.route != "autodiff" for u in sites.values())}
    assert routed == set(step.routing.uses) == ({"up/kernel"} if t.calib else {"up/kernel", "query/kernel", "out/kernel"})


_dot_shapes = dot_shapes         # (the name the tests and benchmarks used)


@pytest.mark.parametrize("method, mode, kernel, expect_full_grad", [
    ("lora", "auto", True, False), ("lora", "autodiff", True, True),
    ("wara", "auto", True, False), ("wara", "autodiff", True, True),  # low rank in the (separable) Haar basis
    ("sparse", "auto", True, False), ("waveft", "auto", True, False),   # the CPU sampled-product kernel
    ("fourierft", "auto", True, False),                       # ... on the half spectra (Hermitian DFT)
    ("sparse", "auto", False, True), ("fourierft", "auto", False, True)])   # without the kernel: xᵀg
def test_hot_step_never_forms_the_weight_gradient(method, mode, kernel, expect_full_grad, monkeypatch):
    """The compiled LoRA (WaRA, sparse, WaveFT, FourierFT) step has no dot contracting over the tokens
    into a [d_in, d_out] result (xᵀg); plain autodiff through the materialised weight has one, and so
    has a sparse or FourierFT step without the sampled-product kernel -- so the check can fail. The
    sparse steps call the kernel exactly when it is available."""
    if not kernel:
        monkeypatch.setattr(sampled, "available", lambda: False)
    d_in, d_out, n = 24, 40, 56
    params = {"layer": {"kernel": jax.random.normal(jax.random.key(0), (d_in, d_out)), "bias": jnp.zeros(d_out)}}
    t = {"lora": rp.lora(4), "wara": rp.wara(4), "fourierft": rp.fourierft(n=30), "waveft": rp.waveft(k=20),
         "sparse": rp.sparse.random(density=0.02)}[method]
    plan = rp.plan([(r"layer/kernel", t)], params)
    frozen, trainable = plan.init(jax.random.key(1), params)

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(d_out, name="layer")(x)
    net = Net()
    loss = lambda p, b, rng: jnp.mean(net.apply({"params": p}, b) ** 2)
    step = rp.train.make_train_step(plan, loss, optax.sgd(0.1), matmul=mode, donate=False)
    state = rp.train.init_state(trainable, optax.sgd(0.1), jax.random.key(2))
    x = jnp.ones((n, d_in))
    hlo = step.lower(state, frozen, x).compile().as_text()
    full_grads = [d for d in _dot_shapes(hlo) if sorted(d[0]) == sorted((d_in, d_out)) and n in d[1]]
    assert bool(full_grads) == expect_full_grad, full_grads
    assert (sampled.TARGET in hlo) == (kernel and method in ("sparse", "waveft", "fourierft"))


def test_summary_shows_the_route():
    """Before a step is traced the summary claims no route; after, it shows what the step did."""
    params, loss_fn, batch = _model()
    plan = rp.plan([(r"up/kernel", rp.lora(2)), (r"query/kernel", rp.full())], params)    # full: no structure
    frozen, trainable = plan.init(jax.random.key(0), params)
    text = plan.summary()
    assert "structured (untraced)" in text and "autodiff (no ΔW structure)" in text and "custom-vjp" not in text
    step = rp.train.make_train_step(plan, loss_fn, optax.sgd(0.1), donate=False)
    step(rp.train.init_state(trainable, optax.sgd(0.1), jax.random.key(1)), frozen, batch)
    assert "1/1 routed (materialised @ 10 tok)" in plan.summary(routing=step.routing)
    assert "structured (untraced)" in plan.summary()          # tracing did not change the plan


def test_bad_mode():
    params, loss_fn, _ = _model()
    plan = rp.plan([(r"up/kernel", rp.lora(2))], params)
    with pytest.raises(rp.ReparamError, match="matmul must be one of"):
        rp.train.make_train_step(plan, loss_fn, optax.sgd(0.1), matmul="fast")


def assert_hot_gradients_match_autodiff(s, base, x, g, tol=1e-5):
    """The materialised hot path's gradients w.r.t. ``x`` and every float array of ``s`` equal plain
    autodiff through the effective weight (:func:`_weight`)."""
    ref = jax.grad(lambda x, s: jnp.sum((x @ _weight(base, s)) * g), argnums=(0, 1), allow_int=True)(x, s)
    got = jax.jit(jax.grad(lambda x, s: jnp.sum(mm.structured_matmul(x, base, s, factored=False) * g),
                           argnums=(0, 1), allow_int=True))(x, s)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
        if jnp.issubdtype(a.dtype, jnp.floating):
            np.testing.assert_allclose(b, a, atol=tol, rtol=tol)


def test_kron_gradient_from_dense_dw_at_many_tokens(monkeypatch):
    """From KRON_GEMM_TOKENS tokens the Kronecker factors' gradient comes from one xᵀg: same values."""
    monkeypatch.setattr(S, "KRON_GEMM_TOKENS", 1)
    s = _structures(0, 8, 12)["kron"]
    assert not S.kron_grad_batched(s, 8, 12)
    base = jax.random.normal(jax.random.key(1), (8, 12))
    x, g = jax.random.normal(jax.random.key(2), (5, 8)), jax.random.normal(jax.random.key(3), (5, 12))
    assert_hot_gradients_match_autodiff(s, base, x, g)
