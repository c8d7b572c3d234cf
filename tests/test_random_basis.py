"""Random-basis family (VeRA, NOLA, RandLoRA): shape-independent bases, counts, regeneration, saved size, rank.

The shared laws (no-op init, merge == apply, gradients, no retrace, counts) run
from ``tests/methods_random_basis.py``; this file checks what is specific to
bases regenerated from a key.
"""
from __future__ import annotations

import math
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load as st_load, save as st_save

import reparam as rp
from reparam import random_basis as rb
from tests.methods import perturb

KEY = jax.random.key(7)


# --- bases -----------------------------------------------------------------------------------------

def test_basis_rows_slice_and_unit_variance():
    big = rb.basis_rows(KEY, 512, 16)
    assert np.array_equal(rb.basis_rows(KEY, 64, 16), big[:64])
    assert np.array_equal(rb.basis_rows(KEY, 64, 8), big[:64, :8])        # entry-wise: columns slice too
    assert not np.array_equal(rb.basis_rows(KEY, 64, 16, stream=1), big[:64])
    x = np.asarray(big, np.float64)
    assert abs(x.mean()) < 0.03 and abs(x.std() - 1.0) < 0.03 and np.abs(x).max() <= math.sqrt(3)


def test_shared_bases_are_slices_of_the_largest():
    # VeRA at a fixed fan_in: a 64x32 layer's A, B are exactly slices of a 512x256 layer's
    a_s, b_s = rb.vera_basis(KEY, 64, 32, 8, fan_in=512)
    a_l, b_l = rb.vera_basis(KEY, 512, 256, 8, fan_in=512)
    assert np.array_equal(a_s, a_l[:64]) and np.array_equal(b_s, b_l[:, :32])
    # RandLoRA: fewer, narrower bases are slices (PEFT: randlora_A[:, :N, :min], randlora_B[:max, :N, :])
    a_s, b_s = rb.randlora_basis(KEY, 24, 40, 8)
    a_l, b_l = rb.randlora_basis(KEY, 48, 80, 8)
    assert b_s.shape == (3, 8, 40) and b_l.shape == (6, 8, 80)
    assert np.array_equal(a_s, a_l[:24]) and np.array_equal(b_s, b_l[:3, :, :40])


def test_vera_layers_share_bases_through_the_plan():
    """Two layers of different shapes under one rule: same key (from the seed, not the init key),
    and with d = b = 1 the small layer's ΔW = A_s @ B_s is the corner of the large one's."""
    params = {"small": {"kernel": jnp.zeros((16, 8))}, "large": {"kernel": jnp.zeros((48, 24))}}
    plan = rp.plan([(r".*/kernel", rb.vera(4, fan_in=48))], params)
    f1, t1 = plan.init(jax.random.key(0), params)
    f2, _ = plan.init(jax.random.key(1), params)
    keys = [jax.random.key_data(f["kernel"]["key"]) for f in (f1["small"], f1["large"], f2["small"])]
    assert all(np.array_equal(keys[0], k) for k in keys)
    # the bases themselves are bit-exact slices (the same threefry draws) ...
    a_s, b_s = rb.vera_basis(f1["small"]["kernel"]["key"], 16, 8, 4, fan_in=48)
    a_l, b_l = rb.vera_basis(f1["large"]["kernel"]["key"], 48, 24, 4, fan_in=48)
    assert np.array_equal(a_s, a_l[:16]) and np.array_equal(b_s, b_l[:, :8])
    # ... while their products are matmuls of different shapes: XLA:CPU may pick another kernel per shape
    # (AVX-512/AMX Xeons round the last bit differently), so ΔW's corner is compared to float rounding
    ones = jax.tree_util.tree_map(jnp.ones_like, t1)
    out = plan.apply(f1, ones)
    np.testing.assert_allclose(out["small"]["kernel"], out["large"]["kernel"][:16, :8], rtol=1e-6, atol=1e-6)


def test_nola_bases_are_per_layer_unless_seeded():
    params = {"a": {"kernel": jnp.zeros((8, 6))}, "b": {"kernel": jnp.zeros((8, 6))}}
    for seed, shared in ((None, False), (3, True)):
        plan = rp.plan([(r".*/kernel", rb.nola(2, 4, 4, seed=seed))], params)
        f, t = plan.init(KEY, params)
        out = plan.apply(f, {k: {"kernel": {"a": jnp.ones(4), "b": jnp.ones(4)}} for k in ("a", "b")})
        # two leaves' deltas: equal to float rounding when seeded (same bases), far apart otherwise
        assert np.allclose(out["a"]["kernel"], out["b"]["kernel"], rtol=1e-6, atol=1e-6) == shared


