"""The CPU kernels' float math: accuracy of the vectorisable exp / log1p, and log_add's edge cases."""

import numpy as np
import pytest

_cpu = pytest.importorskip("jax_transducer._cpu", reason="an install without the CPU kernels")


def test_exp_relative_error_below_1e6():
    x = np.concatenate([np.linspace(-87, 88, 400001), -np.geomspace(1e-8, 87, 10001)])
    x = x.astype(np.float32)
    got, _ = _cpu.host_math(x)
    want = np.exp(x.astype(np.float64))
    assert np.max(np.abs(got / want - 1)) < 1e-6


def test_log1p_exp_relative_error_below_1e6():
    x = np.concatenate([np.linspace(-87, 0, 400001), -np.geomspace(1e-9, 87, 10001)])
    x = x.astype(np.float32)
    _, got = _cpu.host_math(x)
    want = np.log1p(np.exp(x.astype(np.float64)))
    assert np.max(np.abs(got / want - 1)) < 1e-6


def test_far_below_range_is_tiny_not_wrong():
    _, got = _cpu.host_math(np.array([-88, -200, -1e30, -np.inf], np.float32))
    assert (got >= 0).all() and (got < 2e-38).all()


def test_nan_stays_nan():
    e, _ = _cpu.host_math(np.array([np.nan], np.float32))
    assert np.isnan(e).all()


@pytest.mark.parametrize("a,b,want", [
    (-np.inf, -np.inf, -np.inf),
    (-np.inf, 1.5, 1.5),
    (2.0, -np.inf, 2.0),
    (np.nan, 1.0, np.nan),
    (1.0, np.nan, np.nan),
    (np.nan, -np.inf, np.nan),
    (0.0, 0.0, np.log(2.0)),
    (-3.0, -1000.0, -3.0),
    (np.inf, 1.0, np.inf),
])
def test_log_add_edges(a, b, want):
    got = _cpu.log_add(a, b)
    if np.isnan(want):
        assert np.isnan(got)
    else:
        assert got == pytest.approx(want, rel=1e-6)


def test_log_add_random_pairs():
    rng = np.random.default_rng(70)
    a = rng.uniform(-200, 50, 20000).astype(np.float32)
    b = (a + rng.normal(scale=10, size=a.size)).astype(np.float32)
    got = np.array([_cpu.log_add(x, y) for x, y in zip(a, b)])
    want = np.logaddexp(a.astype(np.float64), b.astype(np.float64))
    assert np.max(np.abs(got - want) / np.maximum(1.0, np.abs(want))) < 1e-6


@pytest.mark.parametrize("V,blank", [(1, 0), (2, 0), (2, 1), (17, 0), (17, 16), (40, 7), (33, 32)])
def test_best_labels_kernel(V, blank):
    import jax
    from jax_transducer import _ffi
    rng = np.random.default_rng(71 + V)
    # Small integers make ties common: the first (lowest) index must win.
    E = rng.integers(-3, 3, size=(2, 5, V)).astype(np.float32)
    P = rng.integers(-3, 3, size=(2, 4, V)).astype(np.float32)
    best, label = jax.jit(lambda e, p: _ffi.best_labels(e, p, blank))(E, P)
    scores = E[:, :, None, :] + P[:, None, :, :]
    scores[..., blank] = -np.inf
    if V == 1:
        assert (np.asarray(label) == 0).all() and np.isneginf(np.asarray(best)).all()
        return
    np.testing.assert_array_equal(np.asarray(label), scores.argmax(-1))
    np.testing.assert_array_equal(np.asarray(best), scores.max(-1))


def test_viterbi_uses_the_cpu_kernel():
    import jax
    import jax_transducer as jt
    E, P = np.zeros((1, 3, 5), np.float32), np.zeros((1, 3, 5), np.float32)
    hlo = jax.jit(jt.viterbi).lower(E, P, np.array([3]), np.array([2])).as_text()
    assert "jax_transducer_best_labels" in hlo
