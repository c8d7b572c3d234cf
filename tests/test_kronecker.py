"""Kronecker family: PEFT's factorization, the vec trick, the Van Loan rearrangement, SoKA's energy rank,
shape errors, trainable counts and Compacter's shared rule matrices."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from peft.tuners.lokr.layer import factorization as peft_factorization

import reparam as rp
from reparam import kronecker as kr


def _perturb(tree, seed, scale=0.1):
    """Random nonzero values for every array of ``tree``, made in numpy (no per-shape XLA compiles)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda x: np.asarray(x) + scale * rng.normal(size=x.shape).astype(np.float32), tree)


def test_factorization_matches_peft_on_many_dims():
    factors = [-1, 1, 2, 3, 4, 5, 6, 8, 12, 16, 32, 64, 100]
    dims = list(range(1, 1100)) + [1536, 2048, 3072, 4096, 5120, 11008, 14336]
    for d in dims:
        for f in factors:
            assert kr.factorization(d, f) == peft_factorization(d, f), (d, f)
    # PEFT's documented examples
    assert [kr.factorization(256), kr.factorization(128), kr.factorization(127), kr.factorization(128, 4)] == \
        [(16, 16), (8, 16), (1, 127), (4, 32)]
    with pytest.raises(rp.ReparamError, match="factor must be -1"):
        kr.factorization(12, 0)


@settings(max_examples=10, deadline=None)
@given(a1=st.integers(1, 5), a2=st.integers(1, 5), b1=st.integers(1, 5), b2=st.integers(1, 5),
       lead=st.lists(st.integers(1, 3), max_size=2), seed=st.integers(0, 2**16))
def test_kron_matmul_equals_dense_product(a1, a2, b1, b2, lead, seed):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(a1, a2)).astype(np.float32), rng.normal(size=(b1, b2)).astype(np.float32)
    x = rng.normal(size=(*lead, a1 * b1)).astype(np.float32)
    np.testing.assert_allclose(jax.jit(kr.kron_matmul)(x, a, b), x @ np.kron(a, b), rtol=1e-5, atol=1e-5)


def test_kron_flops_and_error():
    trick, dense = kr.kron_flops(10, (24, 24), (32, 32))
    assert trick == 10 * (24 * 32 * 32 + 24 * 24 * 32) and dense == 768 * 768 * 11
    assert kr.kron_matmul_cheaper(512, (24, 24), (32, 32))
    assert not kr.kron_matmul_cheaper(512, (1, 1), (64, 64))     # A ⊗ B = a·B: the trick saves nothing
    with pytest.raises(rp.ReparamError, match="a1·b1 = 12"):
        kr.kron_matmul(jnp.ones((2, 10)), jnp.ones((3, 2)), jnp.ones((4, 2)))


def test_van_loan_rearrangement():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 2)), rng.normal(size=(4, 5))
    np.testing.assert_allclose(kr.rearrange(np.kron(a, b), (3, 2)), np.outer(a.ravel(), b.ravel()), rtol=1e-12)
    for shape, a_shape in [((12, 16), None), ((12, 10), (3, 2)), ((6, 8), (6, 1))]:
        w = rng.normal(size=shape).astype(np.float32)
        (a1, a2), (b1, b2) = kr._factor_shapes(shape, a_shape, -1, "test")
        full = min(a1 * a2, b1 * b2)
        fa, fb, s = jax.jit(kr.kron_svd, static_argnums=(1, 2))(w, (a1, a2), full)
        assert fa.shape == (full, a1, a2) and fb.shape == (full, b1, b2)
        np.testing.assert_allclose(sum(np.kron(x, y) for x, y in zip(fa, fb)), w, atol=1e-5)
        np.testing.assert_allclose(np.sum(np.square(s)), np.sum(w ** 2), rtol=1e-5)    # R permutes W


