"""Pruned RNN-T loss (k2's pruned transducer): the joiner runs only on a window of s_range label
positions per frame, chosen from the occupancies of the cheap additive lattice.

The recipe, as k2/icefall users know it (k2's rnnt_loss_smoothed, get_rnnt_prune_ranges,
do_rnnt_pruning and rnnt_loss_pruned):

    # 1. the "simple" loss: an additive joiner of linear projections to V (cheap, O(B*T*U))
    simple = transducer_loss(simple_am(enc), simple_lm(dec), labels, T_b, U_b, reduction="sum")
    # 2. windows of s_range label positions per frame, from the simple lattice's occupancies
    ranges = prune_ranges(simple_am(enc), simple_lm(dec), labels, T_b, U_b, s_range=5)
    # 3. the real joiner on (B, T, s_range, .) instead of (B, T, U+1, .)
    enc_p, dec_p = prune_joiner_inputs(joiner_enc_proj(enc), joiner_dec_proj(dec), ranges, 5)
    logits = joiner(enc_p, dec_p)                                    # (B, T, s_range, V)
    pruned = pruned_transducer_loss(logits, ranges, labels, T_b, U_b, reduction="sum")
    loss = simple_scale * simple + pruned_scale * pruned

icefall uses simple_scale = 0.5 and pruned_scale = 1.0 after a warm-up (during it, simple_scale
falls from 1.0 and pruned_scale rises from 0.1). The ranges are not differentiable (k2 computes
them from the simple loss's gradients too, without back-propagating through them). k2 smooths
the simple lattice with language-model-only and acoustic-only terms (lm_only_scale,
am_only_scale); here the simple loss is the plain additive one.
"""

import functools
import operator

import jax
import jax.numpy as jnp
import numpy as np

from . import _checks, _ffi
from ._lattice import (delay_penalized, kernel_lengths, lattice_costs, lattice_labels,
                       inference_moves, reduce_costs)
from .logits import cell_log_probs


def _check_s_range(s_range):
    try:
        s_range = operator.index(s_range)
    except TypeError:
        raise TypeError(f"s_range: expected a Python int, got {type(s_range).__name__}") from None
    if s_range < 1:
        raise ValueError(f"s_range: expected an int >= 1, got {s_range}")
    return s_range


# ---------------------------------------------------------------------------------------------
# Windows from the additive lattice.

def prune_ranges(emissions, predictions, labels, input_lengths, label_lengths, s_range, blank=0,
                 impl=None):
    """Per frame, the first of s_range consecutive label positions that the pruned loss keeps.

    Args:
      emissions (B, T, V), predictions (B, U+1, V), labels (B, U), input_lengths (B,),
      label_lengths (B,), blank: the additive ("simple") joiner's inputs, as in
        `transducer_loss` (same checks).
      s_range: Python int >= 1, the window width (k2's s_range; k2 requires >= 2, since a window of
        one position can only cover an example without labels).
      impl: None/"auto", "ffi" or "xla": which implementation runs the lattice, as in
        `transducer_loss`.

    Returns:
      ranges (B, T) int32: frame t of example b keeps the nodes (t, u) with
      ranges[b, t] <= u < ranges[b, t] + s_range. Not differentiable (inputs are stop_gradient'ed).

    How: the additive lattice's posterior flows (the negated gradients of its cost w.r.t. the
    blank and label log-probabilities) score each candidate start s of frame t as
        sum_{s <= u < s + s_range} flow_blank[t, u] - flow_emit[t, s - 1],
    the posterior probability that the path leaves frame t (by its blank move) from inside the
    window, minus the probability that it enters the window from below during frame t (the
    label move (t, s-1) -> (t, s)): k2's score. The argmax (ties to the lowest s) over
    s in [0, max(0, U+1-s_range)] is then adjusted as k2 does: frames t >= T_b - 1 are set to
    F_b = max(0, U_b + 1 - s_range) (so the last window ends at U_b); a running minimum from the
    end makes the starts non-decreasing; the smallest raise that keeps consecutive windows
    overlapping (r[t+1] - r[t] <= s_range - 1) follows; and r[t] <= (s_range - 1) * t makes
    r[0] = 0.

    Guarantees, for every valid example with U_b <= (s_range - 1) * T_b (always true when
    s_range >= U_b + 1):
      * 0 <= ranges[b, t] <= max(0, U+1 - s_range) for every t (padding frames included);
      * ranges[b, 0] = 0 and 0 <= ranges[b, t+1] - ranges[b, t] <= s_range - 1 for t < T_b - 1
        (monotone, and consecutive windows share a position, so a path can pass between them);
      * ranges[b, T_b - 1] = F_b, so (T_b - 1, U_b) is in the last window;
    hence a path from (0, 0) to (T_b - 1, U_b) exists inside the windows: exactly the
    constraints `pruned_transducer_loss` checks. When U_b > (s_range - 1) * T_b no windowing can
    hold a path (each frame can advance at most s_range - 1 positions): the returned ranges
    break the last constraint, and `pruned_transducer_loss` treats the example as invalid.
    With s_range >= U + 1, every range is 0 (the windows hold the whole lattice).
    An invalid example (bad lengths or labels, inside jit) gets a row of zeros.
    """
    emissions, predictions, dims = _checks.check_scores(emissions, predictions)
    blank = _checks.check_blank(blank, dims[3])
    s_range = _check_s_range(s_range)
    input_lengths, label_lengths = _checks.check_lengths(input_lengths, label_lengths, dims)
    labels = _checks.check_labels(labels, label_lengths, dims)
    return _prune_ranges(emissions, predictions, labels, input_lengths, label_lengths, s_range,
                         blank, _ffi.check_impl(impl))


