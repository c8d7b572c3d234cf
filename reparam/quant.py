"""Quantised frozen bases: a weight held as block codes and scales, dequantised where it is used.

    q = rp.quant.quantize(params, "nf4", where=r".*/kernel")     # QLoRA's 4-bit NormalFloat base
    plan = rp.plan(rules, q)                        # the plan sees each base's logical shape and dtype
    frozen, trainable = plan.init(key, q)           # bases stay quantised in `frozen`
    params_now = plan.apply(frozen, trainable)      # dequantised inside the jitted loss
    merged = plan.merge(frozen, trainable, requantize=True)   # the merged weights, nf4 again (deployable)

QPiSSA from full-precision weights: initialise on them, then quantise the frozen bases (the residuals):
``frozen = quantize(frozen, "nf4", where=r".*kernel/base")``. Given quantised params instead, the plan
decomposes the dequantised weight and re-quantises the residual in the base's own format (:func:`rebase`).
An adapter that absorbs the quantisation error at init (LoftQ's alternating quantise / SVD, INT2.1's one SVD of
the error) needs the full-precision weights and the format: :func:`reparam.loftq.loftq` (``rp.loftq``).

A :class:`QArray` is a pytree: its children are the arrays (``codes``, ``scales``, optional ``mins``), its
static aux data the format, block size, block axis and logical dtype; the logical shape is derived from the
children, so slicing the leading (stacked-layer) axes of every child, ``jax.tree.map(np.stack, ...)`` over
layers, sharding and jit all treat it as the arrays it holds. A weight ``w`` is cut into blocks of ``b``
consecutive entries along one axis (``axis``, the input axis ``-2`` of a ``[.., d_in, d_out]`` kernel by
default, as QLoRA's blocks run along torch's ``[out, in]`` rows and GGUF's along its rows): ``codes
[*rest, n_blocks, b]`` (int8 / uint8; 4-bit codes two per byte, byte ``j`` holding entries ``j`` (low
nibble) and ``j + b/2`` (high), GGUF's order), ``scales`` and ``mins`` ``[*rest, n_blocks]``.

Formats, per block ``x`` (``ŵ`` the dequantised entry):

  int8  one block per output channel (the whole input axis): ``d = max|x| / 127``, ``q = round(x/d)`` in
        [-127, 127], ``ŵ = d q``; ``|w - ŵ| <= d/2``.
  nf4   QLoRA (Dettmers et al. 2023): blocks of 64, ``s = max|x|``, ``q`` = the nearest of the 16 NormalFloat
        values :data:`NF4` to ``x/s``, ``ŵ = s · NF4[q]``; ``|w - ŵ| <= s · max_gap/2``. ``double_quant=True``:
        the f32 scales are themselves quantised to 8 bits in blocks of 256 (per matrix, flattened, the last
        block padded) -- QLoRA's double quantisation, 0.127 instead of 0.5 bits per weight of scales; QLoRA
        centres the scales and uses bitsandbytes' dynamic 8-bit map, here each block of 256 is affine uint8
        (``u8`` below).
  q8_0  GGUF: blocks of 32, ``d = max|x| / 127`` stored f16, ``q`` int8, ``ŵ = d q``.
  q4_1  GGUF: blocks of 32, ``m = min x``, ``d = (max x - m) / 15`` both stored f16, ``q`` in [0, 15],
        ``ŵ = d q + m``. :func:`from_gguf_tensor` takes a file's Q4_1 / Q8_0 blocks as they are.
  u8    affine 8-bit (``ŵ = d q + m``, ``q`` in [0, 255], f32 ``d``, ``m``): the scales of double quantisation.

Why not a library: qwix (Google's JAX quantisation library, not on this machine's package list; its
``QArray`` is ``qvalue`` with tiled ``scale`` / integer ``zero_point``) has int4/int8 and an nf4 qtype, but no
double quantisation and no float block minimum, so GGUF's Q4_1 (``d q + m`` with an f16 ``m``) cannot be
held as it is; aqtp (AQT) is quantised *training* (int8 matmuls with fake-quant gradients) with no 4-bit
NormalFloat and no block formats; bitsandbytes is PyTorch/CUDA. None reads GGUF blocks. What is written here
is small -- pack, encode, decode per format -- and pure ``jnp``, so :func:`dequantize` inside a jitted loss
is fused by XLA into its consumer.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from reparam.core import ReparamError

PyTree = Any

NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], np.float32)
"""QLoRA's 4-bit NormalFloat code values (bitsandbytes' ``nf4`` table): quantiles of N(0, 1) scaled to [-1, 1],
with an exact zero (Dettmers et al. 2023, Appendix E)."""


@functools.partial(jax.tree_util.register_dataclass, data_fields=("codes", "scales", "mins"),
                   meta_fields=("fmt", "block", "axis", "dtype"))
@dataclasses.dataclass(frozen=True)
class QArray:
    """A quantised array: ``codes [*rest, n_blocks, bytes per block]``, ``scales`` (an array ``[*rest, n_blocks]``,
    or a ``u8`` :class:`QArray` of them under double quantisation), ``mins`` (``[*rest, n_blocks]`` or None);
    static ``fmt``, ``block``, ``axis`` (negative: the logical axis the blocks run along; ``rest`` is the logical
    shape without it) and the logical ``dtype``."""
    codes: Any
    scales: Any
    mins: Any
    fmt: str
    block: int
    axis: int
    dtype: Any

    @property
    def shape(self) -> tuple[int, ...]:
        stored = list(self.codes.shape[:-2]) + [self.codes.shape[-2] * self.block]
        n = stored.pop()
        stored.insert(len(stored) + 1 + self.axis, n)
        return tuple(stored)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in jax.tree_util.tree_leaves(self))


def is_quantized(x) -> bool:
    return isinstance(x, QArray)


# --- formats: encode a block [.., b] of f32 into (codes, scale, min) and back ---------------------------------
class Format(NamedTuple):
    bits: int                   # 4: two codes per byte
    block: Optional[int]        # None: one block spans the whole axis (per-channel)
    encode: Callable            # x [.., n, b] f32 -> (q [.., n, b] int, scale [.., n], min [.., n] or None)
    decode: Callable            # (q, scale, min) -> x̂ [.., n, b] f32


def _safe(d):
    d = d.astype(jnp.float32)[..., None]
    return jnp.where(d == 0, 1.0, d)


def _symmetric(qmax: int, scale_dtype) -> tuple[Callable, Callable]:
    def encode(x):
        d = (jnp.max(jnp.abs(x), -1) / qmax).astype(scale_dtype)
        return jnp.clip(jnp.round(x / _safe(d)), -qmax, qmax).astype(jnp.int8), d, None
    return encode, lambda q, d, m: q.astype(jnp.float32) * d.astype(jnp.float32)[..., None]


def _affine(levels: int, scale_dtype) -> tuple[Callable, Callable]:
    def encode(x):
        m = jnp.min(x, -1).astype(scale_dtype)
        d = ((jnp.max(x, -1) - jnp.min(x, -1)) / levels).astype(scale_dtype)
        q = jnp.round((x - m.astype(jnp.float32)[..., None]) / _safe(d))
        return jnp.clip(q, 0, levels).astype(jnp.uint8), d, m
    return encode, lambda q, d, m: q.astype(jnp.float32) * d.astype(jnp.float32)[..., None] + \
        m.astype(jnp.float32)[..., None]


def _codebook(values: np.ndarray) -> tuple[Callable, Callable]:
    mids = (values[1:] + values[:-1]) / 2       # numpy: no JAX array at import (jax.distributed comes first)

    def encode(x):
        s = jnp.max(jnp.abs(x), -1)
        return jnp.searchsorted(mids, x / _safe(s)).astype(jnp.uint8), s, None
    return encode, lambda q, s, m: jnp.asarray(values)[q] * s[..., None]


FORMATS = {
    "int8": Format(8, None, *_symmetric(127, jnp.float32)),
    "nf4": Format(4, 64, *_codebook(NF4)),
    "q8_0": Format(8, 32, *_symmetric(127, jnp.float16)),
    "q4_1": Format(4, 32, *_affine(15, jnp.float16)),
    "u8": Format(8, 256, *_affine(255, jnp.float32)),
}
DOUBLE_BLOCK = 256      # QLoRA's block of scales under double quantisation


def _pack(q, bits: int):
    if bits == 8:
        return q
    h = q.shape[-1] // 2
    return q[..., :h] | (q[..., h:] << 4)


def _unpack(c, bits: int):
    return c if bits == 8 else jnp.concatenate([c & 15, c >> 4], axis=-1)


# --- quantise / dequantise ------------------------------------------------------------------------------------
def quantize_array(w, fmt: str, *, block: Optional[int] = None, axis: Optional[int] = None,
                   double_quant: bool = False, path: str = "array") -> QArray:
    """``w`` in format ``fmt``, blocks of ``block`` (the format's own by default) along ``axis`` (``-2`` for
    kernels, ``-1`` for vectors); ``double_quant`` quantises the scales too (8 bits, blocks of 256)."""
    f = FORMATS.get(fmt)
    if f is None:
        raise ReparamError(f"quantize: parameter '{path}': unknown format {fmt!r}; use one of {sorted(FORMATS)}.")
    w = jnp.asarray(w)
    if not jnp.issubdtype(w.dtype, jnp.floating) or w.ndim == 0:
        raise ReparamError(f"quantize: parameter '{path}' {tuple(w.shape)} has dtype {w.dtype}: only floating "
                           "arrays with >= 1 dim can be quantised; narrow `where` to leave it out.")
    axis = (-2 if w.ndim >= 2 else -1) if axis is None else axis
    axis = axis - w.ndim if axis >= 0 else axis
    n = w.shape[axis]
    b = block or f.block or n
    if n % b or (f.bits == 4 and b % 2):
        raise ReparamError(f"quantize: parameter '{path}' {tuple(w.shape)}: {fmt} blocks of {b} along axis {axis} "
                           f"(length {n}) do not divide it{' (4-bit blocks must be even)' if b % 2 else ''}; "
                           f"pass a block that divides {n} (block=...), another axis, or leave the parameter "
                           "out of `where`.")
    q, s, m = _encode(w, fmt=fmt, block=b, axis=axis)
    if double_quant:
        lead = s.shape[:max(s.ndim - 2, 0)]           # stacked layers keep their own blocks of scales
        flat = s.reshape(*lead, -1)
        flat = jnp.pad(flat, [(0, 0)] * len(lead) + [(0, -flat.shape[-1] % DOUBLE_BLOCK)], mode="edge")
        s = quantize_array(flat, "u8", block=DOUBLE_BLOCK, axis=-1, path=f"{path} (scales)")
    return QArray(q, s, m, fmt, b, axis, np.dtype(w.dtype))


@functools.partial(jax.jit, static_argnames=("fmt", "block", "axis"))
def _encode(w, *, fmt: str, block: int, axis: int):
    """``(codes, scales, mins)`` of ``w``: one compiled program per shape and format."""
    f = FORMATS[fmt]
    x = jnp.moveaxis(w.astype(jnp.float32), axis, -1)
    q, s, m = f.encode(x.reshape(*x.shape[:-1], x.shape[-1] // block, block))
    return _pack(q, f.bits), s, m


def _scales(x: QArray):
    """The block scales ``[*rest, n_blocks]``, dequantised from their own blocks under double quantisation."""
    if not is_quantized(x.scales):
        return x.scales
    lead = x.codes.shape[:max(x.codes.ndim - 3, 0)]
    flat = dequantize(x.scales)
    return flat[..., :math.prod(x.codes.shape[len(lead):-1])].reshape(x.codes.shape[:-1])


def dequantize(x: PyTree) -> PyTree:
    """``x`` with every :class:`QArray` replaced by its logical array (pure ``jnp``: jit-able, fusable)."""
    if not is_quantized(x):
        return jax.tree_util.tree_map(lambda a: dequantize(a) if is_quantized(a) else a, x, is_leaf=is_quantized)
    f = FORMATS[x.fmt]
    w = f.decode(_unpack(x.codes, f.bits), _scales(x), x.mins)
    return jnp.moveaxis(w.reshape(*w.shape[:-2], -1), -1, x.axis).astype(x.dtype)


def requantize(w, like: QArray, path: str = "array") -> QArray:
    """``w`` quantised as ``like`` is: same format, block, axis and double quantisation."""
    return quantize_array(w, like.fmt, block=like.block, axis=like.axis, double_quant=is_quantized(like.scales),
                          path=path)


def rebase(frozen: dict, q, w, path: str = "array") -> dict:
    """A transform's frozen entry for a quantised weight ``q`` whose init saw ``w = dequantize(q)``: the base is
    ``q`` itself where the transform kept ``w`` (``W = dequant(q) + ΔW``), and its rewrite -- PiSSA's residual
    ``W0 - A@B`` -- re-quantised in ``q``'s format where it rewrote it (QPiSSA). Plain ``q`` changes nothing."""
    if not is_quantized(q) or "base" not in frozen:
        return frozen
    return {**frozen, "base": q if frozen["base"] is w else requantize(frozen["base"], q, path)}


