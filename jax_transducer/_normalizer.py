"""Log-normalisers of the additive joiner, and their gradient, without a (B, T, U+1, V) tensor.

log_norm[b, t, u] = log sum_v exp(E[b, t, v] + P[b, u, v])
                  = mE[b, t] + mP[b, u] + log S[b, t, u],  S = exp(E - mE) @ exp(P - mP)^T

with mE, mP the row maxima: the sum over V is one batched matmul (an XLA dot). For a cotangent g
of log_norm, with W = g / S, the gradients are the softmax parts

    dE = exp(E - mE) * (W @ exp(P - mP)),    dP = exp(P - mP) * (W^T @ exp(E - mE)),

two more matmuls of the saved exponentials (the shifts cancel).

Exactness: where the two rows peak on different labels far apart (emissions [0, -1000] against
predictions [-1000, 0]), every product of shifted exponentials underflows and S loses its digits
or becomes 0. Such cells (S below sqrt(tiny) * V) are recomputed exactly, as a logsumexp over V of
the cell's own logits, and their share of both gradients likewise. That pass scans the frames in
chunks of about 2^20 logits (at least one frame of the whole batch, B*(U+1)*V), so its memory
stays bounded, and it runs only when some cell needs it (lax.cond; under vmap both branches run). Rows that are not used (padding, invalid examples) never reach a result,
whatever they hold, and get exactly zero gradient.
"""

import jax
import jax.numpy as jnp

PRECISION = jax.lax.Precision.HIGHEST


@jax.custom_vjp
def log_normalizer(emissions, predictions, e_used, p_used):
    """(B, T, V), (B, U+1, V) scores and (B, T), (B, U+1) bool row masks -> (B, T, U+1) in the
    scores' dtype, exact also where the shifted exponentials underflow."""
    return _forward(emissions, predictions, e_used, p_used)[0]


def _masked(x, used):
    return jnp.where(used[..., None], x, 0)


def _exponentials(x):
    shift = jnp.max(x, axis=-1, keepdims=True)
    return jnp.exp(x - shift), shift


_CHUNK = 1 << 20  # logits per step of the exact pass (at least one frame of the whole batch)


def _scan_frames(e, p, per_frame, step, init):
    """Scans the frames in chunks of c, all examples at once (so the batch stays partitionable):
    step(carry, (e chunk (B, c, V), *per_frame chunks (B, c, ...))) -> (carry, out (B, c, ...)).
    Returns (carry, out (B, T, ...))."""
    B, T, V = e.shape
    c = max(1, min(T, _CHUNK // max(1, B * p.shape[1] * V)))
    n = -(-T // c)

    def chunked(x):
        x = jnp.pad(x, [(0, 0), (0, n * c - T)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape((B, n, c) + x.shape[2:]), 1, 0)

    carry, out = jax.lax.scan(step, init, (chunked(e), *map(chunked, per_frame)))
    out = jnp.moveaxis(out, 0, 1)
    return carry, out.reshape((B, n * c) + out.shape[3:])[:, :T]


def _exact_log_norm(e, p):
    def step(carry, xs):
        logits = xs[0][:, :, None, :] + p[:, None, :, :]  # (B, c, U+1, V)
        peak = jnp.max(logits, axis=-1)
        return carry, peak + jnp.log(jnp.sum(jnp.exp(logits - peak[..., None]), axis=-1))
    return _scan_frames(e, p, (), step, None)[1]


def _exact_grads(e, p, weight, log_norm):
    """sum_u and sum_t of weight[b,t,u] * softmax[b,t,u,:], for the cells where weight != 0."""
    def step(d_p, xs):
        rows, w, ln = xs
        w = w[..., None]
        share = jnp.where(w != 0, w * jnp.exp(rows[:, :, None, :] + p[:, None, :, :]
                                              - ln[..., None]), 0)  # (B, c, U+1, V)
        return d_p + share.sum(axis=1), share.sum(axis=2)
    d_p, d_e = _scan_frames(e, p, (weight, log_norm), step, jnp.zeros_like(p))
    return d_e, d_p


def _forward(emissions, predictions, e_used, p_used):
    e, p = _masked_pair(emissions, predictions, e_used, p_used)
    exp_e, max_e = _exponentials(e)
    exp_p, max_p = _exponentials(p)
    sums = jnp.einsum("btv,buv->btu", exp_e, exp_p, precision=PRECISION)
    log_norm = jnp.log(sums) + max_e + jnp.swapaxes(max_p, -1, -2)
    # Products below `tiny` may have been flushed: against S >= sqrt(tiny) * V, all V of them
    # together weigh at most sqrt(tiny) relative. Below that, recompute the cell.
    inexact = sums < jnp.sqrt(jnp.finfo(sums.dtype).tiny) * e.shape[-1]

    # The exact branch re-masks the raw inputs, so that no masked copy is stored in the common case.
    exact = lambda x: jnp.where(inexact, _exact_log_norm(*_masked_pair(
        emissions, predictions, e_used, p_used)), x)
    log_norm = jax.lax.cond(jnp.any(inexact), exact, lambda x: x, log_norm)
    return log_norm, (emissions, predictions, e_used, p_used, exp_e, exp_p, sums, log_norm,
                      inexact)


def _masked_pair(emissions, predictions, e_used, p_used):
    return _masked(emissions, e_used), _masked(predictions, p_used)


def _backward(residuals, g):
    emissions, predictions, e_used, p_used, exp_e, exp_p, sums, log_norm, inexact = residuals
    w = jnp.where(inexact, 0, g / jnp.where(inexact, 1, sums))
    d_e = exp_e * jnp.einsum("btu,buv->btv", w, exp_p, precision=PRECISION)
    d_p = exp_p * jnp.einsum("btu,btv->buv", w, exp_e, precision=PRECISION)

    def exact(grads):
        e, p = _masked_pair(emissions, predictions, e_used, p_used)
        extra = _exact_grads(e, p, jnp.where(inexact, g, 0), log_norm)
        return grads[0] + extra[0], grads[1] + extra[1]

    d_e, d_p = jax.lax.cond(jnp.any(inexact), exact, lambda x: x, (d_e, d_p))
    return d_e, d_p, None, None


log_normalizer.defvjp(_forward, _backward)
