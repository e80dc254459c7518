"""Move log-probabilities of the additive joiner, and their gradient, without a (B, T, U+1, V)
tensor.

The blank and label moves out of lattice node (t, u) have log-probabilities

    blank_lp[b, t, u] = E[b, t, blank]     + P[b, u, blank]     - log_norm[b, t, u]
    emit_lp[b, t, u]  = E[b, t, labels[u]] + P[b, u, labels[u]] - log_norm[b, t, u]
    log_norm[b, t, u] = log sum_v exp(E[b, t, v] + P[b, u, v])
                      = mE[b, t] + mP[b, u] + log S[b, t, u],  S = exp(E - mE) @ exp(P - mP)^T

with mE, mP the row maxima: the sum over V is one batched matmul (an XLA dot). For cotangents
g_blank, g_emit of the moves, with W = -(g_blank + g_emit) / S, the gradients are

    dE = exp(E - mE) * (W @ exp(P - mP))   + g_blank summed over u at v = blank
                                           + g_emit scattered to v = labels[u],
    dP = exp(P - mP) * (W^T @ exp(E - mE)) + the same sums over t,

two more matmuls of the saved exponentials (the shifts cancel). One custom VJP covers the
normaliser and the gathers so that the whole (B, T, V) gradient is one fused elementwise pass and
an in-place scatter: autodiff of the gathers would add two more passes over (B, T, V).

Exactness: where the two rows peak on different labels far apart (emissions [0, -1000] against
predictions [-1000, 0]), every product of shifted exponentials underflows and S loses its digits
or becomes 0. Such cells (S below sqrt(tiny) * V) are recomputed exactly, as a logsumexp over V of
the cell's own logits, and their share of both gradients likewise. The CPU kernels do that per
cell inside their own passes. On the XLA path the pass scans the frames in chunks of about 2^20
logits (at least one frame of the whole batch, B*(U+1)*V), so its memory stays bounded, and it
runs only when some cell needs it (lax.cond; under vmap both branches run).

Viterbi's lattice scores each label move by the best non-blank label instead,
max_{v != blank} (E + P) - log_norm (`viterbi_moves`).

Rows that are not used (padding, invalid examples) are read as zeros, so whatever they hold
(NaN included) never reaches a result, and they get exactly zero gradient.
"""

import functools

import jax
import jax.numpy as jnp

from . import _ffi, _vma

PRECISION = jax.lax.Precision.HIGHEST


def _masked(x, used):
    return jnp.where(used[..., None], x, 0)


def _exponentials(x, used):
    """exp(x - row max) on used rows, 0 on the others; the row maxima (0 on unused rows).

    The max reads the raw rows (a select feeding a reduction would be materialised by XLA's CPU
    backend): an unused row's NaN goes only into its own, discarded, maximum."""
    shift = jnp.where(used, jnp.max(x, axis=-1), 0)
    return jnp.where(used[..., None], jnp.exp(x - shift[..., None]), 0), shift


def _gathers(emissions, predictions, labels, e_used, p_used, blank):
    """E + P at the blank and at labels[u] (None if labels is None), (B, T, U+1) each."""
    B, T, _ = emissions.shape
    e_blank = jnp.where(e_used, emissions[:, :, blank], 0)[:, :, None]
    p_blank = jnp.where(p_used, predictions[:, :, blank], 0)[:, None, :]
    if labels is None:
        return e_blank + p_blank, None
    index = jnp.broadcast_to(labels[:, None, :], (B, T, labels.shape[1]))
    e_label = jnp.where(e_used[..., None], jnp.take_along_axis(emissions, index, axis=2), 0)
    p_label = jnp.take_along_axis(predictions, labels[:, :, None], axis=2)[..., 0]
    p_label = jnp.where(p_used, p_label, 0)[:, None, :]
    return e_blank + p_blank, e_label + p_label


# Two implementations of the forward and of the gradient assembly, with the same inputs and
# results: XLA dots and fusions (GPU, float64, and CPU installs without the fused kernels), and the
# CPU's fused float32 kernels (lib/cpu/normalizer_cpu.h), which never store the exponentials and
# finish the move log-probabilities (exact cells included) in the same pass.

def _inexact_floor(dtype, V):
    """Products below `tiny` may have been flushed: against S >= sqrt(tiny) * V, all V of them
    together weigh at most sqrt(tiny) relative. Cells below that are recomputed exactly."""
    return jnp.sqrt(jnp.finfo(dtype).tiny) * V


