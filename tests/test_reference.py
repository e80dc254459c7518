"""Self-consistency tests of the NumPy RNN-T reference (tests/reference.py)."""

import math
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference as ref  # noqa: E402


def make_batch(seed, B=4, T=5, U=4, V=5, blank=0, lengths=None, pad=np.nan):
    """Random batch; unused positions are filled with `pad` (labels with a huge index)."""
    rng = np.random.default_rng(seed)
    E = rng.normal(size=(B, T, V)) * 2.0
    P = rng.normal(size=(B, U + 1, V)) * 2.0
    nonblank = np.array([v for v in range(V) if v != blank])
    labels = rng.choice(nonblank, size=(B, U))
    if lengths is None:
        in_len = rng.integers(1, T + 1, size=B)
        lab_len = rng.integers(0, U + 1, size=B)
        in_len[0], lab_len[0] = T, U          # full example
        lab_len[1 % B] = 0                    # empty label sequence
    else:
        in_len, lab_len = (np.array(x) for x in zip(*lengths))
    for b in range(B):
        E[b, in_len[b]:] = pad
        P[b, lab_len[b] + 1:] = pad
        labels[b, lab_len[b]:] = 10**6
    return E, P, labels, in_len, lab_len


CASES = [
    dict(seed=0),
    dict(seed=1, blank=2),
    dict(seed=2, blank=4, T=3, U=6),                               # U_b > T_b
    dict(seed=3, lengths=[(1, 4), (1, 0), (2, 3), (5, 1)]),        # T_b = 1
    dict(seed=4, V=2, blank=1),
    dict(seed=5, B=3, T=6, U=5, V=7, blank=3, pad=np.inf),
]


@pytest.mark.parametrize("case", CASES)
def test_costs_match_brute_force(case):
    blank = case.get("blank", 0)
    E, P, y, il, ll = make_batch(**case)
    c = ref.costs(E, P, y, il, ll, blank=blank)
    assert c.dtype == np.float64 and c.shape == (E.shape[0],)
    assert np.all(np.isfinite(c))
    np.testing.assert_allclose(c, ref.brute_force_costs(E, P, y, il, ll, blank=blank), rtol=1e-12)


def test_costs_uniform_closed_form():
    T, U, V = 4, 3, 6
    E, P = np.zeros((1, T, V)), np.zeros((1, U + 1, V))
    y = np.array([[1, 2, 3]])
    c = ref.costs(E, P, y, [T], [U])
    expected = (T + U) * math.log(V) - math.log(math.comb(T - 1 + U, U))
    np.testing.assert_allclose(c, [expected], rtol=1e-13)


def test_log_softmax_joiner():
    rng = np.random.default_rng(7)
    E, P = rng.normal(size=(3, 5)) * 50, rng.normal(size=(4, 5)) * 50
    lp = ref.log_softmax_joiner(E, P)
    assert lp.shape == (3, 4, 5)
    np.testing.assert_allclose(np.exp(lp).sum(-1), 1.0, rtol=1e-13)
    np.testing.assert_allclose(lp[1, 2] - lp[1, 2, 0], (E[1] + P[2]) - (E[1, 0] + P[2, 0]), atol=1e-10)


