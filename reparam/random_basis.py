"""Random-basis family: VeRA, NOLA, RandLoRA -- frozen random bases, trained scalings or coefficients.

By default the bases are never stored: ``frozen["key"]`` holds a PRNG key and
``delta`` regenerates them inside the jitted step, and again in the backward
pass (the deltas are ``jax.checkpoint``-ed, so no basis is kept as a residual).
``store_bases=True`` instead draws them once at init into ``frozen["bases"]``
(the key stays): more memory, a faster step where hashing is slow (measured in
``benchmarks/results/library_notes.md``). Either way a saved adapter is the key plus
the trained vectors: frozen arrays are rebuilt by ``plan.init``, never checkpointed.

Bases are counter-based (Salmon et al. 2011, "Random123"): entry ``(i, j)`` of
a basis is the threefry2x32 hash of ``(stream·2^28 + i, j)`` under the key
(:func:`uniform_blocks`), so it depends on nothing else -- not on the basis's
shape, nor on JAX's ``jax_threefry_partitionable`` flag. Hence the basis of a
smaller layer is exactly a slice of the basis of a larger one (:func:`basis_rows`),
which is how "one pair of bases shared by all layers, sliced from the largest
shape" (VeRA, PEFT's RandLoRA) holds here without knowing the largest shape:
each layer regenerates its own slice from the shared key. All of a delta's
random numbers come from one hash call. They cannot equal torch's, so PEFT
parity injects the same bases on both sides (:func:`vera_basis`, :func:`randlora_basis`).

Kernels are ``[d_in, d_out]`` with ``y = x @ W``; PEFT's Linear weights are ``[out, in]``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from jax.extend.random import threefry_2x32

from reparam.core import Reparam, ReparamError, additive, fmt_name
from reparam.lowrank import lora_scale
from reparam.structure import LowRank

_SQRT3 = math.sqrt(3.0)
_STREAM_SHIFT = 28      # row indices < 2^28; 16 streams per key


def _ids(n: int):
    return jnp.arange(n, dtype=jnp.uint32)


def uniform_blocks(key, blocks: Sequence[tuple]):
    """U(-1, 1) float32 matrices from one threefry call: block ``(stream, rows, cols)`` -> ``[len(rows), len(cols)]``.

    Entry ``(a, b)`` of a block is a function of ``(key, stream, rows[a], cols[b])``
    only (``rows``, ``cols``: uint32 index vectors, ``stream`` in 0..15).
    """
    kd = jax.random.key_data(key)
    his, los, shapes = [], [], []
    for stream, rows, cols in blocks:
        hi, lo = jnp.broadcast_arrays(jnp.uint32(stream << _STREAM_SHIFT) | rows[:, None], cols[None, :])
        his.append(hi.ravel())
        los.append(lo.ravel())
        shapes.append(hi.shape)
    n = sum(h.shape[0] for h in his)
    out = threefry_2x32((kd[0], kd[1]), jnp.concatenate(his + los))
    bits = (out[:n] ^ out[n:]) >> 9 | jnp.uint32(0x3F800000)        # 23 random mantissa bits
    u = 2.0 * (jax.lax.bitcast_convert_type(bits, jnp.float32) - 1.0) - 1.0
    res, start = [], 0
    for shape in shapes:
        res.append(u[start:start + shape[0] * shape[1]].reshape(shape))
        start += shape[0] * shape[1]
    return res


def basis_rows(key, n_rows: int, width: int, stream: int = 0):
    """``[n_rows, width]`` unit-variance U(-√3, √3) draws; row ``i`` depends only on ``(key, stream, i)``.

    ``basis_rows(k, m, w) == basis_rows(k, n, v)[:m, :w]`` for ``m <= n``, ``w <= v``:
    a smaller layer's basis is a slice of a larger layer's.
    """
    return _SQRT3 * uniform_blocks(key, [(stream, _ids(n_rows), _ids(width))])[0]


def _positive(value, what: str, method: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ReparamError(f"{method}: {what} must be a positive int, got {value!r}.")


def _seed_key(seed: int):
    """The shared key of a ``seed``: always threefry, whatever ``jax_default_prng_impl`` says."""
    return jax.random.key(seed, impl="threefry2x32")


def _typed(key):
    """A typed PRNG key (``jax.random.key``), also from a raw ``uint32[2]`` ``jax.random.PRNGKey``."""
    return key if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(key)


def _cached(core, n_static: int):
    """``jit(checkpoint(core))`` with the last ``n_static`` arguments static: compiled once per shape, even eagerly."""
    static = tuple(range(core.__code__.co_argcount - n_static, core.__code__.co_argcount))
    return jax.jit(jax.checkpoint(core, static_argnums=static), static_argnums=static)


# --- VeRA ----------------------------------------------------------------------------------------

def vera_basis(key, d_in: int, d_out: int, rank: int, fan_in: Optional[int] = None):
    """VeRA's frozen ``A [d_in, r]`` and ``B [r, d_out]`` at PEFT's kaiming-uniform scale.

    PEFT draws ``vera_A [r, in_max]`` ~ U(±√(6/in_max)), ``vera_B [out_max, r]`` ~
    U(±√(6/r)) and uses ``vera_A[:, :d_in]``, ``vera_B[:d_out]``. Here
    ``A = √(2/fan_in) · basis_rows(key, d_in, r, stream=0)`` (``fan_in = d_in`` by
    default) and ``B = √(2/r) · basis_rows(key, d_out, r, stream=1)ᵀ``; in PEFT's
    layout ``vera_A = Aᵀ`` and ``vera_B = Bᵀ``.
    """
    a, bt = uniform_blocks(key, [(0, _ids(d_in), _ids(rank)), (1, _ids(d_out), _ids(rank))])
    fan = d_in if fan_in is None else fan_in
    return a * math.sqrt(6.0 / fan), bt.T * math.sqrt(6.0 / rank)


def _frozen(w, key, store: bool, bases):
    """A leaf's frozen entry: base and key, and with ``store`` the bases ``bases(key)`` as arrays."""
    return {"base": w, "key": key, **({"bases": tuple(bases(key))} if store else {})}


