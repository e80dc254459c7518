"""Gradients against the float64 reference, finite differences, and zero gradient in padding."""

import jax
import numpy as np
import pytest
from jax.test_util import check_grads

import jax_transducer as jt
import reference as ref
from util import CASES, make_batch, put, unpadded


def loss_grads(device, E, P, labels, in_len, lab_len, blank):
    f = lambda e, p: jt.transducer_loss(e, p, labels, in_len, lab_len, blank=blank).sum()
    gE, gP = jax.grad(f, argnums=(0, 1))(*put(device, E, P))
    return np.asarray(gE), np.asarray(gP)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-10), (np.float32, 2e-5)])
def test_gradients_match_reference(device, case, dtype, tol):
    E, P, labels, in_len, lab_len = make_batch(dtype=dtype, **case)
    blank = case.get("blank", 0)
    gE, gP = loss_grads(device, E, P, labels, in_len, lab_len, blank)
    assert gE.dtype == dtype and gP.dtype == dtype
    wE, wP = ref.gradients(E.astype(np.float64), P.astype(np.float64), labels, in_len, lab_len,
                           blank)
    np.testing.assert_allclose(gE, wE, rtol=tol, atol=tol)
    np.testing.assert_allclose(gP, wP, rtol=tol, atol=tol)


@pytest.mark.parametrize("case", CASES[:4])
def test_padding_gets_exactly_zero_gradient(device, case):
    E, P, labels, in_len, lab_len = make_batch(pad=np.nan, **case)
    gE, gP = loss_grads(device, E, P, labels, in_len, lab_len, case.get("blank", 0))
    for b in range(E.shape[0]):
        assert (gE[b, in_len[b]:] == 0).all() and (gP[b, lab_len[b] + 1:] == 0).all()
    assert np.isfinite(gE).all() and np.isfinite(gP).all()


@pytest.mark.parametrize("seed,blank", [(30, 0), (31, 2)])
def test_finite_differences(device, seed, blank):
    E, P, labels, in_len, lab_len = unpadded(*make_batch(seed, B=3, T=4, U=3, V=5, blank=blank))
    f = lambda e, p: jt.transducer_loss(e, p, labels, in_len, lab_len, blank=blank,
                                        reduction="sum")
    check_grads(f, tuple(put(device, E, P)), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


def test_cotangent_scales_each_example(device):
    E, P, labels, in_len, lab_len = make_batch(32)
    w = np.array([0.5, -2.0, 3.0, 1.0])
    f = lambda e: (jt.transducer_loss(e, P, labels, in_len, lab_len) * w).sum()
    g = np.asarray(jax.grad(f)(*put(device, E)))
    for b in range(4):
        one = lambda e: jt.transducer_loss(e, P, labels, in_len, lab_len)[b]
        np.testing.assert_allclose(g[b], w[b] * np.asarray(jax.grad(one)(*put(device, E)))[b],
                                   atol=1e-12)


@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[5]])
@pytest.mark.parametrize("fastemit,delay", [(0.01, 0.0), (0.5, 0.0), (0.0, 0.3), (0.2, -0.4)])
def test_fastemit_and_delay_penalty_match_reference(device, case, fastemit, delay):
    E, P, labels, in_len, lab_len = make_batch(**case)
    blank = case.get("blank", 0)
    args = put(device, E, P, labels, in_len, lab_len)
    costs, (gE, gP) = jax.value_and_grad(
        lambda e, p: jt.transducer_loss(e, p, *args[2:], blank=blank, fastemit_lambda=fastemit,
                                        delay_penalty=delay).sum(), argnums=(0, 1))(*args[:2])
    want = ref.costs(E, P, labels, in_len, lab_len, blank, delay_penalty=delay)
    np.testing.assert_allclose(costs, want.sum(), rtol=1e-10)
    wE, wP = ref.gradients(E, P, labels, in_len, lab_len, blank, fastemit_lambda=fastemit,
                           delay_penalty=delay)
    np.testing.assert_allclose(np.asarray(gE), wE, atol=1e-10)
    np.testing.assert_allclose(np.asarray(gP), wP, atol=1e-10)


def test_fastemit_leaves_costs_and_changes_gradients(device):
    E, P, labels, in_len, lab_len = make_batch(33)
    args = put(device, E, P, labels, in_len, lab_len)
    plain = jt.transducer_loss(*args)
    fast = jt.transducer_loss(*args, fastemit_lambda=0.1)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(fast))
    g0 = jax.grad(lambda e: jt.transducer_loss(e, *args[1:]).sum())(args[0])
    g1 = jax.grad(lambda e: jt.transducer_loss(e, *args[1:], fastemit_lambda=0.1).sum())(args[0])
    assert not np.allclose(np.asarray(g0), np.asarray(g1))


def test_float32_stays_accurate_on_long_lattices(device):
    # Costs in the hundreds: float32 roundings repeated over T + U diagonals must not pile up
    # (the CPU kernels accumulate in double).
    rng = np.random.default_rng(34)
    B, T, U, V = 2, 300, 30, 50
    E, P = rng.normal(size=(B, T, V)), rng.normal(size=(B, U + 1, V))
    labels = rng.integers(1, V, size=(B, U)).astype(np.int32)
    lens = np.full(B, T, np.int32), np.full(B, U, np.int32)
    args = put(device, E.astype(np.float32), P.astype(np.float32), labels, *lens)
    costs = jt.transducer_loss(*args)
    np.testing.assert_allclose(np.asarray(costs), ref.costs(E, P, labels, *lens), rtol=1e-6)
    gE, gP = jax.grad(lambda e, p: jt.transducer_loss(e, p, *args[2:]).sum(),
                      argnums=(0, 1))(*args[:2])
    wE, wP = ref.gradients(E, P, labels, *lens)
    assert np.abs(np.asarray(gE) - wE).max() < 2e-4 * np.abs(wE).max()
    assert np.abs(np.asarray(gP) - wP).max() < 2e-4 * np.abs(wP).max()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("impl", ["auto", "xla"])
def test_nan_in_used_rows_leaves_padding_gradient_zero(device, dtype, impl):
    # Found by the fuzzer: a NaN inside example 0's used frames must not reach the padded rows of
    # its predictions (0 * NaN through the gradient matmuls), nor another example.
    E, P, labels, in_len, lab_len = make_batch(31, B=3, T=5, U=3, V=5, dtype=dtype,
                                               lengths=[(4, 2), (3, 0), (5, 3)])
    E[0, in_len[0] - 1, 1] = np.nan  # example 0 also has padded frames and prediction rows
    args = put(device, E, P, labels, in_len, lab_len)
    gE, gP = jax.grad(lambda e, p: jt.transducer_loss(e, p, *args[2:], impl=impl).sum(),
                      argnums=(0, 1))(*args[:2])
    gE, gP = np.asarray(gE), np.asarray(gP)
    for b in range(3):
        assert (gE[b, in_len[b]:] == 0).all() and (gP[b, lab_len[b] + 1:] == 0).all()
    assert np.isnan(gE[0, :in_len[0]]).any()
    assert np.isfinite(gE[1:]).all() and np.isfinite(gP[1:]).all()