def _forward_xla(emissions, predictions, labels, e_used, p_used, *, blank):
    exp_e, max_e = _exponentials(emissions, e_used)
    exp_p, max_p = _exponentials(predictions, p_used)
    sums = jnp.einsum("btv,buv->btu", exp_e, exp_p, precision=PRECISION)
    cell_used = e_used[:, :, None] & p_used[:, None, :]
    log_norm = jnp.where(cell_used, jnp.log(sums) + max_e[:, :, None] + max_p[:, None, :], 0)
    inexact = cell_used & (sums < _inexact_floor(sums.dtype, emissions.shape[-1]))
    exact = lambda x: jnp.where(inexact, _exact_log_norm(
        emissions, _masked(predictions, p_used), e_used), x)
    log_norm = jax.lax.cond(jnp.any(inexact), exact, lambda x: x, log_norm)
    blank_sum, label_sum = _gathers(emissions, predictions, labels, e_used, p_used, blank)
    return blank_sum - log_norm, label_sum - log_norm, log_norm, sums, max_e, max_p


def _row_counts(e_used, p_used):
    return (e_used.sum(1, dtype=jnp.int32)[:, None], p_used.sum(1, dtype=jnp.int32)[:, None])


def _forward_cpu(emissions, predictions, labels, e_used, p_used, *, blank):
    return _ffi.norm_forward(emissions, predictions, *_row_counts(e_used, p_used), labels, blank)


def _grads_xla(emissions, predictions, labels, e_used, p_used, max_e, max_p, w, g_blank, g_emit,
               log_norm, g_exact, *, blank):
    exp_e = jnp.where(e_used[..., None], jnp.exp(emissions - max_e[..., None]), 0)
    exp_p = jnp.where(p_used[..., None], jnp.exp(predictions - max_p[..., None]), 0)
    # Unused rows are zeroed explicitly: a NaN in some example's used rows would otherwise reach
    # them as 0 * NaN through the matmuls.
    d_e = jnp.where(e_used[..., None],
                    exp_e * jnp.einsum("btu,buv->btv", w, exp_p, precision=PRECISION), 0)
    d_p = jnp.where(p_used[..., None],
                    exp_p * jnp.einsum("btu,btv->buv", w, exp_e, precision=PRECISION), 0)
    # The blank and label columns: the gathers' own VJP (a scatter-add that sharding propagates
    # through; GPUs fuse the rest).
    _, gathers_vjp = jax.vjp(lambda e, p: _gathers(e, p, labels, e_used, p_used, blank),
                             emissions, predictions)
    cols_e, cols_p = gathers_vjp((g_blank, g_emit))

    def exact(grads):
        extra = _exact_grads(emissions, _masked(predictions, p_used), e_used, g_exact, log_norm)
        return grads[0] + extra[0], grads[1] + extra[1]

    return jax.lax.cond(jnp.any(g_exact != 0), exact, lambda x: x, (d_e + cols_e, d_p + cols_p))


def _grads_cpu(emissions, predictions, labels, e_used, p_used, max_e, max_p, w, g_blank, g_emit,
               log_norm, g_exact, *, blank):
    # The kernel adds the exact cells' shares itself: a lax.cond around its (B, T, V) result
    # would cost a copy of it.
    return _ffi.norm_backward(emissions, predictions, *_row_counts(e_used, p_used), max_e, w,
                              g_blank, g_emit, log_norm, g_exact, labels, blank)


def _on_platform(xla_fn, cpu_fn, dtype, impl, **static):
    """f(*arrays): the fused CPU kernel on CPU for float32 (where built, unless impl is "xla"),
    XLA everywhere else."""
    xla_fn = functools.partial(xla_fn, **static)
    if dtype != jnp.float32 or impl == "xla" or not _ffi.has_cpu_normalizer():
        return xla_fn
    cpu_fn = functools.partial(cpu_fn, **static)
    return lambda *args: jax.lax.platform_dependent(*args, cpu=cpu_fn, default=xla_fn)


def log_norm_and_moves(emissions, predictions, labels, e_used, p_used, blank, impl=None):
    """The log-normaliser and the blank and label move log-probabilities, (B, T, U+1) each, in the
    scores' dtype (not differentiable: see `move_log_probs`).

    emissions (B, T, V), predictions (B, U+1, V); labels (B, U+1) int32 in [0, V) (column U and
    unused positions may hold anything in range), or None for no emit_lp; e_used (B, T),
    p_used (B, U+1) bool row masks.
    """
    return _forward(emissions, predictions, labels, e_used, p_used, blank, impl)[0]


