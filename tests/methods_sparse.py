"""Sparse-mask family for the shared laws: random, magnitude, sensitivity (SPT), LT-SFT, S²FT, SLTrain."""
import jax.numpy as jnp

import reparam as rp
from reparam import sparse

_q = lambda i, o, r: max(1, int(round(0.25 * i * o)))   # density=0.25

METHODS = {
    "sparse_random_k": (lambda r: sparse.random(k=2 * r), lambda i, o, r: 2 * r, 0.0),
    "sparse_random_density": (lambda r: sparse.random(density=0.25, scale=2.0), _q, 0.0),
    "sparse_magnitude_smallest": (lambda r: sparse.magnitude(k=2 * r), lambda i, o, r: 2 * r, 0.0),
    "sparse_magnitude_largest": (lambda r: sparse.magnitude(density=0.25, largest=True), _q, 0.0),
    "sparse_sensitivity": (lambda r: sparse.sensitivity(k=2 * r), lambda i, o, r: 2 * r, 0.0),
    "sparse_lt_sft": (lambda r: sparse.lt_sft(k=2 * r), lambda i, o, r: 2 * r, 0.0),
    "sparse_s2ft_rows": (lambda r: sparse.structured(axis="in", k=r), lambda i, o, r: r * o, 0.0),
    "sparse_s2ft_cols": (lambda r: sparse.structured(axis="out", k=r, select="norm"), lambda i, o, r: i * r, 0.0),
    "sparse_sltrain": (lambda r: rp.add(rp.lora(r), sparse.random(k=2 * r)), lambda i, o, r: r * (i + o) + 2 * r,
                       0.0),
}


def _diff(key, w):
    from tests.methods import normal            # tests.methods imports this module: import at call time
    return jnp.asarray(normal(key, w.shape))


# LT-SFT's calibration: θ1 − θ0 of a full fine-tuning run (here random)
CALIB = {"diff": _diff}
