"""Numeric parity with Hugging Face PEFT (torch CPU, float32): FourierFT and WaveFT (Haar).

Both put trainable values at a fixed support of a coefficient matrix that PEFT
builds in torch's ``[out, in]`` orientation, with PEFT's entry ``(o, i)`` from
``indices = [flat // in, flat % in]``. We read PEFT's support and values, map
them to flat indices of our ``[in, out]`` coefficient matrix, feed them through
``sparse.from_support`` inside the same ``in_basis`` composition as
``rp.fourierft`` / ``rp.waveft``, and compare layer outputs (ours: ``x @ W + bias``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from peft import FourierFTConfig, WaveFTConfig, get_peft_model

from reparam import sparse
from reparam.core import in_basis
from reparam.wavelet import fourier_basis, fourierft, wavelet_basis, waveft

pytestmark = pytest.mark.peft

BATCH, TOL = 5, 1e-5


def _peft(config, d_in, d_out, seed=0):
    """``(layer, W0 [d_in, d_out], bias, model)``: one ``nn.Linear`` wrapped by PEFT."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential()
    net.add_module("lin", torch.nn.Linear(d_in, d_out))
    w0, bias = net.lin.weight.detach().numpy().T.copy(), net.lin.bias.detach().numpy().copy()
    model = get_peft_model(net, config).eval()
    return model.base_model.model.lin, w0, bias, model


def _set_random(param, seed):
    with torch.no_grad():
        param.copy_(torch.from_numpy(np.random.default_rng(seed).normal(0, 1, param.shape).astype(np.float32)))
    return param.detach().numpy().copy()


def _ours(basis, flat, values, scale, w0):
    """Our adapter at PEFT's support: ``(W, flat index set)`` via the same composition as the method."""
    order = np.argsort(flat)
    t = in_basis(basis, sparse.from_support("peft", lambda key, w, calib: jnp.asarray(flat)), scale)
    frozen, trainable = t.init(jax.random.key(0), jnp.asarray(w0))
    assert np.array_equal(frozen["inner"]["idx"], flat[order])
    return t.apply(frozen, {"values": jnp.asarray(values[order])})


def _close(got, want):
    """Max abs error, asserted below ``TOL`` relative to the larger of 1 and ``max |want|``."""
    err = float(np.max(np.abs(np.asarray(got) - want)))
    assert err <= TOL * max(1.0, float(np.max(np.abs(want)))), err
    return err


def _compare(model, layer, w, w0, bias, d_in):
    """Layer outputs and ``ΔW`` (PEFT's ``get_delta_weight``, transposed) agree."""
    x = np.random.default_rng(9).normal(0, 1, (BATCH, d_in)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    _close(x @ w + bias, want)
    _close(np.asarray(w) - w0, layer.get_delta_weight("default").detach().numpy().T)


@pytest.mark.parametrize("d_in,d_out,n", [(12, 8, 20), (7, 9, 63), (16, 16, 40)])
def test_fourierft_matches_peft(d_in, d_out, n):
    layer, w0, bias, model = _peft(FourierFTConfig(n_frequency=n, scaling=150.0, target_modules=["lin"]),
                                   d_in, d_out)
    values = _set_random(layer.fourierft_spectrum["default"], 1)
    o, i = layer.indices["default"].numpy()
    flat = i * d_out + o                     # C = Sᵀ: PEFT's (o, i) is our (i, o), since ifft2(Sᵀ) = ifft2(S)ᵀ
    w = _ours(fourier_basis(), flat, values, 150.0, w0)
    _compare(model, layer, w, w0, bias, d_in)
    # same composition as rp.fourierft, which only draws its own support
    assert fourierft(n).init(jax.random.key(0), jnp.asarray(w0))[1]["values"].shape == (n,)


def _waveft_flat(rows, cols, d_in, d_out):
    """PEFT's ``(o, i)`` in its ``[out, in]`` spectrum -> our flat index in the ``[in, out]`` coefficients.

    PEFT splits the spectrum into 2x2 blocks ``[[A, B], [C, D]]`` and reconstructs
    ``(A, (B, C, D))`` with ``B`` as the row-high-pass band; in our orientation
    that is ``[[Aᵀ, Bᵀ], [Cᵀ, Dᵀ]]``: each block transposed where it stands.
    """
    h2, w2 = d_out // 2, d_in // 2
    br, r = np.divmod(rows, h2)
    bc, c = np.divmod(cols, w2)
    return (br * w2 + c) * d_out + (bc * h2 + r)


@pytest.mark.parametrize("d_in,d_out,n", [(12, 8, 20), (8, 20, 160), (16, 16, 50)])
def test_waveft_haar_matches_peft(d_in, d_out, n):
    config = WaveFTConfig(n_frequency=n, scaling=25.0, wavelet_family="db1", target_modules=["lin"])
    layer, w0, bias, model = _peft(config, d_in, d_out)
    values = _set_random(layer.waveft_spectrum["default"], 2)
    rows, cols = layer.waveft_indices["default"].numpy()
    flat = _waveft_flat(rows, cols, d_in, d_out)
    w = _ours(wavelet_basis("haar"), flat, values, 25.0, w0)
    _compare(model, layer, w, w0, bias, d_in)
    assert waveft(k=n, scale=25.0).init(jax.random.key(0), jnp.asarray(w0))[1]["values"].shape == (n,)