def _kron_structured(sigmas, a_shape=(3, 4), b_shape=(4, 4), seed=0):
    """``Σ_k σ_k A_k ⊗ B_k`` with orthonormal ``vec(A_k)``, ``vec(B_k)``: its Kronecker spectrum is ``σ``."""
    ka, kb = jax.random.split(jax.random.key(seed))
    qa, _ = jnp.linalg.qr(jax.random.normal(ka, (a_shape[0] * a_shape[1], len(sigmas))))
    qb, _ = jnp.linalg.qr(jax.random.normal(kb, (b_shape[0] * b_shape[1], len(sigmas))))
    sig = jnp.asarray(sigmas, jnp.float32)
    return kr.kron_sum((qa * sig).T.reshape(-1, *a_shape), qb.T.reshape(-1, *b_shape))


@pytest.mark.parametrize("energy,max_rank,niter,expected", [
    (0.7, None, None, 1), (0.9, None, None, 2), (0.95, None, None, 3), (0.99, None, None, 4),
    (1.0, None, None, 4), (0.99, 2, None, 2), (0.95, 4, 2, 3), (None, 3, None, 3)])
def test_soka_energy_threshold_picks_the_rank(energy, max_rank, niter, expected):
    # energies σ² = 16, 4, 1, 0.25 of 21.25: cumulative 0.753, 0.941, 0.988, 1.0
    w = _kron_structured([4.0, 2.0, 1.0, 0.5])
    t = kr.soka(energy, max_rank, niter=niter)
    frozen, trainable = t.init(jax.random.key(0), w)
    assert trainable["A"].shape == (expected, 3, 4) and trainable["B"].shape == (expected, 4, 4)
    np.testing.assert_allclose(t.apply(frozen, trainable), w, atol=1e-5)
    # the trained terms are the principal ones: the residual holds the energy left over
    left = float(jnp.sum(frozen["base"] ** 2))
    np.testing.assert_allclose(left, sum(s * s for s in [4.0, 2.0, 1.0, 0.5][expected:]), atol=1e-4)


def test_soka_rank_is_the_cap_where_w0_is_abstract():
    params = {"w": _kron_structured([4.0, 2.0, 1.0, 0.5])}
    plan = rp.plan([("w", kr.soka(0.9, max_rank=3))], params)
    assert plan.trainable_counts() == [3 * (12 + 16)]                 # abstract: the upper bound
    _, trainable = plan.init(jax.random.key(0), params)
    assert plan.trainable_counts(trainable) == [2 * (12 + 16)]        # concrete: the energy rank
    # nn.scan-stacked kernels: one rank for all layers, the cap
    stacked = {"w": jnp.stack([params["w"], 2 * params["w"]])}
    plan = rp.plan([("w", rp.on_axes(kr.soka(0.9, max_rank=3), batch_axes=(0,)))], stacked)
    frozen, trainable = plan.init(jax.random.key(0), stacked)
    assert trainable["w"]["A"].shape == (2, 3, 3, 4)
    np.testing.assert_allclose(plan.apply(frozen, trainable)["w"], stacked["w"], atol=1e-5)


@pytest.mark.parametrize("transform,match", [
    (kr.krona((5, 4)), r"krona: factor A of shape \(5, 4\) does not divide the 12x16 weight.*a1 from \[1, 2, 3, 4, 6, 12\]"),
    (kr.soka(a_shape=(3, 3)), r"soka: factor A of shape \(3, 3\) does not divide the 12x16 weight.*a2 from \[1, 2, 4, 8, 16\]"),
    (kr.compacter(n=3), r"compacter: n=3 must divide both dims of the 12x16 weight; .*\[1, 2, 4\]"),
    (kr.compacter(n=4, rank=4), r"rank 4 exceeds"),
])
def test_shape_errors_name_the_dims_and_the_fix(transform, match):
    params = {"layer": {"kernel": jnp.zeros((12, 16))}}
    with pytest.raises(rp.ReparamError, match=match):
        rp.plan([("layer/kernel", transform)], params)


def test_bad_hyperparameters():
    for make, match in [(lambda: kr.krona(zero="C"), "zero must be"), (lambda: kr.lokr(0), "positive int"),
                        (lambda: kr.soka(1.5), r"energy must be in \(0, 1\]"), (lambda: kr.soka(None), "give an"),
                        (lambda: kr.compacter(0), "n must be")]:
        with pytest.raises(rp.ReparamError, match=match):
            make()