NOT_WEIGHTS = r"(.*/)?([^/]*(norm|scale|bias|embed|wte|wpe)[^/]*)(/.*)?"
"""Paths :func:`quantize` leaves alone by default: norms, scales, biases and embeddings (as QLoRA quantises only
the linear layers' weights) -- a stacked layer norm ``[layers, d]`` has two dims but is not a weight matrix."""


def quantize(params: PyTree, fmt: str, where: Optional[str] = None, **kwargs) -> PyTree:
    """``params`` with each float leaf whose '/'-joined path fullmatches ``where`` (default: every float leaf
    with >= 2 dims whose path does not match :data:`NOT_WEIGHTS`: no norm, scale, bias or embedding) replaced by
    its :class:`QArray` in format ``fmt``; ``kwargs`` as :func:`quantize_array`. Leaves already quantised are
    kept as they are."""
    from reparam.plan import path_str      # plan imports this module
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)
    rx = None if where is None else re.compile(where)
    out, hits = [], 0
    for kp, w in flat:
        floating = jnp.issubdtype(getattr(w, "dtype", np.asarray(w).dtype), jnp.floating)
        hit = ((np.ndim(w) >= 2 and floating and not re.fullmatch(NOT_WEIGHTS, path_str(kp))) if rx is None
               else bool(rx.fullmatch(path_str(kp))))
        hits += hit
        out.append(quantize_array(w, fmt, path=path_str(kp), **kwargs) if hit and not is_quantized(w) else w)
    if rx is not None and not hits:
        raise ReparamError(f"quantize: where={where!r} matches no parameter path (re.fullmatch); paths look like "
                           f"{[path_str(kp) for kp, _ in flat[:3]]}.")
    return treedef.unflatten(out)


