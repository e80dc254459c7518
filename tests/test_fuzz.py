"""Property tests: random shapes, lengths, labels, blanks and junk in padding, against the float64
reference. The default profile is bounded; `--fuzz-examples N` runs a longer one."""

import jax
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jax_transducer as jt
import reference as ref

JUNK = [np.nan, np.inf, -np.inf, 1e30, -1e30, 0.0]


@st.composite
def batches(draw):
    B = draw(st.integers(1, 4))
    T = draw(st.integers(1, 6))
    U = draw(st.integers(0, 5))
    V = draw(st.integers(2, 9))
    blank = draw(st.integers(0, V - 1))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    scale = draw(st.sampled_from([0.1, 1.0, 5.0, 20.0]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    in_len = rng.integers(1, T + 1, size=B).astype(np.int32)
    lab_len = rng.integers(0, U + 1, size=B).astype(np.int32)
    E = rng.normal(size=(B, T, V)) * scale
    P = rng.normal(size=(B, U + 1, V)) * scale
    nonblank = [v for v in range(V) if v != blank]
    labels = rng.choice(nonblank, size=(B, U)).astype(np.int32)
    junk = draw(st.sampled_from(JUNK))
    for b in range(B):
        E[b, in_len[b]:] = junk
        P[b, lab_len[b] + 1:] = junk
        labels[b, lab_len[b]:] = draw(st.sampled_from([-1, V, 2**30, blank]))
    return E.astype(dtype), P.astype(dtype), labels, in_len, lab_len, blank


def tolerance(dtype):
    return dict(rtol=1e-9, atol=1e-9) if dtype == np.float64 else dict(rtol=2e-4, atol=2e-4)


@pytest.fixture(scope="module")
def grad_fn():
    return jax.jit(jax.value_and_grad(
        lambda e, p, l, i, j, blank: jt.transducer_loss(e, p, l, i, j, blank=blank).sum(),
        argnums=(0, 1)), static_argnums=5)


COUNT = {"examples": 0}


@given(batches())
def test_costs_gradients_and_viterbi_match_the_reference(grad_fn, batch):
    E, P, labels, in_len, lab_len, blank = batch
    COUNT["examples"] += 1
    costs = np.asarray(jt.transducer_loss(E, P, labels, in_len, lab_len, blank=blank))
    E64, P64 = E.astype(np.float64), P.astype(np.float64)
    np.testing.assert_allclose(costs, ref.costs(E64, P64, labels, in_len, lab_len, blank),
                               **tolerance(E.dtype))
    _, (gE, gP) = grad_fn(E, P, labels, in_len, lab_len, blank)
    wE, wP = ref.gradients(E64, P64, labels, in_len, lab_len, blank)
    np.testing.assert_allclose(np.asarray(gE), wE, **tolerance(E.dtype))
    np.testing.assert_allclose(np.asarray(gP), wP, **tolerance(E.dtype))
    if E.dtype == np.float64:  # float32 rounding may reorder near-ties
        got = np.asarray(jt.viterbi(E, P, in_len, lab_len, blank=blank))
        np.testing.assert_array_equal(got, ref.viterbi(E64, P64, in_len, lab_len, blank))


def test_report_fuzz_count():
    # Runs after the property test in file order; prints how many examples were tried.
    print(f"\nfuzz: {COUNT['examples']} random batches checked")
