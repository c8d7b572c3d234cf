"""The sampled product ``v_k = Σ_n x[n, i_k] · g[n, j_k]`` (SDDMM): a sparse ``ΔW``'s gradient.

For ``y = x @ (W0 + ΔW)`` with ``ΔW`` zero off a support ``{(i_k, j_k)}`` of a ``[d_in, d_out]``
weight, the gradient of the support's values is ``(xᵀg)[i_k, j_k]``: ``N·k`` multiply-adds for ``N``
tokens, where the dense ``xᵀg`` costs ``N·d_in·d_out`` -- full fine-tuning's weight gradient. XLA has
no sampled product, and XLA:CPU's gathers of the ``2·k`` length-``N`` columns are slower than the dense
GEMM (figures: ``benchmarks/results/library_notes.md``), so

- on CPU, where numba is installed, :func:`sampled_dot` is an XLA FFI kernel compiled by numba at
  first use. It reads ``x`` and ``g`` row-major as XLA has them, transposes 256 tokens at a time into
  cache-sized buffers and takes the ``k`` dot products over those tokens (``benchmarks/grad_paths.py``),
  on one thread, while XLA's pool runs the rest of the backward (column-major ``x`` and ``g`` from XLA
  cost more in layout copies than they saved);
- elsewhere (GPU, TPU, or no numba) it reads the support off the dense ``xᵀg`` (``dense()``), which
  an accelerator's GEMM makes cheap.

:func:`choose` stages both and lets XLA keep the branch of the platform it compiles for
(``jax.lax.platform_dependent``), so one jitted step runs anywhere.
"""
from __future__ import annotations

import ctypes
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp

Array = jax.Array

TARGET = "reparam_sampled_dot"
C64 = 15        # XLA_FFI_DataType of complex64 (xla/ffi/api/c_api.h)
BLOCK = 256     # tokens per block: x's and g's rows transposed into [d, BLOCK] buffers (L2-sized at d=1536)


@functools.cache
def _kernel():
    """The FFI handler's address, built and registered with XLA:CPU once; None without numba."""
    try:
        import numba
        import numpy as np
        from numba import carray, types
        from numba.extending import intrinsic
    except ImportError:
        return None

    @intrinsic
    def ptr(typingctx, addr):                      # int64 address -> void*
        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(types.voidptr))
        return types.voidptr(types.int64), codegen

    @numba.njit(fastmath=True)
    def dots(x, g, idx, out):                      # x [N, d_in], g [N, d_out], idx flat into [d_in, d_out]
        n, d_in = x.shape
        d_out = g.shape[1]
        rows, cols = idx // d_out, idx % d_out
        xt, gt = np.empty((d_in, BLOCK), np.float32), np.empty((d_out, BLOCK), np.float32)
        out[:] = 0.0
        for t0 in range(0, n, BLOCK):              # BLOCK tokens at a time, transposed in 8-row strips
            nb = min(BLOCK, n - t0)
            full = nb // 8 * 8                     # a constant strip height lets LLVM vectorise (3x faster)
            for t1 in range(0, full, 8):
                for i in range(d_in):
                    for t in range(8):
                        xt[i, t1 + t] = x[t0 + t1 + t, i]
                for j in range(d_out):
                    for t in range(8):
                        gt[j, t1 + t] = g[t0 + t1 + t, j]
            for t in range(full, nb):
                for i in range(d_in):
                    xt[i, t] = x[t0 + t, i]
                for j in range(d_out):
                    gt[j, t] = g[t0 + t, j]
            for k in range(idx.shape[0]):          # k dot products of length nb, in cache
                a, b = xt[rows[k]], gt[cols[k]]
                s = np.float32(0.0)
                for t in range(nb):
                    s += a[t] * b[t]
                out[k] += s

    @numba.njit
    def buffer(addr):                              # XLA_FFI_Buffer {size, ext, dtype, data, rank, dims*}
        b = carray(ptr(addr), (6,), np.int64)      # -> data, dims, 2 for complex64 (XLA_FFI_DataType 15)
        return ptr(b[3]), carray(ptr(b[5]), (b[4],), np.int64), 2 if b[2] & 0xFFFFFFFF == C64 else 1

    # XLA_FFI_Error* handler(XLA_FFI_CallFrame*), the frame read as int64 words (xla/ffi/api/c_api.h):
    # [1] extension_start, [9] args.args (void**), [14] rets.rets (void**). Null means success.
    @numba.cfunc(types.int64(types.CPointer(types.int64)))
    def handler(frame):
        if frame[1] != 0:                          # XLA asks for metadata: FFI API 0.3, no traits
            ext = carray(ptr(frame[1]), (4,), np.int64)
            if ext[1] & 0xFFFFFFFF == 1:           # XLA_FFI_Extension_Metadata
                meta = carray(ptr(ext[3]), (10,), np.int32)
                meta[6], meta[7], meta[8] = 0, 3, 0
            return 0
        args, rets = carray(ptr(frame[9]), (3,), np.int64), carray(ptr(frame[14]), (1,), np.int64)
        x, xd, xc = buffer(args[0])                # a complex64 row is read as its interleaved re, im
        g, gd, gc = buffer(args[1])
        idx, kd, _ = buffer(args[2])
        out, _, _ = buffer(rets[0])
        dots(carray(x, (xd[0], xd[1] * xc), np.float32), carray(g, (gd[0], gd[1] * gc), np.float32),
             carray(idx, (kd[0],), np.int32), carray(out, (kd[0],), np.float32))
        return 0

    new = ctypes.pythonapi.PyCapsule_New
    new.restype, new.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
    jax.ffi.register_ffi_target(TARGET, new(handler.address, b"xla._CUSTOM_CALL_TARGET", None), platform="cpu")
    return handler.address


def available() -> bool:
    """Whether the CPU kernel can run here (numba importable; registered on the first call)."""
    return _kernel() is not None


def sampled_dot(x: Array, g: Array, idx: Array) -> Array:
    """``v[k] = Σ_n x[n, idx[k] // d_out] · g[n, idx[k] % d_out]`` for ``x [N, d_in]``, ``g [N, d_out]``.

    The CPU kernel (float32, ``N·k`` multiply-adds); call it inside :func:`choose`'s CPU branch, as it
    has no lowering on other platforms. ``idx`` is flat into ``[d_in, d_out]``, int32.

    A complex ``x`` (or ``g``) is read, without a copy, as the real ``[N, 2·d]`` array of its interleaved
    real and imaginary parts (column ``2u`` is ``Re x[:, u]``, ``2u + 1`` is ``Im x[:, u]``), and
    ``d_in`` (``d_out``) above is that ``2·d``: how a DFT basis's half spectrum is sampled
    (:meth:`reparam.structure.InBasis.pullback`)."""
    if _kernel() is None:
        raise RuntimeError("reparam.sampled.sampled_dot needs numba (pip install numba); "
                           "reparam.sampled.choose falls back to the dense xᵀg without it.")
    f32 = jnp.float32
    as_kernel = lambda v: v.astype(jnp.complex64 if jnp.iscomplexobj(v) else f32)
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(idx.shape, f32), vmap_method="sequential")
    return call(as_kernel(x), as_kernel(g), idx.astype(jnp.int32))


def choose(args, sampled: Callable, dense: Callable, use: Optional[bool] = None):
    """``sampled(*args)`` when compiled for CPU with the kernel available, else ``dense(*args)``.

    ``use=False`` forces ``dense`` (tests, A/B timing)."""
    if use is False or not available():
        return dense(*args)
    return jax.lax.platform_dependent(*args, cpu=sampled, default=dense)