# --- GGUF ---------------------------------------------------------------------------------------------------
GGUF_BLOCKS = {"Q4_1": ("q4_1", 4), "Q8_0": ("q8_0", 2)}      # format, bytes before the codes (f16 d [, f16 m])


def from_gguf_tensor(tensor) -> Any:
    """A ``gguf.GGUFReader`` tensor as held in the file: Q4_1 / Q8_0 blocks as a :class:`QArray` of logical
    shape ``tensor.data``'s rows × entries (numpy order, ``[out, in]`` for a weight; blocks along the last
    axis), never re-quantised; F32 / F16 tensors as plain arrays."""
    kind = tensor.tensor_type.name
    if kind in ("F32", "F16"):
        return jnp.asarray(tensor.data)
    if kind not in GGUF_BLOCKS:
        raise ReparamError(f"GGUF tensor {tensor.name!r} has type {kind}; from_gguf_tensor reads {sorted(GGUF_BLOCKS)} "
                           "blocks (and F32/F16 arrays); dequantise it with gguf.quants.dequantize(t.data, "
                           "t.tensor_type) and quantize(...) the result in a supported format.")
    fmt, head = GGUF_BLOCKS[kind]
    raw = np.asarray(tensor.data)
    nb = int(tensor.shape[0]) // 32                  # gguf's shape is ggml's: entries per row first
    raw = raw.reshape(*raw.shape[:-1], nb, -1)
    f16 = lambda a: jnp.asarray(np.ascontiguousarray(a).view(np.float16)[..., 0])
    codes = raw[..., head:] if fmt == "q4_1" else raw[..., head:].view(np.int8)
    return QArray(jnp.asarray(codes), f16(raw[..., 0:2]), f16(raw[..., 2:4]) if fmt == "q4_1" else None,
                  fmt, 32, -1, np.dtype(np.float32))


