"""Log-normalisers of the additive joiner without a (B, T, U+1, V) tensor.

log_norm[b, t, u] = log sum_v exp(E[b, t, v] + P[b, u, v])
                  = mE[b, t] + mP[b, u] + log (exp(E - mE) @ exp(P - mP)^T)[b, t, u]

with mE, mP the row maxima, so the sum over V is one batched matmul (an XLA dot). Autodiff of this
expression gives the softmax part of both gradients as two more matmuls of exponentials, and saves
only (B, T, V), (B, U+1, V) and (B, T, U+1) arrays.
"""

import jax
import jax.numpy as jnp


def log_normalizer(emissions, predictions, precision=jax.lax.Precision.HIGHEST):
    """(B, T, V), (B, U+1, V) -> (B, T, U+1) log-normalisers, in the inputs' dtype.

    Rows must be finite where the result is used (callers zero the padding first). The shifted
    exponentials underflow when the two rows' maxima sit on different labels and their sum is
    hundreds of nats below the maxima; such cells come out as -inf.
    """
    # The shift only conditions the exponentials; the result does not depend on it.
    max_e = jax.lax.stop_gradient(jnp.max(emissions, axis=-1, keepdims=True))
    max_p = jax.lax.stop_gradient(jnp.max(predictions, axis=-1, keepdims=True))
    sums = jnp.einsum("btv,buv->btu", jnp.exp(emissions - max_e), jnp.exp(predictions - max_p),
                      precision=precision)
    return jnp.log(sums) + max_e + jnp.swapaxes(max_p, -1, -2)
