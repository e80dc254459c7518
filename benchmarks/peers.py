"""Baselines for the benchmark: what you would write without jax_transducer.

- `full_joiner_loss`: a pure-JAX RNN-T loss that forms the (B, T, U+1, V) joiner, takes its
  log-softmax, and runs the alpha recursion with `jax.lax.scan` over t (each row's label moves are
  a cumulative logsumexp over u). Gradients by JAX autodiff.
- `matmul_yardstick`: one (B,T,V)x(B,U+1,V) batched matmul, the B*T*U*V work any joiner must do.
- `torchaudio_fwd_bwd`: `torchaudio.functional.rnnt_loss`, only when torchaudio imports.
"""

import jax
import jax.numpy as jnp


def full_joiner_loss(emissions, predictions, labels, input_lengths, label_lengths, blank=0):
    """(B,) RNN-T costs, same signature and semantics as jax_transducer.transducer_loss."""
    B, T, V = emissions.shape
    logits = emissions[:, :, None, :] + predictions[:, None, :, :]       # (B, T, U+1, V)
    logp = jax.nn.log_softmax(logits, axis=-1)
    blank_lp = logp[..., blank]                                           # (B, T, U+1)
    # Label u is emitted from column u; the last column (u = U) emits nothing: pad with blank.
    padded = jnp.pad(labels.astype(jnp.int32), ((0, 0), (0, 1)), constant_values=blank)
    index = jnp.broadcast_to(padded[:, None, :, None], (B, T, padded.shape[1], 1))
    emit_lp = jnp.take_along_axis(logp, index, axis=-1)[..., 0]          # (B, T, U+1)

    def row(from_above, emit):
        # alpha[t, u] = logsumexp_{k<=u} (from_above[k] + sum_{k<=j<u} emit[j])
        #            = c[u] + logcumsumexp_k (from_above[k] - c[k]),  c[u] = sum_{j<u} emit[j].
        c = jnp.concatenate([jnp.zeros((B, 1), emit.dtype), jnp.cumsum(emit[:, :-1], axis=1)], 1)
        return c + jax.lax.cumlogsumexp(from_above - c, axis=1)

    # Row 0 starts at (0, 0) only; every cell of the first row is then reached by label moves.
    alpha0 = jnp.concatenate(
        [jnp.zeros((B, 1), emit_lp.dtype), jnp.cumsum(emit_lp[:, 0, :-1], axis=1)], 1)

    def step(alpha_prev, t):
        alpha = row(alpha_prev + blank_lp[:, t - 1], emit_lp[:, t])
        return alpha, alpha

    _, rest = jax.lax.scan(step, alpha0, jnp.arange(1, T))
    alphas = jnp.concatenate([alpha0[None], rest], axis=0)                # (T, B, U+1)
    b = jnp.arange(B)
    t_last = input_lengths.astype(jnp.int32) - 1
    u_last = label_lengths.astype(jnp.int32)
    return -(alphas[t_last, b, u_last] + blank_lp[b, t_last, u_last])


def matmul_yardstick(emissions, predictions):
    """The physical yardstick: one batched matmul over V, (B, T, U+1)."""
    return jnp.einsum("btv,buv->btu", emissions, predictions)


def torchaudio_available():
    """Whether torchaudio imports and still has functional.rnnt_loss (newer releases drop APIs)."""
    try:
        import torch  # noqa: F401
        import torchaudio.functional
    except Exception:  # ImportError, or a broken install
        return False
    return hasattr(torchaudio.functional, "rnnt_loss")


def torchaudio_fwd_bwd(device="cpu"):
    """A function (emissions, predictions, labels, input_lengths, label_lengths, blank) of NumPy
    arrays running torchaudio's rnnt_loss forward+backward on logits built in torch; returns the
    costs as NumPy. Inputs are copied to torch once per call of the returned setup function."""
    import torch
    import torchaudio

    dev = torch.device("cuda" if device == "gpu" else "cpu")

    def setup(emissions, predictions, labels, input_lengths, label_lengths, blank=0):
        e = torch.tensor(emissions, device=dev, requires_grad=True)
        p = torch.tensor(predictions, device=dev, requires_grad=True)
        lab = torch.tensor(labels, dtype=torch.int32, device=dev)
        il = torch.tensor(input_lengths, dtype=torch.int32, device=dev)
        ll = torch.tensor(label_lengths, dtype=torch.int32, device=dev)

        def run():
            e.grad = p.grad = None
            logits = e[:, :, None, :] + p[:, None, :, :]
            costs = torchaudio.functional.rnnt_loss(logits, lab, il, ll, blank=blank,
                                                    reduction="none")
            costs.sum().backward()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            return costs.detach().cpu().numpy()

        return run

    return setup
