"""From joiner scores to the compact lattice, and the differentiable lattice cost.

The (B, T, U+1) blank and label log-probabilities are all the kernels see; their gradients (the
move flows) flow back through the normaliser's own VJP (its matmuls, `_normalizer.py`).
"""

import functools

import jax
import jax.numpy as jnp

from . import _checks, _ffi
from ._normalizer import log_norm_and_moves, move_log_probs, viterbi_moves


def used_rows(input_lengths, label_lengths, valid, T, U1):
    """(B, T) and (B, U+1) masks of the emission and prediction rows that a lattice uses."""
    t_used = valid[:, None] & (jnp.arange(T) < input_lengths[:, None])
    u_used = valid[:, None] & (jnp.arange(U1) <= label_lengths[:, None])
    return t_used, u_used


def delay_penalized(emit_lp, input_lengths, delay_penalty):
    """k2's delay penalty: the label move at frame t of example b gains
    delay_penalty * ((input_lengths[b] - 1) / 2 - t) in log space."""
    if not delay_penalty:
        return emit_lp
    t = jnp.arange(emit_lp.shape[1], dtype=emit_lp.dtype)
    offset = (input_lengths[:, None].astype(emit_lp.dtype) - 1) / 2 - t  # (B, T)
    return emit_lp + delay_penalty * offset[..., None]


def reduce_costs(costs, reduction):
    """(B,) costs -> as `reduction` ("none", "sum" or "mean" over the batch) says."""
    if reduction == "sum":
        return costs.sum()
    if reduction == "mean":
        return costs.mean()
    return costs


def kernel_lengths(input_lengths, label_lengths, valid):
    """(B, 1) lengths for the kernels; an input length of 0 marks an invalid example."""
    return (jnp.where(valid, input_lengths, 0)[:, None], label_lengths[:, None])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def lattice_costs(blank_lp, emit_lp, input_lengths, label_lengths, fastemit_lambda=0.0, impl=None):
    """(B, 1) costs -log P(labels | lattice); (B, 1) int32 lengths.

    fastemit_lambda scales the gradient of every label move's log-probability by
    (1 + fastemit_lambda) (FastEmit); the costs do not change. impl: None/"auto", "ffi" or "xla"
    (see _ffi).
    """
    return _ffi.forward(blank_lp, emit_lp, input_lengths, label_lengths, impl)[0]


def _lattice_costs_fwd(blank_lp, emit_lp, input_lengths, label_lengths, fastemit_lambda, impl):
    costs, alpha = _ffi.forward(blank_lp, emit_lp, input_lengths, label_lengths, impl)
    return costs, (blank_lp, emit_lp, alpha, costs, input_lengths, label_lengths)


def _lattice_costs_bwd(fastemit_lambda, impl, residuals, g):
    flow_blank, flow_emit = _ffi.backward(*residuals, impl)
    # d cost / d log-prob of a move is minus its flow; invalid examples have zero flows.
    g = g[..., None]
    return -g * flow_blank, -(1 + fastemit_lambda) * g * flow_emit, None, None


lattice_costs.defvjp(_lattice_costs_fwd, _lattice_costs_bwd)


def lattice_labels(labels, label_lengths, valid, blank):
    """(B, U+1) labels safe to gather: positions past label_length, invalid examples and the
    extra column for u = U read the blank (in range, never used by a lattice)."""
    used = valid[:, None] & (jnp.arange(labels.shape[1]) < label_lengths[:, None])
    return jnp.pad(jnp.where(used, labels, blank), ((0, 0), (0, 1)), constant_values=blank)


def prepare(emissions, predictions, labels, input_lengths, label_lengths, valid, blank,
            differentiable=True, impl=None):
    """(blank_lp, emit_lp), the (B, T, U+1) move log-probabilities, or, with
    differentiable=False, (log_norm, blank_lp, emit_lp); emit_lp is None if labels is None.

    impl as in `transducer_loss` ("xla" also keeps the normaliser in XLA on CPU). Padding (and
    every row of an invalid example) may hold anything, NaN included: the normaliser
    reads those rows as zeros, the kernels never read those cells, and they get zero gradient.
    """
    rows = used_rows(input_lengths, label_lengths, valid, emissions.shape[1], predictions.shape[1])
    if labels is not None:
        labels = lattice_labels(labels, label_lengths, valid, blank)
    if differentiable:
        return move_log_probs(emissions, predictions, labels, *rows, blank, impl)
    return log_norm_and_moves(emissions, predictions, labels, *rows, blank, impl)


def inference_moves(emissions, predictions, labels, input_lengths, label_lengths, blank, impl,
                    best_label=False):
    """What the non-differentiable calls (viterbi, align, prune_ranges) start from: the scores in
    the compute dtype with gradients stopped, the (B,) mask of valid examples, and
    prepare(..., differentiable=False)'s (log_norm, blank_lp, emit_lp), or, with best_label,
    viterbi's (blank_lp, best_lp) (`_normalizer.viterbi_moves`; labels unused)."""
    dims = _checks.dims_of(emissions, predictions)
    valid = _checks.valid_examples(input_lengths, label_lengths, dims, labels)
    dtype = _checks.compute_dtype(emissions.dtype)
    emissions, predictions = jax.lax.stop_gradient(
        (emissions.astype(dtype), predictions.astype(dtype)))
    if best_label:
        rows = used_rows(input_lengths, label_lengths, valid, emissions.shape[1],
                         predictions.shape[1])
        moves = viterbi_moves(emissions, predictions, *rows, blank, impl)
    else:
        moves = prepare(emissions, predictions, labels, input_lengths, label_lengths, valid, blank,
                        differentiable=False, impl=impl)
    return emissions, predictions, valid, moves