def transpose(x: QArray) -> QArray:
    """The quantised matrix transposed on its last two axes (GGUF's ``[out, in]`` to a ``[in, out]`` kernel):
    the codes stay where they are, the blocks now run along the other axis."""
    if x.axis not in (-1, -2):
        raise ReparamError(f"transpose: blocks run along axis {x.axis}; only the last two axes swap in place.")
    return dataclasses.replace(x, axis=-3 - x.axis)


# --- what a frozen tree holds ----------------------------------------------------------------------------------
def describe(x) -> str:
    """``"nf4 12,288 B"`` for a quantised array, ``"float32 49,152 B"`` for a plain one."""
    if is_quantized(x):
        return f"{x.fmt}{'+dq' if is_quantized(x.scales) else ''} {x.nbytes:,} B"
    return f"{np.dtype(x.dtype).name} {int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize:,} B"


def footprint(tree: PyTree) -> dict[str, list[int]]:
    """``{format: [arrays, bytes held, bytes in f32]}`` over the tree's arrays (``"unquantised"``: plain ones)."""
    per: dict[str, list[int]] = {}
    for x in jax.tree_util.tree_leaves(tree, is_leaf=is_quantized):
        fmt = x.fmt if is_quantized(x) else "unquantised"
        n = int(np.prod(x.shape))
        nbytes = x.nbytes if is_quantized(x) else n * x.dtype.itemsize      # a PRNG key's dtype has one too
        c = per.setdefault(fmt, [0, 0, 0])
        c[0], c[1], c[2] = c[0] + 1, c[1] + nbytes, c[2] + 4 * n
    return per


def report(frozen: PyTree) -> str:
    """One line: the frozen tree's bytes, and per format its bases, their bytes and what they would be in f32."""
    per = footprint(frozen)
    total = sum(c[1] for c in per.values())
    parts = [f"{fmt}: {c[0]} arrays, {c[1]:,} bytes" + (f" ({c[1] / c[2]:.3f} of f32)" if fmt != "unquantised" else "")
             for fmt, c in sorted(per.items())]
    return f"frozen: {total:,} bytes ({'; '.join(parts)})"