def viterbi_moves(emissions, predictions, e_used, p_used, blank, impl=None):
    """Viterbi's lattice, (B, T, U+1) each (not differentiable): the blank move log-probabilities
    and the best non-blank label's, max_{v != blank} (E[b, t, v] + P[b, u, v]) - log_norm.
    Arguments as in `log_norm_and_moves`."""
    fn = _on_platform(_viterbi_moves_xla, _viterbi_moves_cpu, emissions.dtype, impl, blank=blank)
    return fn(emissions, predictions, e_used, p_used)


def _viterbi_moves_xla(emissions, predictions, e_used, p_used, *, blank):
    (log_norm, blank_lp, _), _ = _forward(emissions, predictions, None, e_used, p_used, blank,
                                          impl="xla")
    e, p = _masked_pair(emissions, predictions, e_used, p_used)
    # XLA fuses the broadcast add into the reduction: the (B, T, U+1, V) scores are never stored.
    scores = jnp.where(jnp.arange(e.shape[-1]) == blank, -jnp.inf,
                       e[:, :, None, :] + p[:, None, :, :])
    return blank_lp, jnp.max(scores, axis=-1) - log_norm


def _viterbi_moves_cpu(emissions, predictions, e_used, p_used, *, blank):
    # One kernel: the sums pass over V, with each cell's best label found among a few candidate
    # labels of its rows (lib/cpu/normalizer_cpu.h, BestLabels), finished in log space there.
    return _ffi.norm_viterbi(emissions, predictions, *_row_counts(e_used, p_used), blank)


def best_labels(emissions, predictions, frames, blank, impl=None):
    """Viterbi's labels, (B, U) int32: where frames[b, u] (B, U) is a frame t (not NO_FRAME), the
    first argmax over v != blank of E[b, t, v] + P[b, u, v] (the first NaN if any), elsewhere the
    blank."""
    fn = _on_platform(_best_labels_xla, _best_labels_cpu, emissions.dtype, impl, blank=blank)
    return fn(emissions, predictions, frames)


def _best_labels_xla(emissions, predictions, frames, *, blank):
    rows = jnp.take_along_axis(emissions, jnp.maximum(frames, 0)[..., None], axis=1)  # (B, U, V)
    scores = rows + predictions[:, :frames.shape[1]]
    scores = jnp.where(jnp.arange(scores.shape[-1]) == blank, -jnp.inf, scores)
    return jnp.where(frames >= 0, _first_argmax(scores), blank)


def _first_argmax(x):
    """jnp.argmax over the last axis (the first maximum; the first NaN if any), as int32: a max
    and a min of indices, reductions that XLA vectorises on CPU, where its argmax (one reduction
    over (value, index) pairs) runs 2.5x slower. NaNs are looked for explicitly: XLA's CPU max
    reduction may skip them (jax 0.10.2, rows of 1001 in a (3, 5, 1001) array)."""
    index = jnp.arange(x.shape[-1], dtype=jnp.int32)
    is_nan = jnp.isnan(x)
    top = jnp.max(jnp.where(is_nan, -jnp.inf, x), axis=-1, keepdims=True)
    hit = jnp.where(is_nan.any(axis=-1, keepdims=True), is_nan, x == top)
    return jnp.min(jnp.where(hit, index, x.shape[-1]), axis=-1)


def _best_labels_cpu(emissions, predictions, frames, *, blank):
    # One pass over the two rows of each label move (XLA makes four over a (B, U, V) gather).
    return _ffi.best_labels(emissions, predictions, frames, blank)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def move_log_probs(emissions, predictions, labels, e_used, p_used, blank, impl=None):
    """(blank_lp, emit_lp), (B, T, U+1) each: differentiable in emissions and predictions.
    Arguments as in `log_norm_and_moves`."""
    return _move_log_probs_fwd(emissions, predictions, labels, e_used, p_used, blank, impl)[0]


def _forward(emissions, predictions, labels, e_used, p_used, blank, impl=None):
    fn = _on_platform(_forward_xla, _forward_cpu, emissions.dtype, impl, blank=blank)
    some_labels = jnp.full(p_used.shape, blank, jnp.int32) if labels is None else labels
    blank_lp, emit_lp, log_norm, sums, max_e, max_p = fn(emissions, predictions, some_labels,
                                                          e_used, p_used)
    cell_used = e_used[:, :, None] & p_used[:, None, :]
    inexact = cell_used & (sums < _inexact_floor(sums.dtype, emissions.shape[-1]))
    moves = (log_norm, blank_lp, None if labels is None else emit_lp)
    return moves, (emissions, predictions, labels, e_used, p_used, max_e, max_p, sums, log_norm,
                   cell_used, inexact)


