"""Random batches for the tests: variable lengths, and padding filled with junk."""

import jax
import numpy as np


def make_batch(seed, B=4, T=6, U=4, V=7, blank=0, lengths=None, dtype=np.float64, pad=np.nan,
               scale=2.0):
    """(emissions, predictions, labels, input_lengths, label_lengths) as NumPy arrays.

    Example 0 uses the whole lattice, example 1 (if any) has no labels. Unused positions hold
    `pad`, and labels past label_length hold out-of-range values, which must never matter.
    """
    rng = np.random.default_rng(seed)
    E = (rng.normal(size=(B, T, V)) * scale).astype(dtype)
    P = (rng.normal(size=(B, U + 1, V)) * scale).astype(dtype)
    nonblank = np.array([v for v in range(V) if v != blank])
    labels = rng.choice(nonblank, size=(B, U)).astype(np.int32)
    if lengths is None:
        in_len = rng.integers(1, T + 1, size=B)
        lab_len = rng.integers(0, U + 1, size=B)
        in_len[0], lab_len[0] = T, U
        if B > 1:
            lab_len[1] = 0
    else:
        in_len, lab_len = (np.array(x) for x in zip(*lengths))
    for b in range(B):
        E[b, in_len[b]:] = pad
        P[b, lab_len[b] + 1:] = pad
        labels[b, lab_len[b]:] = rng.choice([-5, V, 10**6])
    return E, P, labels, in_len.astype(np.int32), lab_len.astype(np.int32)


def put(device, *arrays):
    return [jax.device_put(a, device) for a in arrays]


def unpadded(E, P, labels, in_len, lab_len):
    """The same batch with padding replaced by finite values (for finite differences)."""
    E, P, labels = E.copy(), P.copy(), labels.copy()
    E[~np.isfinite(E)] = 0.5
    P[~np.isfinite(P)] = -0.5
    labels[(labels < 0) | (labels >= E.shape[2])] = 1
    return E, P, labels, in_len, lab_len


# Shapes that cover: U > T, label length 0, blank != 0, odd sizes, B = 1, T = 1, V = 2.
CASES = [
    dict(seed=0),
    dict(seed=1, blank=3),
    dict(seed=2, B=3, T=3, U=7, V=5, blank=4),
    dict(seed=3, B=1, T=9, U=2, V=11),
    dict(seed=4, B=4, T=1, U=3, V=2, blank=1),
    dict(seed=5, B=5, T=13, U=6, V=33, blank=17),
    dict(seed=6, B=2, T=5, U=0, V=4),
]