def test_trainable_counts_768():
    params = {"q": {"kernel": jax.ShapeDtypeStruct((768, 768), jnp.float32)}}
    count = lambda t: rp.plan([("q/kernel", t)], params).trainable_counts()
    assert kr.factorization(768) == (24, 32)
    assert count(kr.krona()) == [24 * 24 + 32 * 32]
    assert count(kr.krona((8, 12))) == [8 * 12 + 96 * 64]
    assert count(kr.lokr(8)) == [24 * 24 + 8 * (32 + 32)]             # B low-rank: 8 < 32/2
    assert count(kr.lokr(16)) == [24 * 24 + 32 * 32]                  # B full: 16 >= 32/2
    assert count(kr.lokr(4, decompose_both=True)) == [4 * (24 + 24) + 4 * (32 + 32)]
    assert count(kr.soka(None, max_rank=8)) == [8 * (24 * 24 + 32 * 32)]
    assert count(kr.compacter(4, 1)) == [768 + 768 + 64]


def test_init_zeroes_one_factor():
    w = jax.random.normal(jax.random.key(0), (12, 16))
    _, t = kr.krona().init(jax.random.key(1), w)
    assert not jnp.any(t["B"]) and jnp.all(jnp.abs(t["A"]) <= 1 / np.sqrt(3)) and jnp.any(t["A"])
    _, t = kr.krona(zero="A").init(jax.random.key(1), w)
    assert not jnp.any(t["A"]) and jnp.any(t["B"])
    _, t = kr.lokr(1, decompose_both=True).init(jax.random.key(1), w)   # PEFT init_weights=True: w1_a = 0
    assert not jnp.any(t["A2"]) and all(jnp.any(t[k]) for k in ("A1", "B1", "B2"))


def test_krona_delta_is_the_vec_trick_product():
    w = jax.random.normal(jax.random.key(0), (12, 10))
    t = kr.krona((3, 2), scale=0.5)
    frozen, trainable = t.init(jax.random.key(1), w)
    trainable = _perturb(trainable, 2)
    x = np.random.default_rng(3).normal(size=(5, 12)).astype(np.float32)
    np.testing.assert_allclose(x @ jax.jit(t.apply)(frozen, trainable),
                               x @ w + kr.kron_matmul(x, 0.5 * trainable["A"], trainable["B"]), rtol=1e-5, atol=1e-5)


def test_compacter_shares_rule_matrices_across_layers():
    keys = jax.random.split(jax.random.key(0), 2)
    params = {"dense_0": {"kernel": jax.random.normal(keys[0], (12, 16))},
              "dense_1": {"kernel": jax.random.normal(keys[1], (16, 16))}}
    t = kr.compacter(n=4, rank=2)
    plan = rp.plan([(r"dense_[01]/kernel", t)], params)
    assert sum(plan.trainable_counts()) == 2 * (12 + 16) + 2 * (16 + 16) + 4 ** 3
    frozen, trainable = plan.init(jax.random.key(1), params)
    assert trainable["dense_0"]["kernel"]["shared"]["S"].shape == (4, 4, 4)
    assert "shared" not in trainable["dense_1"]["kernel"]
    assert sum(plan.trainable_counts(trainable)) == sum(plan.trainable_counts())
    tr = _perturb(trainable, 2)
    s = np.asarray(tr["dense_0"]["kernel"]["shared"]["S"])
    out = jax.jit(plan.apply)(frozen, tr)
    for layer in ("dense_0", "dense_1"):
        u, v = np.asarray(tr[layer]["kernel"]["u"]), np.asarray(tr[layer]["kernel"]["v"])
        expected = params[layer]["kernel"] + sum(np.kron(s[i], u[i] @ v[i]) for i in range(4))
        np.testing.assert_allclose(out[layer]["kernel"], expected, rtol=1e-5, atol=1e-5)
    # the bare transform, with the shared matrices passed by hand
    f, tr0 = t.init(jax.random.key(3), params["dense_0"]["kernel"])
    np.testing.assert_array_equal(t.apply(f, tr0, shared=t.shared(jax.random.key(4))), params["dense_0"]["kernel"])
