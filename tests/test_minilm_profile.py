"""benchmarks/minilm_profile.py's bookkeeping: time shares of concurrent operations, and the dots it reads from
XLA's HLO text (which a JAX upgrade could reformat)."""
import jax
import jax.numpy as jnp
import pytest

from benchmarks import minilm_profile as P


def test_shares_split_concurrent_time_and_add_up_to_the_busy_time():
    # a: 0-10, b: 5-15 (overlapping a for 5), c: 20-30 (alone), over 2 steps
    events = [("a", 0, 10), ("b", 5, 15), ("c", 20, 30)]
    out = P._shares([(n, t0 * 10 ** 6, t1 * 10 ** 6) for n, t0, t1 in events], steps=2)
    assert {n: out[n]["duration"] for n in "abc"} == pytest.approx({"a": 5.0, "b": 5.0, "c": 5.0})
    assert {n: out[n]["share"] for n in "abc"} == pytest.approx({"a": 3.75, "b": 3.75, "c": 5.0})
    busy = (15 + 10) / 2                                   # ms per step when anything runs
    assert sum(v["share"] for v in out.values()) == pytest.approx(busy)


@pytest.mark.parametrize("layout", ["NN", "NT", "TN"])
def test_dots_are_found_in_compiled_hlo_with_their_gemm_shape(layout):
    m, k, n = 48, 40, 24
    a = jnp.ones((m, k) if layout[0] == "N" else (k, m))
    b = jnp.ones((k, n) if layout[1] == "N" else (n, k))
    fa = (lambda t: t) if layout[0] == "N" else (lambda t: t.T)
    fb = (lambda t: t) if layout[1] == "N" else (lambda t: t.T)
    text = jax.jit(lambda x, y: jnp.tanh(fa(x) @ fb(y))).lower(a, b).compile().as_text()
    types, bodies = P._hlo_tables(text)
    # the fusion and the dot in its body describe the same product
    dots = {str(d): d for d in (P._dot_of(name, types, bodies) for name in types) if d is not None}
    assert len(dots) == 1, dots
    dots = list(dots.values())
    assert P._gemm_mnk(*dots[0]) == (m, n, k, layout)


def test_batched_dots_have_no_gemm_shape():
    q = jnp.ones((2, 3, 8, 4))
    text = jax.jit(lambda q, k: jnp.einsum("bhqd,bhkd->bhqk", q, k)).lower(q, q).compile().as_text()
    types, bodies = P._hlo_tables(text)
    dots = list({str(d): d for d in (P._dot_of(name, types, bodies) for name in types) if d is not None}.values())
    assert len(dots) == 1 and dots[0][5] == [0, 1]
    assert P._gemm_mnk(*dots[0]) is None