def test_nola_chunking_does_not_change_the_delta_and_b_learns_at_init():
    w = jax.random.normal(KEY, (12, 10))
    full, chunked = rb.nola(3, 20, 17, chunk=64), rb.nola(3, 20, 17, chunk=6)   # 1 step vs a 4-step scan
    f, t = full.init(KEY, w)
    t = perturb(t, jax.random.key(1), 1.0)
    np.testing.assert_allclose(chunked.delta(f, t), full.delta(f, t), rtol=1e-5, atol=1e-6)
    c = jax.random.normal(jax.random.key(2), w.shape)
    g = jax.grad(lambda t: jnp.sum(c * chunked.delta(f, t)))(full.init(KEY, w)[1])
    assert np.abs(g["b"]).max() > 0          # through the frozen A0 term, while a = b = 0


def test_frozen_holds_keys_not_matrices_and_apply_is_deterministic():
    w = jax.random.normal(KEY, (24, 20))
    for t in (rb.vera(6), rb.nola(3, 8, 8), rb.randlora(5)):
        f, tr = t.init(jax.random.key(1), w)
        assert set(f) == {"base", "key"} and f["base"] is w
        assert jnp.issubdtype(f["key"].dtype, jax.dtypes.prng_key)
        tr = perturb(tr, jax.random.key(2))
        first = t.apply(f, tr)
        assert np.array_equal(first, t.apply(f, tr))                    # bases regenerated bit for bit
        assert np.array_equal(first, t.apply(t.init(jax.random.key(1), w)[0], tr))
        np.testing.assert_allclose(jax.jit(t.apply)(f, tr), first, rtol=1e-6, atol=1e-6)   # XLA may fuse differently
        assert not np.array_equal(first, w)


@pytest.mark.parametrize("make", [lambda **kw: rb.vera(6, **kw), lambda **kw: rb.nola(3, 8, 5, **kw),
                                  lambda **kw: rb.nola(3, 8, 5, chunk=4, **kw), lambda **kw: rb.randlora(5, **kw)],
                         ids=["vera", "nola", "nola_chunked", "randlora"])
@pytest.mark.parametrize("shape", [(24, 20), (20, 24)])
def test_stored_bases_give_the_regenerated_delta_and_gradient(make, shape):
    """``store_bases=True`` keeps the same bases as arrays (and the key): same ΔW, same gradient."""
    w = jax.random.normal(KEY, shape)
    regen, stored = make(), make(store_bases=True)
    f, tr = regen.init(jax.random.key(1), w)
    fs, trs = stored.init(jax.random.key(1), w)
    assert set(fs) == {"base", "key", "bases"} and np.array_equal(jax.random.key_data(fs["key"]),
                                                                  jax.random.key_data(f["key"]))
    assert all(isinstance(b, jax.Array) and b.dtype == jnp.float32 for b in fs["bases"])
    assert "store_bases=True" in stored.name and "store_bases" not in regen.name
    jax.tree_util.tree_map(np.testing.assert_array_equal, trs, tr)            # the same trainables at init
    tr = perturb(tr, jax.random.key(2))
    np.testing.assert_allclose(stored.delta(fs, tr), regen.delta(f, tr), rtol=1e-5, atol=1e-6)
    c = jax.random.normal(jax.random.key(3), shape)
    g_regen = jax.grad(lambda t: jnp.sum(c * regen.delta(f, t)))(tr)
    g_stored = jax.grad(lambda t: jnp.sum(c * stored.delta(fs, t)))(tr)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g_stored, g_regen)


# --- counts, rank, scalings -----------------------------------------------------------------------

def test_vera_roberta_base_count_43008():
    """VeRA paper, RoBERTa-base: r=1024 on query and value of 12 layers (768x768) = 43,008 parameters."""
    sds = jax.ShapeDtypeStruct((768, 768), jnp.float32)
    params = {f"layer_{i}": {"attention": {n: {"kernel": sds} for n in ("query", "key", "value")}}
              for i in range(12)}
    plan = rp.plan([(r".*/(query|value)/kernel", rb.vera(1024))], params)
    assert sum(c for c in plan.trainable_counts() if c) == 12 * 2 * (1024 + 768) == 43_008
    assert "43,008" in plan.summary()


