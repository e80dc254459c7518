"""Log-normalisers of the additive joiner, and their gradient, without a (B, T, U+1, V) tensor.

log_norm[b, t, u] = log sum_v exp(E[b, t, v] + P[b, u, v])
                  = mE[b, t] + mP[b, u] + log S[b, t, u],  S = exp(E - mE) @ exp(P - mP)^T

with mE, mP the row maxima: the sum over V is one batched matmul (an XLA dot). For a cotangent g
of log_norm, with W = g / S, the gradients are the softmax parts

    dE = exp(E - mE) * (W @ exp(P - mP)),    dP = exp(P - mP) * (W^T @ exp(E - mE)),

two more matmuls of the saved exponentials (the shifts cancel). Rows that are not used (padding, invalid examples)
never reach a result, whatever they hold, and get exactly zero gradient.
"""

import jax
import jax.numpy as jnp

PRECISION = jax.lax.Precision.HIGHEST


@jax.custom_vjp
def log_normalizer(emissions, predictions, e_used, p_used):
    """(B, T, V), (B, U+1, V) scores and (B, T), (B, U+1) bool row masks -> (B, T, U+1).

    The result is in the scores' dtype. The shifted exponentials underflow when the two rows'
    maxima sit on different labels and their sum is hundreds of nats below the maxima; such cells
    come out as -inf.
    """
    return _forward(emissions, predictions, e_used, p_used)[0]


def _exponentials(x, used):
    """exp(x - row max) and the row max, with unused rows zeroed first: whatever they held, they
    keep S finite and positive, and get exactly zero gradient (their cotangent is zero)."""
    x = jnp.where(used[..., None], x, 0)
    shift = jnp.max(x, axis=-1, keepdims=True)
    return jnp.exp(x - shift), shift


def _forward(emissions, predictions, e_used, p_used):
    exp_e, max_e = _exponentials(emissions, e_used)
    exp_p, max_p = _exponentials(predictions, p_used)
    sums = jnp.einsum("btv,buv->btu", exp_e, exp_p, precision=PRECISION)
    log_norm = jnp.log(sums) + max_e + jnp.swapaxes(max_p, -1, -2)
    return log_norm, (exp_e, exp_p, sums)


def _backward(residuals, g):
    exp_e, exp_p, sums = residuals
    w = g / sums
    d_e = exp_e * jnp.einsum("btu,buv->btv", w, exp_p, precision=PRECISION)
    d_p = exp_p * jnp.einsum("btu,btv->buv", w, exp_e, precision=PRECISION)
    return d_e, d_p, None, None


log_normalizer.defvjp(_forward, _backward)