@functools.partial(jax.jit, static_argnums=(5, 6, 7))
def _prune_ranges(emissions, predictions, labels, input_lengths, label_lengths, s_range, blank,
                  impl):
    _, _, valid, (_, blank_lp, emit_lp) = inference_moves(
        emissions, predictions, labels, input_lengths, label_lengths, blank, impl)
    lengths = kernel_lengths(input_lengths, label_lengths, valid)
    costs, alpha = _ffi.forward(blank_lp, emit_lp, *lengths, impl)
    flow_blank, flow_emit = _ffi.backward(blank_lp, emit_lp, alpha, costs, *lengths, impl)
    return windows(flow_blank, flow_emit, input_lengths, label_lengths, valid, s_range)


def windows(flow_blank, flow_emit, input_lengths, label_lengths, valid, s_range):
    """(B, T) window starts from the (B, T, U+1) move flows; see `prune_ranges`."""
    B, T, U1 = flow_blank.shape
    starts = jnp.arange(max(1, U1 - s_range + 1))
    inside = jnp.pad(jnp.cumsum(flow_blank, axis=2), ((0, 0), (0, 0), (1, 0)))
    inside = inside[..., jnp.minimum(starts + s_range, U1)] - inside[..., starts]
    entering = jnp.pad(flow_emit, ((0, 0), (0, 0), (1, 0)))[..., starts]  # flow_emit[s - 1]
    raw = jnp.argmax(inside - entering, axis=2).astype(jnp.int32)

    t = jnp.arange(T, dtype=jnp.int32)
    final = jnp.maximum(label_lengths + 1 - s_range, 0)[:, None]
    r = jnp.where(t < input_lengths[:, None] - 1, raw, final)
    r = jax.lax.cummin(r, axis=1, reverse=True)  # non-decreasing, never above the end
    step = (s_range - 1) * t
    # r[t+1] - r[t] <= s_range - 1 is "step - r non-decreasing": lower it from the end, i.e.
    # raise r as little as needed.
    r = step - jax.lax.cummin(step - r, axis=1, reverse=True)
    r = jnp.minimum(r, step)  # r[0] = 0; keeps both properties (a minimum of two such rows)
    return jnp.where(valid[:, None], r, 0)


def ranges_valid(ranges, input_lengths, label_lengths, s_range, xp=jnp):
    """(B,) bool: whether the windows of each example hold a path from (0, 0) to
    (T_b - 1, U_b) (the constraints listed in `pruned_transducer_loss`). Lengths must be valid
    for the answer to mean anything. xp=np checks concrete values without tracing."""
    B, T = ranges.shape
    t = xp.arange(T)
    step = ranges[:, 1:] - ranges[:, :-1]
    pairs = t[1:] < input_lengths[:, None]
    last = xp.take_along_axis(ranges, xp.clip(input_lengths - 1, 0, T - 1)[:, None], 1)[:, 0]
    return ((ranges[:, 0] == 0)
            & xp.all(~pairs | ((step >= 0) & (step <= s_range - 1)), axis=1)
            & (last <= label_lengths) & (label_lengths <= last + s_range - 1))


