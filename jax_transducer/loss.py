"""The RNN-T loss of an additive joiner."""

import functools

import jax

from . import _checks, _ffi
from ._lattice import delay_penalized, kernel_lengths, lattice_costs, prepare, reduce_costs



def transducer_loss(emissions, predictions, labels, input_lengths, label_lengths, blank=0,
                    reduction="none", fastemit_lambda=0.0, delay_penalty=0.0, impl=None):
    """RNN-Transducer loss with the additive joiner logits[b,t,u,:] = emissions[b,t,:] + predictions[b,u,:].

    Args:
      emissions: (B, T, V) unnormalised encoder scores: float32, float64, bfloat16 or float16.
      predictions: (B, U+1, V) unnormalised prediction-network scores, same dtype.
      labels: (B, U) integer targets (converted to int32).
      input_lengths: (B,) integers in [1, T]: example b uses frames t < input_lengths[b].
      label_lengths: (B,) integers in [0, U]: example b uses labels u < label_lengths[b].
      blank: Python int in [0, V), the blank label.
      reduction: "none" -> (B,) costs; "sum" or "mean" over the batch -> a scalar.
      fastemit_lambda: Python float >= 0. FastEmit (Yu et al. 2021) as warp-transducer and NeMo
        implement it: the returned costs are unchanged; the gradient is that of the costs with
        every label move's share scaled by (1 + fastemit_lambda), i.e. d cost / d log p(label
        move) is multiplied by (1 + fastemit_lambda) before it flows back through the softmax.
      delay_penalty: Python float, k2's delay penalty: every label move at frame t of example b
        gains delay_penalty * ((input_lengths[b] - 1) / 2 - t) in log space (positive values
        favour earlier emissions). Costs and gradients are those of that modified lattice.
      impl: which implementation runs the lattice recursions. None or "auto": the compiled kernels
        on the platforms this install has them for (CPU, and CUDA when built with nvcc), the
        pure-XLA recursion elsewhere (TPU, or an install without kernels), with a one-time
        RuntimeWarning when jax's default backend has no kernels. "ffi": the kernels only
        (RuntimeError at trace time when the default backend has none). "xla": the pure-XLA
        recursion everywhere: the same results (float32 ones within float32 roundings: the CPU
        kernels accumulate in double), slower where kernels exist.

    Returns:
      Costs in float32 (float64 for float64 inputs): bfloat16 and float16 inputs are widened to
      float32 inside, every sum and matmul included, and their gradients come back in their own
      dtype. The cost of example b is -log of the total probability of all
      lattice paths from (0, 0) that emit labels[b, :label_lengths[b]] in order and end with the
      blank out of (input_lengths[b] - 1, label_lengths[b]); the log-softmax is over V.

    Bad input: shapes, dtypes and `blank` are checked at trace time (ValueError/TypeError). Out of
    range lengths, or labels outside [0, V) below label_length, raise ValueError in eager calls;
    inside jit such an example gets a NaN cost and a zero gradient, the others are untouched.
    Padding (t >= input_length, u > label_length, labels past label_length) never affects a
    result and gets exactly zero gradient, whatever it holds, NaN and inf included.

    Memory: O(B*T*U + B*(T+U)*V); the (B, T, U+1, V) joiner is never formed, forward or backward.
    """
    fastemit_lambda, delay_penalty = _checks.check_options(reduction, fastemit_lambda,
                                                           delay_penalty)
    emissions, predictions, dims = _checks.check_scores(emissions, predictions)
    blank = _checks.check_blank(blank, dims[3])
    input_lengths, label_lengths = _checks.check_lengths(input_lengths, label_lengths, dims)
    labels = _checks.check_labels(labels, label_lengths, dims)
    impl = _ffi.check_impl(impl)
    return _costs(emissions, predictions, labels, input_lengths, label_lengths, blank, reduction,
                  fastemit_lambda, delay_penalty, impl)


@functools.partial(jax.jit, static_argnums=(5, 6, 7, 8, 9))
def _costs(emissions, predictions, labels, input_lengths, label_lengths, blank, reduction,
           fastemit_lambda, delay_penalty, impl):
    # Jitted so that eager calls compile once per shape instead of dispatching op by op.
    dims = _checks.dims_of(emissions, predictions)
    dtype = _checks.compute_dtype(emissions.dtype)
    emissions, predictions = emissions.astype(dtype), predictions.astype(dtype)
    valid = _checks.valid_examples(input_lengths, label_lengths, dims, labels)
    blank_lp, emit_lp = prepare(emissions, predictions, labels, input_lengths, label_lengths,
                                valid, blank, impl=impl)
    emit_lp = delay_penalized(emit_lp, input_lengths, delay_penalty)

    costs = lattice_costs(blank_lp, emit_lp, *kernel_lengths(input_lengths, label_lengths, valid),
                          fastemit_lambda, impl)
    return reduce_costs(costs[:, 0], reduction)


class TransducerLoss:
    """The loss and viterbi with fixed `blank` and `reduction`, shaped like the original C++/PyTorch
    transducer package's object: `loss(emissions, predictions, labels, input_lengths,
    label_lengths)` (also `.apply(...)`) and `.viterbi(emissions, predictions, input_lengths,
    label_lengths)`. `impl` as in `transducer_loss`, for both."""

    def __init__(self, blank=0, reduction="none", fastemit_lambda=0.0, delay_penalty=0.0,
                 impl=None):
        _checks.check_options(reduction, fastemit_lambda, delay_penalty)
        self.impl = _ffi.check_impl(impl)
        self.blank = blank
        self.reduction = reduction
        self.fastemit_lambda = fastemit_lambda
        self.delay_penalty = delay_penalty

    def __call__(self, emissions, predictions, labels, input_lengths, label_lengths):
        return transducer_loss(emissions, predictions, labels, input_lengths, label_lengths,
                               blank=self.blank, reduction=self.reduction,
                               fastemit_lambda=self.fastemit_lambda,
                               delay_penalty=self.delay_penalty, impl=self.impl)

    apply = __call__

    def viterbi(self, emissions, predictions, input_lengths, label_lengths):
        from .viterbi import viterbi
        return viterbi(emissions, predictions, input_lengths, label_lengths, blank=self.blank,
                       impl=self.impl)

    def __repr__(self):
        impl = "" if self.impl == "auto" else f", impl={self.impl!r}"
        return f"TransducerLoss(blank={self.blank}, reduction={self.reduction!r}{impl})"
