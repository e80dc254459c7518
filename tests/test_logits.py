"""transducer_loss_from_logits: against a float64 reference on general logits, against
transducer_loss on additive logits (costs and chain-ruled gradients), bad input, memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_transducer as jt
import reference as ref
from util import CASES, make_batch, put


def random_logits(seed, B=4, T=6, U=4, V=7, blank=0, pad=np.nan, dtype=np.float64):
    """General (non-additive) logits (B, T, U+1, V) with junk padding, and a batch like
    make_batch's (example 0 full, example 1 without labels)."""
    _, _, labels, in_len, lab_len = make_batch(seed, B=B, T=T, U=U, V=V, blank=blank)
    rng = np.random.default_rng(seed + 1000)
    logits = (rng.normal(size=(B, T, U + 1, V)) * 2).astype(dtype)
    for b in range(B):
        logits[b, in_len[b]:] = pad
        logits[b, :, lab_len[b] + 1:] = pad
    return logits, labels, in_len, lab_len


def log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def reference_logits(logits, labels, in_len, lab_len, blank=0):
    """Float64 costs (B,) and gradient of their sum w.r.t. the logits, from the reference's
    alpha and beta recursions on log_softmax(logits) (zero outside each lattice)."""
    costs = np.zeros(len(in_len))
    grad = np.zeros(logits.shape)
    for b in range(len(in_len)):
        T_b, U_b = int(in_len[b]), int(lab_len[b])
        lp = log_softmax(logits[b, :T_b, :U_b + 1])
        y = np.asarray(labels[b, :U_b], np.int64)
        alpha, beta = ref._alpha(lp, y, blank), ref._beta(lp, y, blank)
        log_z = beta[0, 0]
        costs[b] = -log_z
        softmax = np.exp(lp)
        for t in range(T_b):
            for u in range(U_b + 1):
                g = np.zeros(lp.shape[-1])
                after_blank = beta[t + 1, u] if t < T_b - 1 else (0.0 if u == U_b else -np.inf)
                moves = [(blank, after_blank)]
                if u < U_b:
                    moves.append((y[u], beta[t, u + 1]))
                for v, after in moves:
                    flow = np.exp(alpha[t, u] + lp[t, u, v] + after - log_z)
                    g -= flow * (np.eye(lp.shape[-1])[v] - softmax[t, u])
                grad[b, t, u] = g
    return costs, grad


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_matches_reference_on_general_logits(device, case, dtype):
    case = dict(case)
    logits, labels, in_len, lab_len = random_logits(case.pop("seed"), dtype=dtype, **case)
    blank = case.get("blank", 0)
    args = put(device, logits, labels, in_len, lab_len)
    f = lambda x: jt.transducer_loss_from_logits(x, *args[1:], blank=blank)
    costs, vjp = jax.vjp(f, args[0])
    weights = np.linspace(0.5, 1.5, len(in_len))  # a non-uniform cotangent
    (grad,) = vjp(jnp.asarray(weights, costs.dtype))
    want_costs, want_grad = reference_logits(logits, labels, in_len, lab_len, blank)
    want_grad *= weights[:, None, None, None]
    tol = 1e-10 if dtype == np.float64 else 2e-5
    assert costs.dtype == dtype and grad.dtype == dtype
    np.testing.assert_allclose(np.asarray(costs), want_costs, rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=0, atol=tol)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("options", [{}, dict(fastemit_lambda=0.5, delay_penalty=0.3)])
def test_additive_logits_equal_transducer_loss(device, case, options):
    E, P, labels, in_len, lab_len = make_batch(**case)
    blank = case.get("blank", 0)
    E, P, labels, in_len, lab_len = put(device, E, P, labels, in_len, lab_len)

    def via_logits(e, p):
        logits = e[:, :, None, :] + p[:, None, :, :]
        return jt.transducer_loss_from_logits(logits, labels, in_len, lab_len, blank=blank,
                                              **options)

    def direct(e, p):
        return jt.transducer_loss(e, p, labels, in_len, lab_len, blank=blank, **options)

    weights = jnp.linspace(0.5, 1.5, E.shape[0])
    got, got_vjp = jax.vjp(via_logits, E, P)
    want, want_vjp = jax.vjp(direct, E, P)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-12)
    for g, w in zip(got_vjp(weights), want_vjp(weights)):
        assert np.isfinite(np.asarray(g)).all()  # NaN padding in E and P gets zero gradient
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-10, atol=1e-12)