# ---------------------------------------------------------------------------------------------
# Joiner inputs on the windows.

def prune_joiner_inputs(encoder_out, decoder_out, ranges, s_range):
    """The joiner's inputs on the windows (k2's do_rnnt_pruning).

    Args:
      encoder_out: (B, T, D) float, the encoder side of the joiner.
      decoder_out: (B, U+1, D') float, the prediction-network side (D' may differ from D).
      ranges: (B, T) integer window starts (from `prune_ranges`).
      s_range: Python int >= 1, the window width.

    Returns:
      (encoder (B, T, s_range, D), decoder (B, T, s_range, D')): encoder_out[b, t] repeated, and
      decoder_out[b, ranges[b, t] + k] for k < s_range. Positions past U (when s_range > U + 1 -
      ranges[b, t]) repeat row U; `pruned_transducer_loss` ignores them. Differentiable in both
      inputs; under jit the broadcast and the gather fuse into the joiner.
    """
    encoder_out = _checks.check_float_array("encoder_out", encoder_out, 3)
    decoder_out = _checks.check_float_array("decoder_out", decoder_out, 3)
    B, T, _ = encoder_out.shape
    if decoder_out.shape[0] != B or decoder_out.shape[1] < 1:
        raise ValueError(f"decoder_out: expected shape ({B}, U+1 >= 1, D), got "
                         f"{decoder_out.shape}")
    ranges = _checks.check_int_array("ranges", ranges, (B, T))
    return _prune_joiner_inputs(encoder_out, decoder_out, ranges, _check_s_range(s_range))


@functools.partial(jax.jit, static_argnums=3)
def _prune_joiner_inputs(encoder_out, decoder_out, ranges, s_range):
    B, T, D = encoder_out.shape
    u = jnp.clip(ranges[:, :, None] + jnp.arange(s_range), 0, decoder_out.shape[1] - 1)
    decoder = jax.vmap(lambda rows, index: rows[index])(decoder_out, u)
    return jnp.broadcast_to(encoder_out[:, :, None, :], (B, T, s_range, D)), decoder


# ---------------------------------------------------------------------------------------------
# The pruned loss.

def pruned_transducer_loss(logits, ranges, labels, input_lengths, label_lengths, blank=0,
                           reduction="none", fastemit_lambda=0.0, delay_penalty=0.0, impl=None):
    """RNN-T loss of the lattice restricted to windows of s_range label positions per frame.

    Args:
      logits: (B, T, s_range, V) joiner scores on the windows (float32, float64, bfloat16 or
        float16; computed in float32 at least): logits[b, t, k] scores node (t, ranges[b, t] + k).
      ranges: (B, T) integer window starts, e.g. from `prune_ranges`.
      labels: (B, U) integer targets; input_lengths (B,) in [1, T]; label_lengths (B,) in [0, U].
      blank, reduction, fastemit_lambda, delay_penalty, impl: as in `transducer_loss`.

    Returns:
      As `transducer_loss`. The lattice is the full (T_b, U_b + 1) one, with the log-softmax of
      logits[b, t, k] over V giving the blank and labels[b, u] log-probabilities of node
      (t, u = ranges[b, t] + k); nodes outside their frame's window (and positions u > U_b) get
      -inf, so the cost is -log of the total probability of the paths that stay inside the
      windows: never below the full lattice's cost for the same per-node log-probabilities, and
      equal to it when the windows hold every node (ranges all 0 with s_range >= U + 1).

    Ranges must let a path through (prune_ranges guarantees it where possible): for t < T_b,
    ranges[b, 0] = 0, 0 <= ranges[b, t+1] - ranges[b, t] <= s_range - 1, and
    ranges[b, T_b-1] <= U_b <= ranges[b, T_b-1] + s_range - 1. An example that breaks them is
    bad input like an out-of-range length: ValueError in eager calls, NaN cost and zero gradient
    inside jit. Ranges at frames t >= T_b are padding and never matter.

    Bad input otherwise as in `transducer_loss`; padding (frames t >= T_b, window positions past
    U_b, labels past label_length) never matters and gets exactly zero gradient. Memory:
    O(B*T*s_range*V) for the logits and their gradient, O(B*T*U) for the lattice.
    """
    fastemit_lambda, delay_penalty = _checks.check_options(reduction, fastemit_lambda,
                                                           delay_penalty)
    logits = _checks.check_float_array("logits", logits, 4)
    B, T, S, V = logits.shape
    if T < 1 or S < 1 or V < 1:
        raise ValueError(f"logits: expected shape (B, T >= 1, s_range >= 1, V >= 1), got "
                         f"{logits.shape}")
    labels = jnp.asarray(labels)
    if labels.ndim != 2 or labels.shape[0] != B:
        raise ValueError(f"labels: expected shape ({B}, U), got {labels.shape}")
    dims = (B, T, labels.shape[1], V)
    blank = _checks.check_blank(blank, V)
    input_lengths, label_lengths = _checks.check_lengths(input_lengths, label_lengths, dims)
    labels = _checks.check_labels(labels, label_lengths, dims)
    ranges = _checks.check_int_array("ranges", ranges, (B, T))
    _check_ranges_values(ranges, input_lengths, label_lengths, S)
    return _pruned_costs(logits, ranges, labels, input_lengths, label_lengths, blank, reduction,
                         fastemit_lambda, delay_penalty, _ffi.check_impl(impl))