@pytest.mark.parametrize("delay", [0.0, 0.7])
@pytest.mark.parametrize("case", CASES)
def test_gradients_finite_differences(case, delay):
    blank = case.get("blank", 0)
    E, P, y, il, ll = make_batch(**case)
    dE, dP = ref.gradients(E, P, y, il, ll, blank=blank, delay_penalty=delay)
    assert dE.shape == E.shape and dP.shape == P.shape
    rng = np.random.default_rng(100 + case["seed"])
    eps = 1e-6
    for arr, grad in ((E, dE), (P, dP)):
        for _ in range(6):
            b = rng.integers(arr.shape[0])
            n_used = il[b] if arr is E else ll[b] + 1
            idx = (b, rng.integers(n_used), rng.integers(arr.shape[2]))
            plus, minus = arr.copy(), arr.copy()
            plus[idx] += eps
            minus[idx] -= eps
            args_p = (plus, P) if arr is E else (E, plus)
            args_m = (minus, P) if arr is E else (E, minus)
            fd = (ref.costs(*args_p, y, il, ll, blank=blank, delay_penalty=delay).sum()
                  - ref.costs(*args_m, y, il, ll, blank=blank, delay_penalty=delay).sum()) / (2 * eps)
            np.testing.assert_allclose(grad[idx], fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("case", CASES)
def test_gradients_zero_in_padding_and_sum_to_zero(case):
    blank = case.get("blank", 0)
    E, P, y, il, ll = make_batch(**case)
    dE, dP = ref.gradients(E, P, y, il, ll, blank=blank)
    for b in range(E.shape[0]):
        assert np.all(dE[b, il[b]:] == 0.0)
        assert np.all(dP[b, ll[b] + 1:] == 0.0)
        assert np.all(np.isfinite(dE[b])) and np.all(np.isfinite(dP[b]))
    # softmax gradients sum to zero over the vocabulary
    np.testing.assert_allclose(dE.sum(-1), 0.0, atol=1e-12)
    np.testing.assert_allclose(dP.sum(-1), 0.0, atol=1e-12)


@pytest.mark.parametrize("case", CASES)
def test_viterbi_matches_brute_force(case):
    blank = case.get("blank", 0)
    E, P, _, il, ll = make_batch(**case)
    v = ref.viterbi(E, P, il, ll, blank=blank)
    assert v.dtype == np.int64 and v.shape == (E.shape[0], P.shape[1] - 1)
    np.testing.assert_array_equal(v, ref.brute_force_viterbi(E, P, il, ll, blank=blank))
    for b in range(E.shape[0]):
        assert np.all(v[b, ll[b]:] == blank)
        assert np.all(v[b, :ll[b]] != blank)


@pytest.mark.parametrize("blank", [0, 1])
def test_viterbi_binary_vocabulary(blank):
    E, P, _, il, ll = make_batch(11, V=2, blank=blank)
    v = ref.viterbi(E, P, il, ll, blank=blank)
    for b in range(E.shape[0]):
        assert np.all(v[b, :ll[b]] == 1 - blank)
        assert np.all(v[b, ll[b]:] == blank)


def test_viterbi_tie_prefers_blank_arrival():
    # Every node has lp(blank) = lp(v*) = -log 2 exactly, so all paths tie; v* is 1 at
    # t = 0 and 2 afterwards. Preferring blank arrivals puts every label at t = 0.
    T, U = 3, 2
    E = np.zeros((1, T, 3))
    E[0, 0, 2] = -1000.0
    E[0, 1:, 1] = -1000.0
    P = np.zeros((1, U + 1, 3))
    np.testing.assert_array_equal(ref.viterbi(E, P, [T], [U]), [[1, 1]])


def test_viterbi_label_free_and_single_frame():
    E, P, _, _, _ = make_batch(12, B=2, T=4, U=3)
    v = ref.viterbi(E, P, [4, 1], [0, 3])
    assert np.all(v[0] == 0)
    s = E[1, 0][None, :] + P[1, :3]
    s[:, 0] = -np.inf
    np.testing.assert_array_equal(v[1], np.argmax(s, axis=-1))


def test_delay_penalty_shifts_each_path_by_its_emission_times():
    # One label, T frames: the path emitting at frame s gains delay * ((T-1)/2 - s).
    rng = np.random.default_rng(7)
    T, V, delay = 4, 3, 0.9
    E, P = rng.normal(size=(1, T, V)), rng.normal(size=(1, 2, V))
    y, il, ll = np.array([[1]]), np.array([T]), np.array([1])
    lp = ref.log_softmax_joiner(E[0], P[0])
    total = 0.0
    for s in range(T):  # blanks at u=0 before s, the label at (s, 0), blanks at u=1 after
        score = sum(lp[t, 0, 0] for t in range(s)) + lp[s, 0, 1] + delay * ((T - 1) / 2 - s)
        score += sum(lp[t, 1, 0] for t in range(s, T))
        total += np.exp(score)
    np.testing.assert_allclose(ref.costs(E, P, y, il, ll, delay_penalty=delay), [-np.log(total)])
