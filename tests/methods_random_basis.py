"""Random-basis family (VeRA, NOLA, RandLoRA) registered for the shared laws of ``test_laws.py``."""
from reparam import random_basis as rb

_NA, _NB = 8, 6


def _randlora_count(d_in, d_out, r):
    n = rb.num_bases(d_in, d_out, r)
    return n * (r + min(d_in, d_out))


METHODS = {
    "vera": (lambda r: rb.vera(r), lambda i, o, r: r + o, 0.0),
    "nola": (lambda r: rb.nola(r, _NA, _NB, alpha=2 * r), lambda i, o, r: _NA + _NB, 0.0),
    "randlora": (lambda r: rb.randlora(r), _randlora_count, 0.0),
    "randlora_peft": (lambda r: rb.randlora(r, alpha=2 * r, scaling="peft"), _randlora_count, 0.0),
    # the bases drawn once into frozen["bases"] instead of regenerated per step (NOLA's and RandLoRA's stored
    # bases: test_random_basis.py checks their delta and gradient against the regenerated ones)
    "vera_stored": (lambda r: rb.vera(r, store_bases=True), lambda i, o, r: r + o, 0.0),
}
