"""Wavelet / Fourier / DCT methods (``in_basis``) registered for the shared laws of ``test_laws.py``."""
from reparam import sparse
from reparam.core import in_basis
from reparam.wavelet import dct_basis, fourierft, wara, waveft


def _divisible(m):
    return lambda i, o, r: i % m == 0 and o % m == 0


METHODS = {
    "waveft": (lambda r: waveft(k=r, scale=2.0), lambda i, o, r: r, 0.0, _divisible(2)),
    "waveft_db2_l2": (lambda r: waveft(k=r, wavelet="db2", levels=2), lambda i, o, r: r, 0.0, _divisible(4)),
    "wara": (lambda r: wara(r, alpha=2 * r), lambda i, o, r: r * (i + o), 0.0, _divisible(2)),
    "fourierft": (lambda r: fourierft(r), lambda i, o, r: r, 0.0),
    "dct_sparse": (lambda r: in_basis(dct_basis(), sparse.random(k=r)), lambda i, o, r: r, 0.0),
}