def test_reductions_and_jit_vmap(device):
    logits, labels, in_len, lab_len = random_logits(5)
    args = put(device, logits, labels, in_len, lab_len)
    costs = np.asarray(jt.transducer_loss_from_logits(*args))
    for reduction, want in (("sum", costs.sum()), ("mean", costs.mean())):
        got = jax.jit(lambda *a: jt.transducer_loss_from_logits(*a, reduction=reduction))(*args)
        np.testing.assert_allclose(float(got), want, rtol=1e-12)
    stacked = [np.stack([x, x[::-1]]) for x in (logits, labels, in_len, lab_len)]
    got = jax.jit(jax.vmap(jt.transducer_loss_from_logits))(*put(device, *stacked))
    np.testing.assert_allclose(np.asarray(got), np.stack([costs, costs[::-1]]), rtol=1e-12)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_computes_in_float32(device, dtype):
    import ml_dtypes  # noqa: F401  (gives numpy the bfloat16 dtype)
    logits, labels, in_len, lab_len = random_logits(6, pad=0.0)
    half = logits.astype(dtype)
    f = lambda x: jt.transducer_loss_from_logits(x, *put(device, labels, in_len, lab_len)).sum()
    cost, grad = jax.value_and_grad(f)(*put(device, half))
    assert cost.dtype == np.float32 and grad.dtype == half.dtype
    want_cost, want_grad = jax.value_and_grad(f)(*put(device, half.astype(np.float32)))
    np.testing.assert_allclose(float(cost), float(want_cost), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad, np.float32), np.asarray(want_grad), atol=1e-2)


def test_bad_input():
    logits, labels, in_len, lab_len = random_logits(7, pad=0.0)
    f = jt.transducer_loss_from_logits
    with pytest.raises(ValueError, match="logits: expected rank 4"):
        f(logits[0], labels, in_len, lab_len)
    with pytest.raises(TypeError, match="logits: expected float32"):
        f(logits.astype(np.int32), labels, in_len, lab_len)
    with pytest.raises(ValueError, match="labels: expected shape"):
        f(logits, labels[:, :-1], in_len, lab_len)
    with pytest.raises(ValueError, match="blank"):
        f(logits, labels, in_len, lab_len, blank=logits.shape[-1])
    with pytest.raises(ValueError, match="reduction"):
        f(logits, labels, in_len, lab_len, reduction="max")
    bad_len = in_len.copy()
    bad_len[2] = logits.shape[1] + 1
    with pytest.raises(ValueError, match="input_lengths"):
        f(logits, labels, bad_len, lab_len)
    bad_labels = labels.copy()
    bad_labels[0, 0] = logits.shape[-1]
    with pytest.raises(ValueError, match="labels: expected values"):
        f(logits, bad_labels, in_len, lab_len)

    # Inside jit: NaN cost and zero gradient for that example only.
    for args in ((logits, labels, bad_len, lab_len), (logits, bad_labels, in_len, lab_len)):
        bad = [b for b in range(4) if (args[2][b] != in_len[b]) or (args[1][b] != labels[b]).any()]
        costs, vjp = jax.vjp(lambda x: jax.jit(f)(x, *args[1:]), logits)
        (grad,) = vjp(jnp.ones_like(costs))
        good = [b for b in range(4) if b not in bad]
        assert np.isnan(np.asarray(costs)[bad]).all()
        assert np.isfinite(np.asarray(costs)[good]).all()
        assert (np.asarray(grad)[bad] == 0).all() and np.isfinite(np.asarray(grad)).all()


def test_padding_gets_zero_gradient_whatever_it_holds(device):
    for pad in (np.nan, np.inf, -np.inf):
        logits, labels, in_len, lab_len = random_logits(8, pad=pad)
        f = lambda x: jt.transducer_loss_from_logits(x, *put(device, labels, in_len, lab_len))
        costs, vjp = jax.vjp(f, *put(device, logits))
        (grad,) = vjp(jnp.ones_like(costs))
        want_costs, want_grad = reference_logits(logits, labels, in_len, lab_len)
        np.testing.assert_allclose(np.asarray(costs), want_costs, rtol=1e-10)
        np.testing.assert_allclose(np.asarray(grad), want_grad, atol=1e-10)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_no_copy_of_the_logits(dtype):
    # Loss + gradient of given logits: the gradient (an output) is the only (B, T, U+1, V)
    # buffer; no widened or log-softmaxed copy is stored.
    B, T, U, V = 2, 64, 16, 256
    x = jax.ShapeDtypeStruct((B, T, U + 1, V), dtype)
    labels = jnp.ones((B, U), jnp.int32)
    lens = (jnp.full((B,), T, jnp.int32), jnp.full((B,), U, jnp.int32))
    step = jax.jit(jax.value_and_grad(
        lambda z: jt.transducer_loss_from_logits(z, labels, *lens, reduction="sum")))
    size = B * T * (U + 1) * V * jnp.dtype(dtype).itemsize
    assert step.lower(x).compile().memory_analysis().temp_size_in_bytes < 0.1 * size

    # With an additive joiner inside the same jit (float32): one (B, T, U+1, V) buffer in all.
    e, p = jax.ShapeDtypeStruct((B, T, V), jnp.float32), jax.ShapeDtypeStruct((B, U + 1, V),
                                                                             jnp.float32)
    step = jax.jit(jax.grad(lambda e, p: jt.transducer_loss_from_logits(
        e[:, :, None] + p[:, None], labels, *lens, reduction="sum"), argnums=(0, 1)))
    temp = step.lower(e, p).compile().memory_analysis().temp_size_in_bytes
    assert temp < 1.3 * B * T * (U + 1) * V * 4
