"""Teacher-forced best path (viterbi) of the additive joiner's lattice."""

import functools

import jax

from . import _checks, _ffi
from ._lattice import inference_moves, kernel_lengths
from ._normalizer import best_labels


def viterbi(emissions, predictions, input_lengths, label_lengths, blank=0, impl=None):
    """Labels along the best path of the lattice, with each label move taking the best non-blank label.

    Args:
      emissions: (B, T, V) scores (float32, float64, bfloat16 or float16; computed in float32 at
        least); predictions: (B, U+1, V), same dtype.
      input_lengths: (B,) integers in [1, T]; label_lengths: (B,) integers in [0, U].
      blank: Python int in [0, V).
      impl: None or "auto" (the compiled kernels where this install has them for the platform,
        else the pure-XLA recursion with a one-time warning), "ffi" (the kernels; RuntimeError
        when the default backend has none) or "xla" (the pure-XLA recursion, same results).

    Returns:
      (B, U) int32. A label move at lattice node (t, u) scores the best non-blank label there
      (argmax over v != blank of emissions[t, v] + predictions[u, v], ties to the lowest index),
      a blank move its blank log-probability (log-softmax over V). Among the paths from (0, 0) to
      (input_length - 1, label_length) that emit exactly label_length labels, the one with the
      highest total log-probability (its final blank included) is returned as its labels; ties go
      to the path that arrives at each node by a blank move. Positions >= label_length hold
      `blank`.

    Bad input behaves as in `transducer_loss`: out-of-range lengths raise ValueError in eager calls,
    and inside jit give an all-`blank` row for that example. Not differentiable: the inputs are
    wrapped in stop_gradient.
    """
    emissions, predictions, dims = _checks.check_scores(emissions, predictions)
    blank = _checks.check_blank(blank, dims[3])
    input_lengths, label_lengths = _checks.check_lengths(input_lengths, label_lengths, dims)
    impl = _ffi.check_impl(impl)
    return _viterbi(emissions, predictions, input_lengths, label_lengths, blank, impl)


@functools.partial(jax.jit, static_argnums=(4, 5))
def _viterbi(emissions, predictions, input_lengths, label_lengths, blank, impl):
    emissions, predictions, valid, (blank_lp, best_lp) = inference_moves(
        emissions, predictions, None, input_lengths, label_lengths, blank, impl, best_label=True)
    # The lattice kernel finds the best path's label moves and reports, per label position, the
    # frame of that move (NO_FRAME past label_length). Only those U cells then need their argmax
    # over V.
    frames = _ffi.viterbi_frames(blank_lp, best_lp,
                                 *kernel_lengths(input_lengths, label_lengths, valid), impl)[:, :-1]
    return best_labels(emissions, predictions, frames, blank, impl)
