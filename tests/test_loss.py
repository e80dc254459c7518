"""Costs against the independent float64 reference and brute-force path sums."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_transducer as jt
import reference as ref
from util import CASES, make_batch, put


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-10), (np.float32, 2e-5)])
def test_costs_match_reference(device, case, dtype, rtol):
    E, P, labels, in_len, lab_len = make_batch(dtype=dtype, **case)
    blank = case.get("blank", 0)
    got = jt.transducer_loss(*put(device, E, P, labels, in_len, lab_len), blank=blank)
    assert got.dtype == dtype and got.shape == (E.shape[0],)
    want = ref.costs(E.astype(np.float64), P.astype(np.float64), labels, in_len, lab_len, blank)
    np.testing.assert_allclose(np.asarray(got), want, rtol=rtol)


@pytest.mark.parametrize("seed,blank", [(10, 0), (11, 2), (12, 1)])
def test_costs_match_brute_force(device, seed, blank):
    E, P, labels, in_len, lab_len = make_batch(seed, B=3, T=4, U=3, V=4, blank=blank)
    got = jt.transducer_loss(*put(device, E, P, labels, in_len, lab_len), blank=blank)
    want = ref.brute_force_costs(E, P, labels, in_len, lab_len, blank)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-10)


def test_uniform_scores_give_closed_form(device):
    # Every path has probability V^-(T+U); there are C(T-1+U, U) of them.
    from math import comb, log
    B, T, U, V = 1, 4, 3, 5
    E, P = np.zeros((B, T, V)), np.zeros((B, U + 1, V))
    got = jt.transducer_loss(*put(device, E, P, np.ones((B, U), np.int32), [T], [U]))
    np.testing.assert_allclose(np.asarray(got), [(T + U) * log(V) - log(comb(T - 1 + U, U))])


def test_reductions(device):
    E, P, labels, in_len, lab_len = make_batch(20)
    args = put(device, E, P, labels, in_len, lab_len)
    costs = np.asarray(jt.transducer_loss(*args))
    np.testing.assert_allclose(jt.transducer_loss(*args, reduction="sum"), costs.sum())
    np.testing.assert_allclose(jt.transducer_loss(*args, reduction="mean"), costs.mean())
    assert jt.transducer_loss(*args, reduction="sum").shape == ()


def test_padding_values_never_matter(device):
    E, P, labels, in_len, lab_len = make_batch(21, pad=np.nan)
    E2, P2, labels2, *_ = make_batch(21, pad=np.inf)
    labels2 = np.where(labels2 == labels, labels2, 2)
    a = jt.transducer_loss(*put(device, E, P, labels, in_len, lab_len))
    b = jt.transducer_loss(*put(device, E2, P2, labels2, in_len, lab_len))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.isfinite(np.asarray(a)).all()


def test_nan_in_used_region_stays_in_its_example(device):
    E, P, labels, in_len, lab_len = make_batch(22)
    E[2, 0, 1] = np.nan
    costs, (gE, gP) = jax.value_and_grad(
        lambda e, p: jt.transducer_loss(e, p, labels, in_len, lab_len).sum(), argnums=(0, 1))(
            *put(device, E, P))
    costs = jt.transducer_loss(*put(device, E, P, labels, in_len, lab_len))
    finite = np.arange(4) != 2
    assert np.isnan(np.asarray(costs)[2]) and np.isfinite(np.asarray(costs)[finite]).all()
    assert np.isfinite(np.asarray(gE)[finite]).all() and np.isfinite(np.asarray(gP)[finite]).all()


def test_transducer_loss_class_ports_the_original_api(device):
    E, P, labels, in_len, lab_len = make_batch(23, blank=2)
    args = put(device, E, P, labels, in_len, lab_len)
    loss = jt.TransducerLoss(blank=2, reduction="sum")
    np.testing.assert_allclose(loss(*args), jt.transducer_loss(*args, blank=2).sum())
    np.testing.assert_allclose(loss.apply(*args), loss(*args))
    np.testing.assert_array_equal(loss.viterbi(args[0], args[1], in_len, lab_len),
                                  jt.viterbi(args[0], args[1], in_len, lab_len, blank=2))


def test_build_info():
    info = jt.build_info()
    assert info["cpu"] is True and isinstance(info["cuda"], bool)
    assert info["version"] == jt.__version__


def test_memory_does_not_grow_with_vocabulary():
    # Compiled temp memory of loss+gradient: O(B*T*U + B*(T+U)*V) plus the exact normaliser's
    # bounded chunk (2^20 logits), far below the B*T*(U+1)*V joiner.
    B, T, U = 2, 256, 32
    temps = []
    for V in (256, 2048):
        E = jnp.zeros((B, T, V), jnp.float32)
        P = jnp.zeros((B, U + 1, V), jnp.float32)
        labels = jnp.ones((B, U), jnp.int32)
        lens = (jnp.full((B,), T, jnp.int32), jnp.full((B,), U, jnp.int32))
        step = jax.jit(jax.grad(lambda e, p: jt.transducer_loss(e, p, labels, *lens).sum(),
                                argnums=(0, 1)))
        temps.append(step.lower(E, P).compile().memory_analysis().temp_size_in_bytes)
        joiner = B * T * (U + 1) * V * 4
        assert temps[-1] < 0.3 * joiner if V == 2048 else temps[-1] < 2 * joiner
    # 8x the vocabulary: the (T+U)*V part grows, the T*U part and the chunk do not.
    assert temps[1] < 8 * temps[0]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_inputs_compute_in_float32(device, dtype):
    import ml_dtypes  # noqa: F401  (jax's dependency; gives numpy the bfloat16 dtype)
    E, P, labels, in_len, lab_len = make_batch(24, pad=0.0)
    E16, P16 = E.astype(dtype), P.astype(dtype)
    args = put(device, E16, P16, labels, in_len, lab_len)
    costs = jt.transducer_loss(*args)
    assert costs.dtype == np.float32
    # The reference on exactly the rounded inputs: only float32 arithmetic separates them.
    E64, P64 = E16.astype(np.float64), P16.astype(np.float64)
    np.testing.assert_allclose(np.asarray(costs), ref.costs(E64, P64, labels, in_len, lab_len),
                               rtol=2e-5)
    gE, gP = jax.grad(lambda e, p: jt.transducer_loss(e, p, *args[2:]).sum(),
                      argnums=(0, 1))(*args[:2])
    assert gE.dtype == E16.dtype and gP.dtype == P16.dtype
    wE, _ = ref.gradients(E64, P64, labels, in_len, lab_len)
    np.testing.assert_allclose(np.asarray(gE, np.float64), wE, atol=2e-2, rtol=2e-2)
    np.testing.assert_array_equal(jt.viterbi(*args[:2], in_len, lab_len),
                                  ref.viterbi(E64, P64, in_len, lab_len))


@pytest.mark.parametrize("dtype,eps", [(np.float32, 1e-7), (np.float64, 1e-15)])
@pytest.mark.parametrize("scale", [1e3, 1e4])
def test_extreme_logits_are_exact(device, dtype, eps, scale):
    # Rows peaked far apart underflow the shifted exponentials; those cells are recomputed exactly.
    # What remains is the inputs' own precision: logits of size `scale` carry eps * scale each,
    # and a path adds up T + U of them.
    tol = 30 * eps * scale
    E, P, labels, in_len, lab_len = make_batch(25, pad=np.nan, scale=scale, dtype=dtype)
    args = put(device, E, P, labels, in_len, lab_len)
    costs, (gE, gP) = jax.value_and_grad(
        lambda e, p: jt.transducer_loss(e, p, *args[2:]).sum(), argnums=(0, 1))(*args[:2])
    E64, P64 = E.astype(np.float64), P.astype(np.float64)
    want = ref.costs(E64, P64, labels, in_len, lab_len)
    np.testing.assert_allclose(float(costs), want.sum(), rtol=tol)
    wE, wP = ref.gradients(E64, P64, labels, in_len, lab_len)
    np.testing.assert_allclose(np.asarray(gE), wE, rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(gP), wP, rtol=tol, atol=tol)


def test_original_transducer_issue_13(device):
    # emissions [0, -1000], predictions [-1000, 0]: every logit is -1000, so every move has
    # probability 1/2 and each of the C(T-1+U, U) paths 2^-(T+U).
    from math import comb, log
    T, U = 3, 2
    E = np.tile(np.array([0.0, -1000.0], np.float32), (1, T, 1))
    P = np.tile(np.array([-1000.0, 0.0], np.float32), (1, U + 1, 1))
    args = put(device, E, P, np.ones((1, U), np.int32), np.array([T]), np.array([U]))
    costs = jt.transducer_loss(*args)
    # float32 logits of size 1000 carry about 6e-5 each; five moves.
    np.testing.assert_allclose(np.asarray(costs), [(T + U) * log(2) - log(comb(T - 1 + U, U))],
                               atol=5 * 1000 * 6e-8)
    g = jax.grad(lambda e, p: jt.transducer_loss(e, p, *args[2:]).sum(), argnums=(0, 1))(*args[:2])
    assert all(np.isfinite(np.asarray(x)).all() for x in g)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])  # the fused CPU kernels, and XLA's
def test_empty_batch(device, dtype):
    E, P = np.zeros((0, 4, 5), dtype), np.zeros((0, 3, 5), dtype)
    args = put(device, E, P, np.zeros((0, 2), np.int32), np.zeros(0, np.int32),
               np.zeros(0, np.int32))
    assert jt.transducer_loss(*args).shape == (0,)
    g = jax.grad(lambda e: jt.transducer_loss(e, *args[1:]).sum())(args[0])
    assert g.shape == E.shape
    assert jt.viterbi(*args[:2], *args[3:]).shape == (0, 2)


@pytest.mark.parametrize("chunk_frames", [1, 2, 3])
@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-9), (np.float32, 30 * 1e-7 * 1e3)])
def test_exact_pass_in_chunks(device, monkeypatch, chunk_frames, dtype, tol):
    # The exact pass visits frames in chunks (the last one shifted back to end at T); with chunks
    # of 1, 2 and 3 frames over T = 7, every frame must be visited once and accumulated once.
    from jax_transducer import _normalizer
    B, T, U, V, blank = 3, 7, 3, 5, 2
    monkeypatch.setattr(_normalizer, "_CHUNK", chunk_frames * B * (U + 1) * V)
    E, P, labels, in_len, lab_len = make_batch(26 + chunk_frames, B=B, T=T, U=U, V=V,
                                               blank=blank, scale=1e3, dtype=dtype)
    args = put(device, E, P, labels, in_len, lab_len)
    E, P = E.astype(np.float64), P.astype(np.float64)
    loss = jax.jit(lambda e, p: jt.transducer_loss(e, p, *args[2:], blank=blank).sum())
    costs, (gE, gP) = jax.value_and_grad(loss, argnums=(0, 1))(*args[:2])
    np.testing.assert_allclose(float(costs), ref.costs(E, P, labels, in_len, lab_len, blank).sum(),
                               rtol=tol)
    wE, wP = ref.gradients(E, P, labels, in_len, lab_len, blank)
    np.testing.assert_allclose(np.asarray(gE), wE, atol=tol)
    np.testing.assert_allclose(np.asarray(gP), wP, atol=tol)
    got = jax.jit(lambda e, p: jt.viterbi(e, p, in_len, lab_len, blank=blank))(*args[:2])
    np.testing.assert_array_equal(np.asarray(got), ref.viterbi(E, P, in_len, lab_len, blank))
