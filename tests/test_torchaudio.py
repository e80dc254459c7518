"""Costs and gradients against torchaudio's rnnt_loss, an independent implementation, where it is
installed (never a dependency: the module skips otherwise; torchaudio 2.9 dropped rnnt_loss)."""

import jax
import numpy as np
import pytest

import jax_transducer as jt
from util import make_batch

torch = pytest.importorskip("torch")
functional = pytest.importorskip("torchaudio.functional")
if not hasattr(functional, "rnnt_loss"):
    pytest.skip("this torchaudio has no rnnt_loss", allow_module_level=True)


def _torchaudio(E, P, labels, in_len, lab_len, blank):
    e = torch.tensor(E, requires_grad=True)
    p = torch.tensor(P, requires_grad=True)
    costs = functional.rnnt_loss(e[:, :, None, :] + p[:, None, :, :], torch.tensor(labels),
                                 torch.tensor(in_len, dtype=torch.int32),
                                 torch.tensor(lab_len, dtype=torch.int32), blank=blank,
                                 reduction="none")
    costs.sum().backward()
    return costs.detach().numpy(), e.grad.numpy(), p.grad.numpy()


# Variable lengths, an example without labels, blank at either end or inside, V on both sides of
# the CPU kernels' switch to candidate labels (viterbi only) and odd sizes.
@pytest.mark.parametrize("seed,B,T,U,V,blank", [
    (0, 4, 9, 5, 7, 0), (1, 3, 6, 8, 33, 32), (2, 5, 17, 4, 130, 64), (3, 2, 40, 11, 601, 7)])
def test_costs_and_gradients_match_torchaudio(seed, B, T, U, V, blank):
    E, P, labels, in_len, lab_len = make_batch(seed, B=B, T=T, U=U, V=V, blank=blank,
                                               dtype=np.float32, pad=0.0)
    labels = np.where((labels >= 0) & (labels < V), labels, (blank + 1) % V).astype(np.int32)
    want_costs, want_dE, want_dP = _torchaudio(E, P, labels, in_len, lab_len, blank)
    costs, (dE, dP) = jax.value_and_grad(
        lambda e, p: jt.transducer_loss(e, p, labels, in_len, lab_len, blank=blank).sum(),
        argnums=(0, 1))(E, P)
    got_costs = jt.transducer_loss(E, P, labels, in_len, lab_len, blank=blank)
    np.testing.assert_allclose(np.asarray(got_costs), want_costs, rtol=1e-5)
    np.testing.assert_allclose(float(costs), want_costs.sum(), rtol=1e-5)
    for got, want in ((dE, want_dE), (dP, want_dP)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=0,
                                   atol=1e-4 * np.abs(want).max())