def _vera_combine(bases, d, b):
    a, bb = bases
    return a, d[:, None] * bb * b                       # A stays a frozen factor: ΔW = A (diag(d) B diag(b))


def _vera_core(key, d, b, d_in, d_out, rank, fan_in):
    return _vera_combine(vera_basis(key, d_in, d_out, rank, fan_in), d, b)


_vera_factors = _cached(_vera_core, 4)


def vera(rank: int, *, seed: int = 0, d_init: float = 0.1, fan_in: Optional[int] = None,
         store_bases: bool = False) -> Reparam:
    """VeRA (Kopiczko et al. 2024): ``W = W0 + (A · diag(d)) @ (B · diag(b))``.

    ``A [d_in, r]``, ``B [r, d_out]`` are frozen random bases SHARED by all
    layers: regenerated from ``jax.random.key(seed)`` (not the per-leaf init
    key), a smaller layer's being a slice of a larger one's (:func:`vera_basis`).
    Trains ``d [r]`` (init ``d_init``) and ``b [d_out]`` (init 0): ``r + d_out``
    parameters per layer, no ``α``. The rank may exceed ``min(d_in, d_out)``
    (the paper: r=1024 on RoBERTa-base's 768-wide q, v = 43,008 parameters).
    PEFT: ``vera_lambda_d = d``, ``vera_lambda_b = b``; its
    ``ΔW = diag(b) vera_B diag(d) vera_A`` is our ``ΔWᵀ``.

    ``fan_in``: A's scale is ``√(6/fan_in)``. PEFT uses the LARGEST ``d_in`` among
    adapted layers; ``None`` uses each layer's own ``d_in`` -- the same whenever
    the adapted layers share their input width (q/k/v/o of most transformers).
    With mixed widths, pass the largest to get PEFT's scale, and every layer's
    ``A`` an exact (unrescaled) slice of one matrix.

    ``store_bases``: keep this layer's ``A``, ``B`` in ``frozen["bases"]``
    (``r·(d_in + d_out)`` floats per layer) instead of regenerating them each step.
    """
    _positive(rank, "rank", "vera")

    def init_fn(key, w, calib=None):
        d_in, d_out = w.shape
        return (_frozen(w, _seed_key(seed), store_bases, lambda k: vera_basis(k, d_in, d_out, rank, fan_in)),
                {"d": jnp.full((rank,), d_init, jnp.float32), "b": jnp.zeros((d_out,), jnp.float32)})

    def structure(frozen, trainable):
        d_in, d_out = frozen["base"].shape
        if "bases" in frozen:
            return LowRank(*_vera_combine(frozen["bases"], trainable["d"], trainable["b"]), frozen="l")
        return LowRank(*_vera_factors(frozen["key"], trainable["d"], trainable["b"], d_in, d_out, rank, fan_in),
                       frozen="l")

    return additive(fmt_name("vera", r=rank, seed=seed, d_init=d_init, fan_in=fan_in, store_bases=store_bases),
                    init_fn, structure=structure)