def _move_log_probs_fwd(emissions, predictions, labels, e_used, p_used, blank, impl):
    (_, blank_lp, emit_lp), residuals = _forward(emissions, predictions, labels, e_used, p_used,
                                                 blank, impl=impl)
    return (blank_lp, emit_lp), residuals


def _move_log_probs_bwd(blank, impl, residuals, g):
    (emissions, predictions, labels, e_used, p_used, max_e, max_p, sums, log_norm, cell_used,
     inexact) = residuals
    # Cells outside the used rows get no gradient, whatever their cotangent holds.
    g_blank, g_emit = (jnp.where(cell_used, x, 0) for x in g)
    g_norm = -(g_blank + g_emit)
    # Inexact cells' shares are computed from the scores themselves (g_exact), the others' through
    # the matmuls (w).
    w = jnp.where(cell_used & ~inexact, g_norm / sums, 0)
    g_exact = jnp.where(inexact, g_norm, 0)
    grads_fn = _on_platform(_grads_xla, _grads_cpu, emissions.dtype, impl, blank=blank)
    d_e, d_p = grads_fn(emissions, predictions, labels, e_used, p_used, max_e, max_p, w, g_blank,
                        g_emit, log_norm, g_exact)
    return d_e, d_p, None, None, None


move_log_probs.defvjp(_move_log_probs_fwd, _move_log_probs_bwd)


def _masked_pair(emissions, predictions, e_used, p_used):
    return _masked(emissions, e_used), _masked(predictions, p_used)


_CHUNK = 1 << 20  # logits per step of the exact pass (at least one frame of the whole batch)


def _scan_frames(e, p, e_used, per_frame, step, init):
    """Visits the frames in chunks of c, all examples at once (so the batch stays partitionable),
    slicing the raw arrays in place (no transposed or masked copy of E):
    step(carry, fresh (c,), (e chunk (B, c, V), *per_frame chunks (B, c, ...))) -> (carry, out
    (B, c, ...)), with e's unused rows zeroed and p already masked. The last chunk is shifted back
    to end at T, so `fresh` marks the frames no earlier chunk has done (an accumulating step must
    ignore the others). Returns (carry, out (B, T, ...))."""
    B, T, V = e.shape
    c = max(1, min(T, _CHUNK // max(1, B * p.shape[1] * V)))
    n = -(-T // c)

    def body(carry, i):
        start = jnp.minimum(i * c, T - c)
        chunk = lambda x: jax.lax.dynamic_slice_in_dim(x, start, c, axis=1)
        e_c = jnp.where(chunk(e_used)[..., None], chunk(e), 0)
        return step(carry, start + jnp.arange(c) >= i * c, (e_c, *map(chunk, per_frame)))

    # Under shard_map the carry varies along the inputs' mesh axes from the first step on.
    axes = _vma.varying_axes(e, p, e_used, *per_frame)
    init = jax.tree.map(lambda x: _vma.to_varying(x, axes), init)
    carry, out = jax.lax.scan(body, init, jnp.arange(n))  # out: (n, B, c, ...)
    out = jnp.moveaxis(out, 0, 1)
    last = out[:, n - 1, n * c - T:]  # the last chunk's fresh frames, at its end
    if n == 1:
        return carry, last
    head = out[:, :n - 1].reshape((B, (n - 1) * c) + out.shape[3:])
    return carry, jnp.concatenate([head, last], axis=1)


def _exact_log_norm(e, p, e_used):
    def step(carry, fresh, xs):
        logits = xs[0][:, :, None, :] + p[:, None, :, :]  # (B, c, U+1, V)
        peak = jnp.max(logits, axis=-1)
        return carry, peak + jnp.log(jnp.sum(jnp.exp(logits - peak[..., None]), axis=-1))
    return _scan_frames(e, p, e_used, (), step, None)[1]


def _exact_grads(e, p, e_used, weight, log_norm):
    """sum_u and sum_t of weight[b,t,u] * softmax[b,t,u,:], for the cells where weight != 0."""
    def step(d_p, fresh, xs):
        rows, w, ln = xs
        w = jnp.where(fresh[:, None], w, 0)[..., None]
        share = jnp.where(w != 0, w * jnp.exp(rows[:, :, None, :] + p[:, None, :, :]
                                              - ln[..., None]), 0)  # (B, c, U+1, V)
        return d_p + share.sum(axis=1), share.sum(axis=2)
    d_p, d_e = _scan_frames(e, p, e_used, (weight, log_norm), step, jnp.zeros_like(p))
    return d_e, d_p