@pytest.mark.parametrize("shape,rank", [((24, 40), 7), ((40, 24), 8), ((30, 30), 4)])
def test_randlora_delta_is_full_rank(shape, rank):
    t = rb.randlora(rank)
    f, tr = t.init(KEY, jnp.zeros(shape))
    n = rb.num_bases(*shape, rank)
    assert tr["lambda"].shape == (rank, n) and tr["gamma"].shape == (n, min(shape))
    tr = jax.tree_util.tree_map(lambda x: jax.random.normal(jax.random.key(x.size), x.shape), tr)
    dw = np.asarray(t.delta(f, tr), np.float64)
    assert dw.shape == shape and np.linalg.matrix_rank(dw) == min(shape)


def test_randlora_scalings():
    w = jnp.zeros((20, 33))
    paper, peft = rb.randlora(4, alpha=8.0), rb.randlora(4, alpha=8.0, scaling="peft")
    f, tr = paper.init(KEY, w)
    tr = perturb(tr, KEY)
    n = rb.num_bases(20, 33, 4)
    np.testing.assert_allclose(paper.delta(f, tr) * math.sqrt(n), peft.delta(f, tr), rtol=1e-5, atol=1e-7)


def test_bad_arguments_raise():
    for make in (lambda: rb.vera(0), lambda: rb.nola(4, num_a=0), lambda: rb.randlora(2.5),
                 lambda: rb.randlora(4, scaling="official")):
        with pytest.raises(rp.ReparamError):
            make()


# --- saved adapters: the key and the trained vectors only ----------------------------------------

def _save(plan, frozen, trainable):
    """safetensors bytes of a bases-free adapter: every trainable array plus each leaf's key data."""
    tensors = {}
    for leaf, f, t in zip(plan.leaves, plan.treedef.flatten_up_to(frozen), plan.treedef.flatten_up_to(trainable)):
        if leaf.transform is None:
            continue
        tensors[f"{leaf.path}/key"] = np.asarray(jax.random.key_data(f["key"]))
        tensors.update({f"{leaf.path}/{k}": np.asarray(v) for k, v in t.items()})
    return st_save(tensors), sum(v.nbytes for v in tensors.values())


def _restore(blob, plan, params):
    """(frozen, trainable) from the saved bytes and the base params: the bases are regenerated."""
    loaded = st_load(blob)
    frozen, trainable = [], []
    for leaf, w in zip(plan.leaves, plan.treedef.flatten_up_to(params)):
        p = leaf.path + "/"
        frozen.append({"base": w, "key": jax.random.wrap_key_data(jnp.asarray(loaded[p + "key"]))})
        trainable.append({k[len(p):]: jnp.asarray(v) for k, v in loaded.items() if k.startswith(p) and k != p + "key"})
    return plan.treedef.unflatten(frozen), plan.treedef.unflatten(trainable)


R, NA, NB = 16, 32, 32
CASES = {   # name: (transform, trained floats per width-w square layer, floats of the bases it regenerates)
    "vera": (rb.vera(R), lambda w: R + w, lambda w: 2 * w * R),
    "nola": (rb.nola(R, NA, NB), lambda w: NA + NB, lambda w: (NA + 1) * w * R + NB * R * w),
    "randlora": (rb.randlora(R), lambda w: -(-w // R) * (R + w), lambda w: w * R + -(-w // R) * R * w),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_saved_adapter_is_key_plus_vectors(name):
    t, trained, bases = CASES[name]
    sizes = {}
    for width in (64, 512):
        params = {"q": {"kernel": jax.random.normal(KEY, (width, width)) / math.sqrt(width)}}
        plan = rp.plan([(r"q/kernel", t)], params)
        frozen, trainable = plan.init(jax.random.key(1), params)
        trainable = perturb(trainable, jax.random.key(2))
        blob, data = _save(plan, frozen, trainable)
        header = 8 + struct.unpack("<Q", blob[:8])[0]
        assert data == 4 * trained(width) + 8 and len(blob) == header + data and header < 512
        f2, t2 = _restore(blob, plan, params)
        assert np.array_equal(plan.apply(f2, t2)["q"]["kernel"], plan.apply(frozen, trainable)["q"]["kernel"])
        sizes[width] = (len(blob), 4 * bases(width))
        print(f"{name} {width}x{width} r={R}: saved {len(blob):,} B (key + trained vectors); "
              f"the bases would add {4 * bases(width):,} B")
    # the saved size grows only with the trained vectors (data bytes above), never with the bases
    assert sizes[512][0] - sizes[64][0] <= 4 * (trained(512) - trained(64)) + 16
    assert sizes[512][0] * 8 < sizes[512][1]
