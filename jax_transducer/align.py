"""Forced alignment: the frame of every label on the best lattice path."""

import functools

import jax
import jax.numpy as jnp

from . import _checks, _ffi
from ._lattice import inference_moves, kernel_lengths
from .logits import full_lattice_log_probs

FILL = _ffi.NO_FRAME  # the frame reported for label positions >= label_length, and for invalid examples

_SEMANTICS = """
    Returns:
      (B, U) int32 frames: frames[b, u] is the frame t at which labels[b, u] is emitted (the
      label move (t, u) -> (t, u + 1)) on the path from (0, 0) to (T_b - 1, U_b) with the highest
      total log-probability, its final blank included (max-product, labels forced: a label move
      at node (t, u) scores the log-probability of labels[b, u] there, a blank move the blank's;
      log-softmax over V). Every example has such a path, U_b > T_b included (several labels
      then share a frame), so frames[b, :U_b] is non-decreasing and within [0, T_b - 1].
      Positions u >= label_lengths[b] hold -1 (`FILL`).

    Ties: at every node the DP keeps the arrival by a blank move when it scores at least as much
    as the arrival by a label move, and the path is traced back from the end: among equally good
    paths, labels go to the earliest frames (all scores equal gives frames of 0). A NaN score
    inside an example never breaks the path (a NaN label move loses), but its alignment is then
    unspecified.

    Bad input as in `transducer_loss`: trace-time ValueError/TypeError for shapes, dtypes and
    `blank`; eager ValueError for out-of-range lengths or labels; inside jit such an example gets
    a row of -1. Padding never matters. Not differentiable (inputs are stop_gradient'ed); jit and
    vmap compose (one kernel launch per call).
"""


def align(emissions, predictions, labels, input_lengths, label_lengths, blank=0, impl=None):
    """Forced alignment of the additive joiner logits[b,t,u,:] = emissions[b,t,:] + predictions[b,u,:].

    Args:
      emissions (B, T, V), predictions (B, U+1, V): float32, float64, bfloat16 or float16
        (computed in float32 at least); labels (B, U), input_lengths (B,) in [1, T],
        label_lengths (B,) in [0, U]: integers; blank: Python int in [0, V).
      impl: None/"auto", "ffi" or "xla": which implementation runs the lattice, as in
        `transducer_loss`.
    """
    emissions, predictions, dims = _checks.check_scores(emissions, predictions)
    blank = _checks.check_blank(blank, dims[3])
    input_lengths, label_lengths = _checks.check_lengths(input_lengths, label_lengths, dims)
    labels = _checks.check_labels(labels, label_lengths, dims)
    return _align(emissions, predictions, labels, input_lengths, label_lengths, blank,
                  _ffi.check_impl(impl))


def align_from_logits(logits, labels, input_lengths, label_lengths, blank=0, impl=None):
    """Forced alignment of any joiner, from its full logits (B, T, U+1, V).

    Args:
      logits: (B, T, U+1, V) float32, float64, bfloat16 or float16 joiner scores (as in
        `transducer_loss_from_logits`); labels, input_lengths, label_lengths, blank, impl: as in
        `align`.
    """
    logits, dims = _checks.check_logits(logits)
    blank = _checks.check_blank(blank, dims[3])
    input_lengths, label_lengths = _checks.check_lengths(input_lengths, label_lengths, dims)
    labels = _checks.check_labels(labels, label_lengths, dims)
    return _align_from_logits(logits, labels, input_lengths, label_lengths, blank,
                              _ffi.check_impl(impl))


align.__doc__ += _SEMANTICS
align_from_logits.__doc__ += _SEMANTICS


@functools.partial(jax.jit, static_argnums=(5, 6))
def _align(emissions, predictions, labels, input_lengths, label_lengths, blank, impl):
    _, _, valid, (_, blank_lp, emit_lp) = inference_moves(
        emissions, predictions, labels, input_lengths, label_lengths, blank, impl)
    return _frames(blank_lp, emit_lp, input_lengths, label_lengths, valid, impl)


@functools.partial(jax.jit, static_argnums=(4, 5))
def _align_from_logits(logits, labels, input_lengths, label_lengths, blank, impl):
    B, T, U1, V = logits.shape
    valid = _checks.valid_examples(input_lengths, label_lengths, (B, T, U1 - 1, V), labels)
    blank_lp, emit_lp = full_lattice_log_probs(jax.lax.stop_gradient(logits), labels,
                                               input_lengths, label_lengths, valid, blank)
    return _frames(blank_lp, emit_lp, input_lengths, label_lengths, valid, impl)


def _frames(blank_lp, emit_lp, input_lengths, label_lengths, valid, impl):
    """The viterbi kernel with the label move of (t, u) scored by emit_lp."""
    frames = _ffi.viterbi_frames(blank_lp, emit_lp,
                                 *kernel_lengths(input_lengths, label_lengths, valid), impl)
    return frames[:, :-1]
