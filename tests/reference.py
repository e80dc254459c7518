"""Independent float64 NumPy reference for the RNN-T loss, its gradients and viterbi.

Conventions (shared by every function):
  emissions   (B, T, V)    encoder-side joiner terms E
  predictions (B, U+1, V)  prediction-side joiner terms P
  labels      (B, U)       integer targets
  input_lengths, label_lengths (B,)
Example b uses only frames t < T_b = input_lengths[b] and labels u < U_b =
label_lengths[b]; the arrays are sliced first, so padding never matters.
The logits of node (t, u) are E[t] + P[u], log-softmaxed over V.
"""

import itertools
import math

import numpy as np


def log_softmax_joiner(E, P):
    """E (T, V), P (U1, V) -> (T, U1, V) log-softmax of E[t] + P[u] over V."""
    logits = np.asarray(E, np.float64)[:, None, :] + np.asarray(P, np.float64)[None, :, :]
    m = logits.max(axis=-1, keepdims=True)
    shifted = logits - m
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _example(emissions, predictions, labels, input_lengths, label_lengths, b):
    """Slice example b: returns (lp (T_b, U_b+1, V), y (U_b,), T_b, U_b)."""
    T_b, U_b = int(input_lengths[b]), int(label_lengths[b])
    assert T_b >= 1 and U_b >= 0
    lp = log_softmax_joiner(emissions[b, :T_b], predictions[b, :U_b + 1])
    y = np.asarray(labels[b, :U_b], np.int64) if labels is not None else None
    return lp, y, T_b, U_b


def _delayed(lp, y, delay_penalty):
    """k2's delay penalty: the label move out of (t, u) gains delay_penalty * ((T_b - 1)/2 - t)
    in log space (labels must be non-blank). Returns the modified lattice scores."""
    if not delay_penalty:
        return lp
    lp = lp.copy()
    T_b = lp.shape[0]
    for t in range(T_b):
        for u in range(len(y)):
            lp[t, u, y[u]] += delay_penalty * ((T_b - 1) / 2 - t)
    return lp


def _alpha(lp, y, blank):
    """Forward log-variables alpha (T, U+1): log-prob of reaching (t, u) from (0, 0)."""
    T, U1, _ = lp.shape
    alpha = np.full((T, U1), -np.inf)
    for t in range(T):
        for u in range(U1):
            if t == 0 and u == 0:
                alpha[t, u] = 0.0
                continue
            a = alpha[t - 1, u] + lp[t - 1, u, blank] if t > 0 else -np.inf
            b = alpha[t, u - 1] + lp[t, u - 1, y[u - 1]] if u > 0 else -np.inf
            alpha[t, u] = np.logaddexp(a, b)
    return alpha


def _beta(lp, y, blank):
    """Backward log-variables beta (T, U+1): log-prob from (t, u) to the end,
    including the final blank out of (T-1, U)."""
    T, U1, _ = lp.shape
    beta = np.full((T, U1), -np.inf)
    for t in range(T - 1, -1, -1):
        for u in range(U1 - 1, -1, -1):
            if t == T - 1 and u == U1 - 1:
                beta[t, u] = lp[t, u, blank]
                continue
            a = beta[t + 1, u] + lp[t, u, blank] if t < T - 1 else -np.inf
            b = beta[t, u + 1] + lp[t, u, y[u]] if u < U1 - 1 else -np.inf
            beta[t, u] = np.logaddexp(a, b)
    return beta


def costs(emissions, predictions, labels, input_lengths, label_lengths, blank=0,
          delay_penalty=0.0):
    """Negative log-likelihoods (B,) float64 via the alpha recursion (of the delay-penalised
    lattice when delay_penalty != 0)."""
    out = np.zeros(len(input_lengths), np.float64)
    for b in range(len(out)):
        lp, y, T_b, U_b = _example(emissions, predictions, labels, input_lengths, label_lengths, b)
        lp = _delayed(lp, y, delay_penalty)
        alpha = _alpha(lp, y, blank)
        out[b] = -(alpha[T_b - 1, U_b] + lp[T_b - 1, U_b, blank])
    return out


def gradients(emissions, predictions, labels, input_lengths, label_lengths, blank=0,
              fastemit_lambda=0.0, delay_penalty=0.0):
    """Exact gradient of sum_b costs[b]: (dE (B, T, V), dP (B, U+1, V)), float64,
    zero outside t < T_b, u <= U_b.

    With fastemit_lambda (FastEmit as warp-transducer and NeMo implement it), every label move's
    share of the gradient is scaled by (1 + fastemit_lambda): its term in the softmax part and its
    -1 at the label. With delay_penalty, the flows are those of the penalised lattice, the softmax
    that of the plain joiner."""
    dE = np.zeros(np.shape(emissions), np.float64)
    dP = np.zeros(np.shape(predictions), np.float64)
    for b in range(len(input_lengths)):
        lp, y, T_b, U_b = _example(emissions, predictions, labels, input_lengths, label_lengths, b)
        softmax = np.exp(lp)
        lp = _delayed(lp, y, delay_penalty)
        alpha, beta = _alpha(lp, y, blank), _beta(lp, y, blank)
        logZ = beta[0, 0]
        grad = np.exp(alpha + beta - logZ)[:, :, None] * softmax  # occupancy * softmax
        for t in range(T_b):
            for u in range(U_b + 1):
                if t < T_b - 1:
                    nxt = beta[t + 1, u]
                elif u == U_b:
                    nxt = 0.0  # final blank terminates the path
                else:
                    nxt = -np.inf
                grad[t, u, blank] -= np.exp(alpha[t, u] + lp[t, u, blank] + nxt - logZ)
                if u < U_b:
                    flow = np.exp(alpha[t, u] + lp[t, u, y[u]] + beta[t, u + 1] - logZ)
                    grad[t, u, :] += fastemit_lambda * flow * softmax[t, u]
                    grad[t, u, y[u]] -= (1 + fastemit_lambda) * flow
        dE[b, :T_b] = grad.sum(axis=1)
        dP[b, :U_b + 1] = grad.sum(axis=0)
    return dE, dP