# --- NOLA ----------------------------------------------------------------------------------------

def _mix(key, stream: int, w, width: int, chunk: int):
    """``Σ_i w_i U_i`` over bases ``U_i`` = rows ``i`` of ``stream`` (each ``[width]``, U(-1, 1)), ``chunk`` at a time.

    A rematerialised scan: at most ``chunk`` bases are in memory, forward or backward.
    """
    k = w.shape[0]
    steps = -(-k // chunk)
    w = jnp.pad(w, (0, steps * chunk - k)).reshape(steps, chunk)

    def step(acc, xs):
        i, w_i = xs
        rows = i.astype(jnp.uint32) * chunk + _ids(chunk)
        return acc + w_i @ uniform_blocks(key, [(stream, rows, _ids(width))])[0], None
    return jax.lax.scan(jax.checkpoint(step), jnp.zeros((width,), jnp.float32), (jnp.arange(steps), w))[0]


def _nola_bases(key, na: int, nb: int, d_in: int, d_out: int, rank: int):
    """All of a layer's NOLA bases, flattened: ``U [na + 1, d_in·r]`` (``U_0`` first) and ``V [nb, r·d_out]``."""
    return uniform_blocks(key, [(0, _ids(na + 1), _ids(d_in * rank)), (1, _ids(nb), _ids(rank * d_out))])


def _nola_weights(ca, cb, d_in):
    """The mixing weights ``(1/√d_in, a/√k_a)`` of ``U`` and ``b/√k_b`` of ``V``."""
    wa = jnp.concatenate([jnp.full((1,), 1.0 / math.sqrt(d_in), jnp.float32), ca / math.sqrt(ca.shape[0])])
    return wa, cb / math.sqrt(cb.shape[0])


def _nola_combine(bases, ca, cb, d_in, d_out, rank):
    (u, v), (wa, wb) = bases, _nola_weights(ca, cb, d_in)
    return (wa @ u).reshape(d_in, rank), (wb @ v).reshape(rank, d_out)


def _nola_core(key, ca, cb, d_in, d_out, rank, chunk):
    """``A = U_0/√d_in + Σ_i a_i U_i/√k_a``, ``B = Σ_j b_j V_j/√k_b``; ``U``, ``V`` ~ U(-1, 1), flattened."""
    na, nb = ca.shape[0], cb.shape[0]
    if na + 1 <= chunk and nb <= chunk:      # all bases at once, one hash call
        return _nola_combine(_nola_bases(key, na, nb, d_in, d_out, rank), ca, cb, d_in, d_out, rank)
    wa, wb = _nola_weights(ca, cb, d_in)
    a, b = _mix(key, 0, wa, d_in * rank, chunk), _mix(key, 1, wb, rank * d_out, chunk)
    return a.reshape(d_in, rank), b.reshape(rank, d_out)


_nola_factors = _cached(_nola_core, 4)


def nola(rank: int, num_a: int = 1024, num_b: int = 1024, alpha: Optional[float] = None, *,
         seed: Optional[int] = None, chunk: int = 64, store_bases: bool = False) -> Reparam:
    """NOLA (Koohpayegani et al. 2024): ``W = W0 + s · (A0 + Σ_i a_i A_i) @ (Σ_j b_j B_j)``.

    LoRA's factors as linear combinations of frozen random bases ``A_i [d_in, r]``
    ~ U(-1,1)/√num_a and ``B_j [r, d_out]`` ~ U(-1,1)/√num_b (the official code's
    scale); only the coefficients ``a [num_a]`` and ``b [num_b]`` are trained
    (init 0): ``num_a + num_b`` parameters per layer, whatever the shapes and the
    rank. ``A0`` ~ U(±1/√d_in) is LoRA's kaiming-uniform ``A``, frozen (the
    official code's ``lora_A.weight``): with ``b = 0`` a fresh adapter is a no-op
    and ``b`` already gets a gradient through ``A0``. ``s = α/r`` (``α = r`` by
    default). Bases come from a PER-LAYER key (the leaf's init key), or from
    ``jax.random.key(seed)`` for every layer when ``seed`` is given. They are
    generated ``chunk`` at a time in a rematerialised scan, so at most ``chunk``
    of each are in memory (all 1024 would be 25 MB per 768-wide layer at r=8);
    the result does not depend on ``chunk``.

    ``store_bases``: keep all of this layer's bases in ``frozen["bases"]``
    (``((num_a + 1)·d_in + num_b·d_out)·r`` floats per layer: 4 MB for a
    384x1536 layer at r=8 and 64 + 64 bases, 60 MB at 1024 + 1024) instead of
    regenerating them each step.
    """
    for v, what in ((rank, "rank"), (num_a, "num_a"), (num_b, "num_b"), (chunk, "chunk")):
        _positive(v, what, "nola")
    s = lora_scale(rank, alpha)

    def init_fn(key, w, calib=None):
        k = _seed_key(seed) if seed is not None else _typed(key)
        d_in, d_out = w.shape
        return (_frozen(w, k, store_bases, lambda k_: _nola_bases(k_, num_a, num_b, d_in, d_out, rank)),
                {"a": jnp.zeros((num_a,), jnp.float32), "b": jnp.zeros((num_b,), jnp.float32)})

    def structure(frozen, trainable):
        d_in, d_out = frozen["base"].shape
        if "bases" in frozen:
            a, b = _nola_combine(frozen["bases"], trainable["a"], trainable["b"], d_in, d_out, rank)
        else:
            a, b = _nola_factors(frozen["key"], trainable["a"], trainable["b"], d_in, d_out, rank, chunk)
        return LowRank(s * a, b)

    return additive(fmt_name("nola", r=rank, num_a=num_a, num_b=num_b, alpha=alpha, seed=seed,
                             store_bases=store_bases), init_fn, structure=structure)


# --- RandLoRA ------------------------------------------------------------------------------------

def num_bases(d_in: int, d_out: int, rank: int) -> int:
    """RandLoRA's ``N = ⌈min(d_in, d_out) / r⌉``: enough rank-``r`` bases for a full-rank update."""
    return -(-min(d_in, d_out) // rank)


def _randlora_blocks(key, lo: int, hi: int, rank: int):
    n = -(-lo // rank)
    return uniform_blocks(key, [(0, _ids(lo), _ids(rank)), (1, _ids(hi), _ids(n * rank))])


def randlora_basis(key, min_dim: int, max_dim: int, rank: int):
    """RandLoRA's frozen ``A [min_dim, r]`` (one, shared by all ``N`` bases) and ``B [N, r, max_dim]``.

    Unit-variance uniform, as PEFT's kaiming-uniform bases divided by their std:
    ``A = basis_rows(key, min_dim, r, stream=0)`` and
    ``B[n, ρ, j] = basis_rows(key, max_dim, N·r, stream=1)[j, n·r + ρ]``, so a
    smaller layer uses ``A[:min]``, ``B[:N, :, :max]`` as PEFT uses
    ``randlora_A[:, :N, :min]``, ``randlora_B[:max, :N, :]``.
    """
    a, b2 = _randlora_blocks(key, min_dim, max_dim, rank)
    return _SQRT3 * a, _SQRT3 * b2.reshape(max_dim, -1, rank).transpose(1, 2, 0)


def _randlora_combine(bases, lam, gam):
    a, b2 = bases                                                       # [min, r], [max, N·r]
    m = gam.T[:, :, None] * a[:, None, :] * lam.T[None]                 # [min, N, r]: diag(γ_n) A diag(λ_n)
    return 3.0 * m.reshape(a.shape[0], -1), b2.T                        # [min, N·r], [N·r, max]; 3 = √3·√3


def _randlora_core(key, lam, gam, lo, hi, rank):
    return _randlora_combine(_randlora_blocks(key, lo, hi, rank), lam, gam)


_randlora_factors = _cached(_randlora_core, 3)


def randlora(rank: int, alpha: Optional[float] = None, *, scaling: str = "paper", seed: int = 0,
             store_bases: bool = False) -> Reparam:
    """RandLoRA (Albert et al. 2025): full-rank ``ΔW = s · Σ_n diag(γ_n) A diag(λ_n) B_n`` over ``N`` bases.

    On the layer's smaller side ``min = min(d_in, d_out)``: ``A [min, r]`` and
    ``B_n [r, max]`` (``n = 1..N``, ``N = ⌈min/r⌉``, so ``N·r >= min`` and ΔW is
    generically full rank) are frozen, shared by all layers and regenerated from
    ``jax.random.key(seed)`` (:func:`randlora_basis`); ΔW is transposed when
    ``d_in > d_out``. Trains ``lambda [r, N]`` (init 0) and ``gamma [N, min]``
    (init ``1/min``) -- PEFT's ``randlora_lambda`` / ``randlora_gamma``, same
    shapes and init: ``N·(r + min)`` parameters per layer, fewer as ``r`` grows.
    ``s = α/r/√N`` (``scaling="paper"``, the official code) or ``α/r``
    (``"peft"``); ``α`` defaults to ``20·r``, PEFT's convention (r=32, α=640).

    Cost: ``B`` has ``N·r·max ≈ d_in·d_out`` entries, so each apply hashes a
    W-sized random matrix and does one ``[min, N·r] @ [N·r, max]`` matmul; it
    is not kept for the backward pass (regenerated there). ``store_bases``
    keeps this layer's ``A``, ``B`` in ``frozen["bases"]`` instead (about
    ``d_in·d_out`` floats per layer: the size of the weight).
    """
    _positive(rank, "rank", "randlora")
    if scaling not in ("paper", "peft"):
        raise ReparamError(f"randlora: scaling must be 'paper' (α/r/√N, official code) or 'peft' (α/r), "
                           f"got {scaling!r}.")
    alpha_ = 20.0 * rank if alpha is None else alpha

    def init_fn(key, w, calib=None):
        d_in, d_out = w.shape
        n, lo, hi = num_bases(d_in, d_out, rank), min(d_in, d_out), max(d_in, d_out)
        return (_frozen(w, _seed_key(seed), store_bases, lambda k: _randlora_blocks(k, lo, hi, rank)),
                {"lambda": jnp.zeros((rank, n), jnp.float32), "gamma": jnp.full((n, lo), 1.0 / lo, jnp.float32)})

    def structure(frozen, trainable):
        d_in, d_out = frozen["base"].shape
        lo, hi, n = min(d_in, d_out), max(d_in, d_out), num_bases(d_in, d_out, rank)
        s = lora_scale(rank, alpha_) / (math.sqrt(n) if scaling == "paper" else 1.0)
        lam, gam = trainable["lambda"], trainable["gamma"]
        m, b = _randlora_combine(frozen["bases"], lam, gam) if "bases" in frozen else \
            _randlora_factors(frozen["key"], lam, gam, lo, hi, rank)
        return LowRank(s * m, b, frozen="r") if d_in <= d_out else LowRank(b.T, s * m.T, frozen="l")   # ΔW or ΔWᵀ

    return additive(fmt_name("randlora", r=rank, alpha=alpha, scaling=scaling, seed=seed, store_bases=store_bases),
                    init_fn, structure=structure)
