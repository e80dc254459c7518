"""Viterbi against the reference and brute force; its semantics at the edges."""

import jax
import numpy as np
import pytest

import jax_transducer as jt
import reference as ref
from util import CASES, make_batch, put


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_viterbi_matches_reference(device, case, dtype):
    E, P, _, in_len, lab_len = make_batch(dtype=dtype, **case)
    blank = case.get("blank", 0)
    got = jt.viterbi(*put(device, E, P, in_len, lab_len), blank=blank)
    assert got.dtype == np.int32 and got.shape == (E.shape[0], P.shape[1] - 1)
    want = ref.viterbi(E.astype(np.float64), P.astype(np.float64), in_len, lab_len, blank)
    np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("kind", ["gaussian", "peaky", "anti"])
def test_viterbi_with_candidate_labels_matches_reference(device, kind):
    # V >= 128: the CPU kernel finds each cell's best label among candidates (BestLabels); peaky
    # rows settle every cell, anti-correlated ones send most cells to the dense max.
    E, P, _, in_len, lab_len = make_batch(7, B=3, T=21, U=6, V=600, blank=5)
    rng = np.random.default_rng(7)
    if kind == "peaky":
        E[:, np.arange(21), rng.integers(0, 600, size=21)] += 12
        P[:, np.arange(7), rng.integers(0, 600, size=7)] += 12
    elif kind == "anti":
        s = 4 * rng.normal(size=600)
        E, P = E + s, P - s
    E, P = E.astype(np.float32), P.astype(np.float32)
    got = jt.viterbi(*put(device, E, P, in_len, lab_len), blank=5)
    want = ref.viterbi(E.astype(np.float64), P.astype(np.float64), in_len, lab_len, 5)
    np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("seed,blank", [(40, 0), (41, 3), (42, 1)])
def test_viterbi_matches_brute_force(device, seed, blank):
    E, P, _, in_len, lab_len = make_batch(seed, B=4, T=4, U=3, V=5, blank=blank)
    got = jt.viterbi(*put(device, E, P, in_len, lab_len), blank=blank)
    np.testing.assert_array_equal(np.asarray(got),
                                  ref.brute_force_viterbi(E, P, in_len, lab_len, blank))


def test_positions_past_label_length_hold_blank(device):
    E, P, _, in_len, lab_len = make_batch(43, B=4, U=5, V=9, blank=6)
    got = np.asarray(jt.viterbi(*put(device, E, P, in_len, lab_len), blank=6))
    for b in range(4):
        assert (got[b, lab_len[b]:] == 6).all() and (got[b, :lab_len[b]] != 6).all()


def test_ties_go_to_blank_arrivals_and_lowest_label(device):
    # All scores equal, so every path ties: the DP keeps blank arrivals, the argmax label 1.
    E, P = np.zeros((1, 3, 4)), np.zeros((1, 3, 4))
    got = jt.viterbi(*put(device, E, P, np.array([3]), np.array([2])))
    np.testing.assert_array_equal(np.asarray(got), [[1, 1]])
    np.testing.assert_array_equal(np.asarray(got), ref.viterbi(E, P, [3], [2]))


def test_viterbi_is_not_differentiated(device):
    E, P, labels, in_len, lab_len = make_batch(44)

    def f(e):
        best = jt.viterbi(e, P, in_len, lab_len)
        return jt.transducer_loss(e, P, best, in_len, lab_len).sum()

    g = jax.grad(f)(*put(device, E))
    want = jax.grad(lambda e: jt.transducer_loss(
        e, P, jt.viterbi(E, P, in_len, lab_len), in_len, lab_len).sum())(*put(device, E))
    np.testing.assert_allclose(np.asarray(g), np.asarray(want))