def _check_ranges_values(ranges, input_lengths, label_lengths, s_range):
    values = [_checks.concrete(x) for x in (ranges, input_lengths, label_lengths)]
    if any(v is None for v in values) or not values[0].size:
        return
    ok = ranges_valid(*(v.astype(np.int64) for v in values), s_range, xp=np)
    if not ok.all():
        b = int(np.flatnonzero(~ok)[0])
        raise ValueError(
            f"ranges: example {b} has no path inside its windows (s_range={s_range}, "
            f"input_length={values[1][b]}, label_length={values[2][b]}): expected ranges[b, 0] "
            f"= 0, steps in [0, s_range - 1] and ranges[b, T_b-1] <= U_b <= ranges[b, T_b-1] + "
            f"s_range - 1, got {values[0][b, :values[1][b]].tolist()}")


@functools.partial(jax.jit, static_argnums=(5, 6, 7, 8, 9))
def _pruned_costs(logits, ranges, labels, input_lengths, label_lengths, blank, reduction,
                  fastemit_lambda, delay_penalty, impl):
    B, T, S, V = logits.shape
    U = labels.shape[1]
    valid = (_checks.valid_examples(input_lengths, label_lengths, (B, T, U, V), labels)
             & ranges_valid(ranges, input_lengths, label_lengths, S))
    safe = lattice_labels(labels, label_lengths, valid, blank)  # (B, U+1)

    # Window cells (t, k) are nodes u = ranges[t] + k.
    u = ranges[:, :, None] + jnp.arange(S)
    t_used = valid[:, None] & (jnp.arange(T) < input_lengths[:, None])
    used = t_used[:, :, None] & (u <= label_lengths[:, None, None])
    index = jnp.take_along_axis(safe, jnp.clip(u, 0, U).reshape(B, T * S), axis=1)
    blank_w, emit_w = cell_log_probs(logits, index.reshape(B, T, S), used, blank)

    # Onto the (B, T, U+1) lattice: node (t, u) reads window cell k = u - ranges[t], if any.
    k = jnp.arange(U + 1) - ranges[:, :, None]
    inside = (k >= 0) & (k < S)
    k = jnp.clip(k, 0, S - 1)
    blank_lp, emit_lp = (jnp.where(inside, jnp.take_along_axis(x, k, axis=2), -jnp.inf)
                         for x in (blank_w, emit_w))
    emit_lp = delay_penalized(emit_lp, input_lengths, delay_penalty)
    costs = lattice_costs(blank_lp, emit_lp, *kernel_lengths(input_lengths, label_lengths, valid),
                          fastemit_lambda, impl)
    return reduce_costs(costs[:, 0], reduction)
