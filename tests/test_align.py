"""align / align_from_logits against brute-force enumeration of every path, and their edges."""

import itertools

import jax
import numpy as np
import pytest

import jax_transducer as jt
import reference as ref
from test_logits import log_softmax, random_logits
from util import CASES, make_batch, put


def brute_force_frames(lp_of, labels, in_len, lab_len, U, blank):
    """(B, U) frames of the label moves on the best path, by scoring every path; -1 padded.
    lp_of(b) gives example b's (T_b, U_b + 1, V) log-probabilities."""
    out = np.full((len(in_len), U), -1)
    for b, (T_b, U_b) in enumerate(zip(in_len, lab_len)):
        lp, y = lp_of(b), labels[b]
        best, best_frames = -np.inf, None
        # A path is the sequence of T_b - 1 + U_b moves before the final blank.
        for label_moves in itertools.combinations(range(T_b - 1 + U_b), U_b):
            t = u = 0
            score, frames = 0.0, []
            for m in range(T_b - 1 + U_b):
                if m in label_moves:
                    score += lp[t, u, y[u]]
                    frames.append(t)
                    u += 1
                else:
                    score += lp[t, u, blank]
                    t += 1
            score += lp[t, u, blank]
            if best_frames is None or score > best:
                best, best_frames = score, frames
        out[b, :U_b] = best_frames
    return out


# (seed, blank, dims): label length 0, U > T, T = 1, blank != 0, odd sizes.
SMALL = [
    (0, 0, dict(B=4, T=4, U=3, V=5)),
    (1, 2, dict(B=4, T=3, U=5, V=6)),   # U > T: several labels on one frame
    (2, 4, dict(B=3, T=1, U=3, V=5)),   # one frame
    (3, 1, dict(B=5, T=5, U=2, V=3)),
    (4, 0, dict(B=2, T=4, U=0, V=4)),   # no labels at all
]


@pytest.mark.parametrize("seed,blank,dims", SMALL)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_align_matches_brute_force(device, seed, blank, dims, dtype):
    E, P, labels, in_len, lab_len = make_batch(seed, blank=blank, dtype=dtype, **dims)
    got = jt.align(*put(device, E, P, labels, in_len, lab_len), blank=blank)
    assert got.dtype == np.int32 and got.shape == labels.shape
    want = brute_force_frames(
        lambda b: ref.log_softmax_joiner(E[b, :in_len[b]], P[b, :lab_len[b] + 1]),
        labels, in_len, lab_len, labels.shape[1], blank)
    np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("seed,blank,dims", SMALL)
def test_align_from_logits_matches_brute_force(device, seed, blank, dims):
    logits, labels, in_len, lab_len = random_logits(seed, blank=blank, **dims)
    got = jt.align_from_logits(*put(device, logits, labels, in_len, lab_len), blank=blank)
    want = brute_force_frames(lambda b: log_softmax(logits[b, :in_len[b], :lab_len[b] + 1]),
                              labels, in_len, lab_len, labels.shape[1], blank)
    np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("case", CASES)
def test_frames_are_monotone_in_range_and_padded_with_minus_one(device, case):
    E, P, labels, in_len, lab_len = make_batch(**case)
    blank = case.get("blank", 0)
    args = put(device, E, P, labels, in_len, lab_len)
    got = np.asarray(jt.align(*args, blank=blank))
    for b, (T_b, U_b) in enumerate(zip(in_len, lab_len)):
        f = got[b, :U_b]
        assert (np.diff(f) >= 0).all() and (f >= 0).all() and (f <= T_b - 1).all()
        assert (got[b, U_b:] == -1).all()
    # The same from the additive joiner's full logits.
    logits = E[:, :, None, :] + P[:, None, :, :]
    np.testing.assert_array_equal(
        np.asarray(jt.align_from_logits(*put(device, logits, labels, in_len, lab_len),
                                        blank=blank)), got)


