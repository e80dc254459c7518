"""The RNN-T loss of any joiner, from its full (B, T, U+1, V) logits."""

import functools

import jax
import jax.numpy as jnp

from . import _checks, _ffi
from ._lattice import (delay_penalized, kernel_lengths, lattice_costs, lattice_labels,
                       reduce_costs, used_rows)

@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def cell_log_probs(logits, labels, used, blank):
    """Blank and label log-probabilities of every cell, log-softmax over V.

    Args:
      logits: (B, T, S, V) joiner scores, any float dtype (computed in float32 at least).
      labels: (B, T, S) int32 in [0, V): the label whose log-probability cell (t, s) gives.
      used: (B, T, S) bool: the cells that a lattice reads.
      blank: Python int in [0, V).

    Returns:
      (blank_lp, emit_lp), each (B, T, S) in the compute dtype, 0 where not `used`. The gradient
      is one fused elementwise pass over the logits (softmax from the saved log-normaliser): the
      input is the only residual, and cells that are not used get exactly zero, NaN logits
      included.
    """
    return _cell_log_probs_fwd(logits, labels, used, blank)[0]


def _cell_log_probs_fwd(logits, labels, used, blank):
    dtype = _checks.compute_dtype(logits.dtype)
    # Every read of the logits widens them itself (the max, the gathers and, inside its
    # reduction, the sum of exponentials): no widened copy of a half-precision input is stored.
    peak = jnp.max(logits, axis=-1).astype(dtype)
    peak = jnp.where(jnp.isfinite(peak), peak, 0)
    log_norm = peak + jnp.log(jnp.sum(jnp.exp(logits.astype(dtype) - peak[..., None]), axis=-1))
    blank_lp = _pick(logits, blank).astype(dtype) - log_norm
    emit_lp = _pick(logits, labels[..., None]).astype(dtype) - log_norm
    out = (jnp.where(used, blank_lp, 0), jnp.where(used, emit_lp, 0))
    return out, (logits, labels, used, log_norm)


def _pick(logits, index):
    """logits[..., index] (index an int or an array broadcast against the cells, ending in 1).

    Half-precision values are picked as their 16-bit patterns: XLA:CPU widens every
    half-precision gather to float32 first and shares that widened copy of the whole input with
    the log-normaliser's sum, which would otherwise read the input directly."""
    bits = logits.dtype.itemsize == 2
    x = jax.lax.bitcast_convert_type(logits, jnp.uint16) if bits else logits
    x = x[..., index] if isinstance(index, int) else jnp.take_along_axis(x, index, axis=-1)[..., 0]
    return jax.lax.bitcast_convert_type(x, logits.dtype) if bits else x


def _cell_log_probs_bwd(blank, residuals, g):
    logits, labels, used, log_norm = residuals
    g_blank, g_emit = (jnp.where(used, x, 0)[..., None] for x in g)
    # Behind a barrier, this widening is not merged with the forward's: XLA:CPU would otherwise
    # store one widened copy of a half-precision input for both.
    x = jax.lax.optimization_barrier(logits).astype(log_norm.dtype)
    v = jnp.arange(x.shape[-1])
    # d lp(w) / d x_v = [v == w] - softmax_v, for w = blank and w = label.
    d = (jnp.where(v == blank, g_blank, 0) + jnp.where(v == labels[..., None], g_emit, 0)
         - (g_blank + g_emit) * jnp.exp(x - log_norm[..., None]))
    return jnp.where(used[..., None], d, 0).astype(logits.dtype), None, None


cell_log_probs.defvjp(_cell_log_probs_fwd, _cell_log_probs_bwd)


def transducer_loss_from_logits(logits, labels, input_lengths, label_lengths, blank=0,
                                reduction="none", fastemit_lambda=0.0, delay_penalty=0.0,
                                impl=None):
    """RNN-Transducer loss of any joiner network, from its full logits.

    Args:
      logits: (B, T, U+1, V) unnormalised joiner scores: float32, float64, bfloat16 or float16.
        logits[b, t, u] scores the next symbol after frame t and the first u labels.
      labels: (B, U) integer targets (converted to int32).
      input_lengths: (B,) integers in [1, T]; label_lengths: (B,) integers in [0, U].
      blank, reduction, fastemit_lambda, delay_penalty, impl: as in `transducer_loss`.

    Returns:
      As `transducer_loss`: (B,) costs (a scalar for "sum"/"mean"), float32 (float64 for float64
      logits). The cost of example b is -log of the total probability of all lattice paths from
      (0, 0) that emit labels[b, :label_lengths[b]] in order and end with the blank out of
      (input_lengths[b] - 1, label_lengths[b]), with log_softmax(logits[b, t, u]) over V as the
      move log-probabilities. With logits = emissions[:, :, None] + predictions[:, None] this
      is exactly `transducer_loss(emissions, predictions, ...)`, gradients included.

    Bad input is handled as in `transducer_loss`: trace-time ValueError/TypeError for shapes,
    dtypes and `blank`; eager ValueError for out-of-range lengths or labels; inside jit such an
    example gets a NaN cost and a zero gradient. Padding (t >= input_length, u > label_length,
    labels past label_length) never matters and gets exactly zero gradient, NaN and inf included.

    Memory: the log-softmax is never stored; the kernels see compact (B, T, U+1) arrays. The
    gradient is computed in one fused pass into a single (B, T, U+1, V) buffer of the input
    dtype (bfloat16/float16 logits are widened to float32 inside the fusion only).
    """
    fastemit_lambda, delay_penalty = _checks.check_options(reduction, fastemit_lambda,
                                                           delay_penalty)
    logits, dims = _checks.check_logits(logits)
    blank = _checks.check_blank(blank, dims[3])
    input_lengths, label_lengths = _checks.check_lengths(input_lengths, label_lengths, dims)
    labels = _checks.check_labels(labels, label_lengths, dims)
    return _costs(logits, labels, input_lengths, label_lengths, blank, reduction,
                  fastemit_lambda, delay_penalty, _ffi.check_impl(impl))


def full_lattice_log_probs(logits, labels, input_lengths, label_lengths, valid, blank):
    """(B, T, U+1) blank and label log-probabilities of full logits (B, T, U+1, V)."""
    B, T, U1, _ = logits.shape
    t_used, u_used = used_rows(input_lengths, label_lengths, valid, T, U1)
    safe = lattice_labels(labels, label_lengths, valid, blank)
    index = jnp.broadcast_to(safe[:, None, :], (B, T, U1))
    return cell_log_probs(logits, index, t_used[:, :, None] & u_used[:, None, :], blank)


@functools.partial(jax.jit, static_argnums=(4, 5, 6, 7, 8))
def _costs(logits, labels, input_lengths, label_lengths, blank, reduction, fastemit_lambda,
           delay_penalty, impl):
    B, T, U1, V = logits.shape
    valid = _checks.valid_examples(input_lengths, label_lengths, (B, T, U1 - 1, V), labels)
    blank_lp, emit_lp = full_lattice_log_probs(logits, labels, input_lengths, label_lengths,
                                               valid, blank)
    emit_lp = delay_penalized(emit_lp, input_lengths, delay_penalty)
    costs = lattice_costs(blank_lp, emit_lp, *kernel_lengths(input_lengths, label_lengths, valid),
                          fastemit_lambda, impl)
    return reduce_costs(costs[:, 0], reduction)
