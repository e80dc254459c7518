"""Property tests against the float64 reference: random shapes, lengths, labels, blanks, dtypes
(bfloat16 too), logit scales up to 1e3, junk in padding and non-finite values inside one example.
The default profile is bounded; `--fuzz-examples N` runs a longer one."""

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
    dtype = draw(st.sampled_from([np.float32, np.float64, "bfloat16"]))
    scale = draw(st.sampled_from([0.1, 1.0, 5.0, 20.0, 1e3]))
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
    # Sometimes a non-finite value inside one example's used region: only that example may change.
    poisoned = draw(st.sampled_from([None, None, None, np.nan, np.inf, -np.inf]))
    if poisoned is not None:
        E[B - 1, rng.integers(in_len[B - 1]), rng.integers(V)] = poisoned
    return (E.astype(dtype), P.astype(dtype), labels, in_len, lab_len, blank,
            None if poisoned is None else (B - 1, poisoned), scale)


def tolerance(dtype, scale, gradient=False):
    """float32 runs inside for float32 and bfloat16 (compared on the rounded inputs): logits of
    size `scale` carry about 1e-7 * scale each. bfloat16 gradients come back in bfloat16."""
    if dtype == np.float64:
        return dict(rtol=1e-9, atol=1e-9 * max(1.0, scale))
    if gradient and dtype != np.float32:
        return dict(rtol=1e-2, atol=1e-2)
    return dict(rtol=2e-4 * max(1.0, scale / 20), atol=2e-4 * max(1.0, scale / 20))


@pytest.fixture(scope="module")
def grad_fn():
    return jax.jit(jax.value_and_grad(
        lambda e, p, l, i, j, blank: jt.transducer_loss(e, p, l, i, j, blank=blank).sum(),
        argnums=(0, 1)), static_argnums=5)


COUNT = {"examples": 0}


@given(batches())
def test_costs_gradients_and_viterbi_match_the_reference(grad_fn, batch):
    E, P, labels, in_len, lab_len, blank, poisoned, scale = batch
    COUNT["examples"] += 1
    tol = tolerance(E.dtype, scale)
    keep = np.ones(E.shape[0], bool)  # the examples the reference speaks for
    costs = np.asarray(jt.transducer_loss(E, P, labels, in_len, lab_len, blank=blank))
    if poisoned is not None:
        b, value = poisoned
        keep[b] = False
        if not value < 0:  # NaN or +inf poisons the example; -inf may be a harmless zero prob.
            assert not np.isfinite(costs[b])
    if not keep.any():
        return
    E64, P64 = E.astype(np.float64)[keep], P.astype(np.float64)[keep]
    args64 = (labels[keep], in_len[keep], lab_len[keep])
    np.testing.assert_allclose(costs[keep], ref.costs(E64, P64, *args64, blank), **tol)
    _, (gE, gP) = grad_fn(E[keep], P[keep], *args64, blank)
    wE, wP = ref.gradients(E64, P64, *args64, blank)
    gtol = tolerance(E.dtype, scale, gradient=True)
    np.testing.assert_allclose(np.asarray(gE, np.float64), wE, **gtol)
    np.testing.assert_allclose(np.asarray(gP, np.float64), wP, **gtol)
    if E.dtype == np.float64:  # float32 rounding may reorder near-ties
        got = np.asarray(jt.viterbi(E, P, in_len, lab_len, blank=blank))[keep]
        np.testing.assert_array_equal(got, ref.viterbi(E64, P64, args64[1], args64[2], blank))


def test_report_fuzz_count():
    # Runs after the property test in file order; prints how many examples were tried.
    print(f"\nfuzz: {COUNT['examples']} random batches checked")