def test_ties_put_labels_on_the_earliest_frames(device):
    # All scores equal: every path ties; arrivals by blank win, so every label is at frame 0.
    E, P = np.zeros((2, 4, 3)), np.zeros((2, 3, 3))
    labels = np.array([[1, 2], [2, 1]], np.int32)
    got = jt.align(*put(device, E, P, labels, np.array([4, 3]), np.array([2, 1])))
    np.testing.assert_array_equal(np.asarray(got), [[0, 0], [0, -1]])
    # One tie between frames 1 and 2 for the only label (the rest decided): frame 1 wins.
    logits = np.zeros((1, 3, 2, 2))
    logits[0, 0, 0] = [5.0, 0.0]  # frame 0: blank is better
    got = jt.align_from_logits(*put(device, logits, np.array([[1]]), np.array([3]),
                                    np.array([1])))
    np.testing.assert_array_equal(np.asarray(got), [[1]])


def test_invalid_example_inside_jit_gets_minus_one(device):
    E, P, labels, in_len, lab_len = make_batch(12, B=4, T=5, U=3, V=6, pad=0.0)
    good = np.asarray(jt.align(*put(device, E, P, labels, in_len, lab_len)))
    bad_len, bad_labels = in_len.copy(), labels.copy()
    bad_len[2] = 9
    bad_labels[0, 0] = -3
    with pytest.raises(ValueError, match="input_lengths"):
        jt.align(E, P, labels, bad_len, lab_len)
    with pytest.raises(ValueError, match="labels: expected values"):
        jt.align(E, P, bad_labels, in_len, lab_len)
    for args, b in (((labels, bad_len), 2), ((bad_labels, in_len), 0)):
        got = np.asarray(jax.jit(jt.align)(*put(device, E, P, *args, lab_len)))
        assert (got[b] == -1).all()
        others = [i for i in range(4) if i != b]
        np.testing.assert_array_equal(got[others], good[others])


def test_trace_time_errors():
    E, P, labels, in_len, lab_len = make_batch(13, pad=0.0)
    with pytest.raises(ValueError, match="labels: expected shape"):
        jt.align(E, P, labels[:, :-1], in_len, lab_len)
    with pytest.raises(ValueError, match="blank"):
        jt.align(E, P, labels, in_len, lab_len, blank=-1)
    with pytest.raises(ValueError, match="logits: expected rank 4"):
        jt.align_from_logits(E, labels, in_len, lab_len)


def test_jit_vmap_and_half_precision(device):
    import ml_dtypes  # noqa: F401
    E, P, labels, in_len, lab_len = make_batch(14, B=3, T=6, U=4, V=5)
    want = np.asarray(jt.align(*put(device, E, P, labels, in_len, lab_len)))
    stacked = [np.stack([x, x[::-1]]) for x in (E, P, labels, in_len, lab_len)]
    got = jax.jit(jax.vmap(jt.align))(*put(device, *stacked))
    np.testing.assert_array_equal(np.asarray(got), np.stack([want, want[::-1]]))
    half = jt.align(*put(device, E.astype("bfloat16"), P.astype("bfloat16"), labels, in_len,
                         lab_len))
    assert half.dtype == np.int32 and half.shape == want.shape


def test_inside_a_differentiated_function(device):
    E, P, labels, in_len, lab_len = make_batch(15, pad=0.0)
    E, P, labels, in_len, lab_len = put(device, E, P, labels, in_len, lab_len)

    def loss(e):
        frames = jt.align(e, P, labels, in_len, lab_len)
        return jt.transducer_loss(e, P, labels, in_len, lab_len).sum() + 0.0 * frames.sum()

    np.testing.assert_allclose(
        np.asarray(jax.grad(loss)(E)),
        np.asarray(jax.grad(lambda e: jt.transducer_loss(e, P, labels, in_len, lab_len).sum())(E)))