def _paths(T_b, U_b):
    """Yield each path as a tuple of U_b move indices (of T_b-1+U_b) that are label moves."""
    n = math.comb(T_b - 1 + U_b, U_b)
    assert n <= 200000, f"too many paths: {n}"
    return itertools.combinations(range(T_b - 1 + U_b), U_b)


def _walk(lp, T_b, U_b, label_pos, label_lp, blank):
    """Score of one path and the nodes (t, u) where its label moves happen."""
    t = u = 0
    score, nodes = 0.0, []
    label_pos = set(label_pos)
    for k in range(T_b - 1 + U_b):
        if k in label_pos:
            score += label_lp(t, u)
            nodes.append((t, u))
            u += 1
        else:
            score += lp[t, u, blank]
            t += 1
    assert (t, u) == (T_b - 1, U_b)
    return score + lp[t, u, blank], nodes


def brute_force_costs(emissions, predictions, labels, input_lengths, label_lengths, blank=0):
    """Negative log-likelihoods (B,) by explicit enumeration of every path (tiny lattices)."""
    out = np.zeros(len(input_lengths), np.float64)
    for b in range(len(out)):
        lp, y, T_b, U_b = _example(emissions, predictions, labels, input_lengths, label_lengths, b)
        scores = [_walk(lp, T_b, U_b, pos, lambda t, u: lp[t, u, y[u]], blank)[0]
                  for pos in _paths(T_b, U_b)]
        out[b] = -np.logaddexp.reduce(np.array(scores))
    return out


def _best_labels(emissions, predictions, b, T_b, U_b, blank):
    """v* (T_b, U_b+1): best non-blank label per node, ties to the lowest index."""
    scores = (np.asarray(emissions[b, :T_b], np.float64)[:, None, :]
              + np.asarray(predictions[b, :U_b + 1], np.float64)[None, :, :])
    scores[:, :, blank] = -np.inf
    return np.argmax(scores, axis=-1)


def viterbi(emissions, predictions, input_lengths, label_lengths, blank=0):
    """Teacher-forced best path. Returns (B, U) int64 labels, padded with `blank`.
    Max-product DP; on a tie at a node the arrival by the blank move wins."""
    B, U = len(input_lengths), np.shape(predictions)[1] - 1
    out = np.full((B, U), blank, np.int64)
    for b in range(B):
        lp, _, T_b, U_b = _example(emissions, predictions, None, input_lengths, label_lengths, b)
        vstar = _best_labels(emissions, predictions, b, T_b, U_b, blank)
        lab_lp = np.take_along_axis(lp, vstar[:, :, None], axis=-1)[:, :, 0]
        delta = np.full((T_b, U_b + 1), -np.inf)
        from_blank = np.zeros((T_b, U_b + 1), bool)
        for t in range(T_b):
            for u in range(U_b + 1):
                if t == 0 and u == 0:
                    delta[t, u] = 0.0
                    continue
                a = delta[t - 1, u] + lp[t - 1, u, blank] if t > 0 else -np.inf
                c = delta[t, u - 1] + lab_lp[t, u - 1] if u > 0 else -np.inf
                from_blank[t, u] = t > 0 and (u == 0 or a >= c)
                delta[t, u] = a if from_blank[t, u] else c
        t, u = T_b - 1, U_b
        while (t, u) != (0, 0):
            if from_blank[t, u]:
                t -= 1
            else:
                u -= 1
                out[b, u] = vstar[t, u]
    return out


def brute_force_viterbi(emissions, predictions, input_lengths, label_lengths, blank=0):
    """Same as viterbi, by enumerating every path (tiny lattices, no ties assumed)."""
    B, U = len(input_lengths), np.shape(predictions)[1] - 1
    out = np.full((B, U), blank, np.int64)
    for b in range(B):
        lp, _, T_b, U_b = _example(emissions, predictions, None, input_lengths, label_lengths, b)
        vstar = _best_labels(emissions, predictions, b, T_b, U_b, blank)
        best, best_nodes = -np.inf, None
        for pos in _paths(T_b, U_b):
            score, nodes = _walk(lp, T_b, U_b, pos, lambda t, u: lp[t, u, vstar[t, u]], blank)
            if best_nodes is None or score > best:
                best, best_nodes = score, nodes
        out[b, :U_b] = [vstar[t, u] for t, u in best_nodes]
    return out
