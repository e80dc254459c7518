"""The CPU kernels' float math: accuracy of the vectorisable exp / log1p, and log_add's edge cases."""

import numpy as np
import pytest

_cpu = pytest.importorskip("jax_transducer._cpu", reason="an install without the CPU kernels")


def test_exp_relative_error_below_1e6():
    x = np.concatenate([np.linspace(-87, 88, 400001), -np.geomspace(1e-8, 87, 10001)])
    x = x.astype(np.float32)
    got, _, _ = _cpu.host_math(x)
    want = np.exp(x.astype(np.float64))
    assert np.max(np.abs(got / want - 1)) < 1e-6


def test_log1p_exp_relative_error_below_1e6():
    x = np.concatenate([np.linspace(-87, 0, 400001), -np.geomspace(1e-9, 87, 10001)])
    x = x.astype(np.float32)
    _, got, _ = _cpu.host_math(x)
    want = np.log1p(np.exp(x.astype(np.float64)))
    assert np.max(np.abs(got / want - 1)) < 1e-6


def test_far_below_range_is_tiny_not_wrong():
    _, got, _ = _cpu.host_math(np.array([-88, -200, -1e30, -np.inf], np.float32))
    assert (got >= 0).all() and (got < 2e-38).all()


@pytest.mark.parametrize("build", [0, 1])  # the clone the kernels run, the baseline x86-64 build
def test_normaliser_exp(build):
    # exp(E - row max) of the normaliser's passes: vectors of 8 lanes, then a scalar tail (1003
    # entries: both). Relative error below 1e-6 down to -87, 0 below -87.3 (where the products it
    # feeds would not be normal), exp(-87) between; NaN stays NaN.
    x = np.concatenate([np.linspace(-87, 0, 400001), -np.geomspace(1e-8, 87, 10001),
                        [-87.2, -87.4, -88, -1e30, -np.inf, np.nan, 0.0, -0.0, 1e-7]])
    x = x.astype(np.float32)
    got = _cpu.norm_exp(x)[build]
    want = np.exp(x.astype(np.float64))
    ok = x >= -87
    assert np.max(np.abs(got[ok] / want[ok] - 1)) < 1e-6
    assert (got[x == np.float32(-87.2)] == got[np.flatnonzero(x == -87)[0]]).all()
    assert (got[(x < -87.3) | (x == -np.inf)] == 0).all()
    assert np.isnan(got[np.isnan(x)]).all()
    tail = _cpu.norm_exp(x[:1003])[build]  # 125 vectors and a 3-entry tail
    np.testing.assert_array_equal(tail, got[:1003])


def test_log_relative_error_below_1e6():
    # Positive normal floats, densely around 1 (where log is small) and across the whole range.
    x = np.concatenate([np.linspace(0.5, 2, 400001), np.geomspace(1.2e-38, 3.4e38, 400001),
                        1 + np.geomspace(1e-7, 1e-2, 10001), 1 - np.geomspace(6e-8, 1e-2, 10001)])
    x = x.astype(np.float32)
    _, _, got = _cpu.host_math(x)
    want = np.log(x.astype(np.float64))
    assert np.max(np.abs(got - want) / np.maximum(np.abs(want), 1e-30)) < 1e-6


def test_log_edges():
    _, _, got = _cpu.host_math(np.array([0, -0.0, -1, np.nan, 1], np.float32))
    assert got[0] == got[1] == -np.inf and np.isnan(got[2:4]).all() and got[4] == 0


def test_nan_stays_nan():
    e, _, _ = _cpu.host_math(np.array([np.nan], np.float32))
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


def _norm_case(seed, B, T, U1, V):
    rng = np.random.default_rng(seed)
    E = rng.normal(scale=3, size=(B, T, V)).astype(np.float32)
    P = rng.normal(scale=3, size=(B, U1, V)).astype(np.float32)
    e_rows = rng.integers(0, T + 1, size=(B, 1)).astype(np.int32)
    p_rows = rng.integers(0, U1 + 1, size=(B, 1)).astype(np.int32)
    e_rows[0], p_rows[0] = T, U1
    for b in range(B):  # rows past the counts are never read
        E[b, e_rows[b, 0]:] = np.nan
        P[b, p_rows[b, 0]:] = np.inf
    return E, P, e_rows, p_rows


def _used(E, P, e_rows, p_rows):
    T, U1 = E.shape[1], P.shape[1]
    e_used = np.arange(T)[None, :] < e_rows
    p_used = np.arange(U1)[None, :] < p_rows
    return e_used, p_used


# V = 1, 2, odd and > 16 (vector tails), blank at both ends; B*chunks < threads and not.
NORM_SHAPES = [(2, 5, 4, 1, 0), (3, 7, 3, 2, 1), (2, 9, 5, 17, 16), (1, 13, 6, 40, 7),
               (4, 3, 2, 33, 0)]


def _moves_reference(E, P, e_rows, p_rows, blank, labels=None):
    """float64: log_norm and the blank and label move log-probabilities of the used cells (0
    elsewhere); the label move takes labels[u], or without labels the best non-blank label."""
    e_used, p_used = _used(E, P, e_rows, p_rows)
    cells = e_used[:, :, None] & p_used[:, None, :]
    logits = np.where(cells[..., None], E[:, :, None, :].astype(np.float64) + P[:, None], 0)
    top = logits.max(-1, keepdims=True)
    log_norm = (top + np.log(np.exp(logits - top).sum(-1, keepdims=True)))[..., 0]
    if labels is None:
        label = logits.copy()
        label[..., blank] = -np.inf
        label = label.max(-1)
    else:
        index = np.broadcast_to(labels[:, None, :, None], logits.shape[:3] + (1,))
        label = np.take_along_axis(logits, index, -1)[..., 0]
    return (np.where(cells, log_norm, 0), np.where(cells, logits[..., blank] - log_norm, 0),
            np.where(cells, label - log_norm, 0))


@pytest.mark.parametrize("B,T,U1,V,blank", NORM_SHAPES)
def test_norm_forward_kernel(B, T, U1, V, blank):
    import jax
    from jax_transducer import _ffi
    E, P, e_rows, p_rows = _norm_case(B * 100 + V, B, T, U1, V)
    labels = np.random.default_rng(V).integers(0, V, size=(B, U1)).astype(np.int32)
    blank_lp, emit_lp, log_norm, sums, max_e, max_p = jax.jit(
        lambda *a: _ffi.norm_forward(*a, blank))(E, P, e_rows, p_rows, labels)
    e_used, p_used = _used(E, P, e_rows, p_rows)
    E64, P64 = np.where(e_used[..., None], E, 0.0), np.where(p_used[..., None], P, 0.0)
    want_me, want_mp = E64.max(-1) * e_used, P64.max(-1) * p_used
    np.testing.assert_array_equal(np.asarray(max_e), want_me.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(max_p), want_mp.astype(np.float32))
    a = np.exp(E64 - want_me[..., None]) * e_used[..., None]
    p = np.exp(P64 - want_mp[..., None]) * p_used[..., None]
    prod = a[:, :, None, :] * p[:, None, :, :]
    np.testing.assert_allclose(np.asarray(sums), prod.sum(-1), rtol=2e-6, atol=1e-30)
    want = _moves_reference(E, P, e_rows, p_rows, blank, labels)
    for g, w in zip((log_norm, blank_lp, emit_lp), want):
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("B,T,U1,V,blank", NORM_SHAPES + [(2, 40, 3, 5, 2), (3, 2, 21, 9, 4)])
def test_norm_viterbi_kernel(B, T, U1, V, blank):
    import jax
    from jax_transducer import _ffi
    E, P, e_rows, p_rows = _norm_case(B * 300 + V, B, T, U1, V)
    got = jax.jit(lambda *a: _ffi.norm_viterbi(*a, blank))(E, P, e_rows, p_rows)
    want = _moves_reference(E, P, e_rows, p_rows, blank)[1:]
    for g, w in zip(got, want):  # V = 1: no label but the blank, best_lp = -inf
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5, atol=1e-5)


def _rows_of_kind(kind, rng, B, T, U1, V):
    E = rng.normal(size=(B, T, V))
    P = rng.normal(size=(B, U1, V))
    if kind == "anti":  # the best label is high in neither row: the candidates never settle it
        s = 4 * rng.normal(size=(B, 1, V))
        E, P = E + s, P - s
    elif kind == "ties":  # integer scores, a quarter of each P row at its maximum
        E = np.round(2 * E)
        P = np.round(2 * P)
        P[:, :, ::4] = P.max(-1, keepdims=True)
    elif kind == "peaky":  # one label far above the rest per row, as in trained models
        E[np.arange(B)[:, None], np.arange(T)[None], rng.integers(0, V, size=(B, T))] += 15
        P[np.arange(B)[:, None], np.arange(U1)[None], rng.integers(0, V, size=(B, U1))] += 15
    elif kind == "masked":  # half the labels at -inf; some rows all -inf but for one label
        E[:, :, 1::2] = -np.inf
        P[:, 1::3, 2:] = -np.inf
    elif kind == "offset":  # large scores: the thresholds' statistics must not lose digits
        E, P = E + 3e3, P - 2e3
    return E.astype(np.float32), P.astype(np.float32)


# V from 128 on takes candidate labels (BestLabels), below it the dense max; U1 over one 64-column
# chunk, T over one 24-frame block, blank at either end or inside.
# B = 1: the example is split into frame chunks (one per thread), which start past frame 0.
@pytest.mark.parametrize("kind", ["gaussian", "anti", "ties", "peaky", "masked", "offset"])
@pytest.mark.parametrize("V,blank", [(1001, 0), (600, 599), (129, 64), (127, 3)])
@pytest.mark.parametrize("B", [1, 2])
def test_norm_viterbi_best_label_whatever_the_rows_look_like(kind, V, blank, B):
    from jax_transducer import _ffi
    rng = np.random.default_rng(V)
    T, U1 = 37, 70
    E, P = _rows_of_kind(kind, rng, B, T, U1, V)
    e_rows = np.array([[T], [T - 5]][:B], np.int32)
    p_rows = np.array([[U1], [U1 - 9]][:B], np.int32)
    got = _ffi.norm_viterbi(E, P, e_rows, p_rows, blank)[1]
    want = _moves_reference(E, P, e_rows, p_rows, blank)[2]
    scale = np.abs(np.where(np.isfinite(E), E, 0)).max() + np.abs(np.where(np.isfinite(P), P, 0)).max()
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6 * scale + 1e-5)


def _best_labels_reference(E, P, frames, blank):
    """NumPy: jnp.argmax's choice (first maximum, first NaN if any) of E[t] + P[u], blank masked."""
    B, U = frames.shape
    out = np.full((B, U), blank, np.int32)
    for b in range(B):
        for u in range(U):
            t = frames[b, u]
            if 0 <= t < E.shape[1]:
                s = E[b, t] + P[b, u]
                s[blank] = -np.inf
                out[b, u] = np.flatnonzero(np.isnan(s))[0] if np.isnan(s).any() else np.argmax(s)
    return out


@pytest.mark.parametrize("V,blank", [(1, 0), (2, 1), (8, 3), (17, 0), (40, 39), (67, 66),
                                     (1001, 500)])
def test_best_labels_kernel(V, blank):
    import jax
    from jax_transducer import _ffi, _normalizer
    rng = np.random.default_rng(V)
    B, T, U = 3, 6, 5
    E = np.round(rng.normal(size=(B, T, V)), 1).astype(np.float32)  # rounded: ties happen
    P = np.round(rng.normal(size=(B, U + 1, V)), 1).astype(np.float32)
    E[0, 2, V // 3] = np.nan  # a NaN wins wherever it is
    E[0, 4, -1] = np.nan  # in the last lane or the scalar tail (masked where it is the blank)
    E[1, 3] = -np.inf  # every label at -inf: the first index
    P[2, 1, :] = P[2, 1, ::-1]
    frames = rng.integers(0, T, size=(B, U)).astype(np.int32)
    frames[0, :2] = 2
    frames[0, 2] = 4
    frames[1, 0] = 3
    frames[2, 1:3] = [-1, T]  # no label move, and a frame outside [0, T): the blank
    frames[2, 4] = -(2**31)
    want = _best_labels_reference(E, P, frames, blank)
    got = jax.jit(lambda *a: _ffi.best_labels(*a, blank))(E, P, frames)
    np.testing.assert_array_equal(np.asarray(got), want)
    xla = _normalizer.best_labels(E, P, np.where(frames < T, frames, -1), blank, impl="xla")
    np.testing.assert_array_equal(np.asarray(xla), want)


def test_norm_viterbi_kernel_recomputes_flushed_cells():
    # Example 0: emissions and predictions peak far apart, every product of shifted exponentials
    # underflows (S = 0). Example 1: the best label's product underflows (M below sqrt(tiny)),
    # S does not. Example 2 mixes ordinary cells with such ones in the same rows.
    from jax_transducer import _ffi
    rng = np.random.default_rng(12)
    T, U1, V = 5, 4, 7
    E = rng.normal(size=(3, T, V)).astype(np.float32)
    P = rng.normal(size=(3, U1, V)).astype(np.float32)
    E[0, :, :3], P[0, :, 3:] = -1000, -1000
    E[1, :, 1:] -= 300
    P[1, :, 1:] -= 300
    E[2, ::2, 1:] -= 400
    P[2, 1::2, 1:] -= 400
    e_rows, p_rows = np.array([[T], [T], [T - 1]], np.int32), np.array([[U1], [U1 - 1], [U1]], np.int32)
    got = _ffi.norm_viterbi(E, P, e_rows, p_rows, 0)
    want = _moves_reference(E, P, e_rows, p_rows, 0)[1:]
    for g, w in zip(got, want):
        assert np.isfinite(np.asarray(g)).all()
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("B,T,U1,V,blank", NORM_SHAPES)
def test_norm_backward_kernel(B, T, U1, V, blank):
    import jax
    from jax_transducer import _ffi
    E, P, e_rows, p_rows = _norm_case(B * 200 + V, B, T, U1, V)
    rng = np.random.default_rng(V)
    e_used, p_used = _used(E, P, e_rows, p_rows)
    cells = e_used[:, :, None] & p_used[:, None, :]
    w, g_blank, g_emit = (np.where(cells, rng.normal(size=(B, T, U1)), 0).astype(np.float32)
                          for _ in range(3))
    # About a third of the cells take the exact path: W = 0 there, g_exact carries their weight.
    exact = cells & (rng.random((B, T, U1)) < 0.3)
    g_exact = np.where(exact, w, 0).astype(np.float32)
    w = np.where(exact, 0, w).astype(np.float32)
    labels = rng.integers(0, V, size=(B, U1)).astype(np.int32)
    labels[0, -1] = V + 3  # out of range: ignored, never written
    max_e = _ffi.norm_forward(E, P, e_rows, p_rows, labels, blank)[4]
    E64, P64 = np.where(e_used[..., None], E, 0.0), np.where(p_used[..., None], P, 0.0)
    logits = E64[:, :, None, :] + P64[:, None, :, :]
    log_norm = np.log(np.exp(logits).sum(-1)).astype(np.float32) * cells
    d_e, d_p = jax.jit(lambda *a: _ffi.norm_backward(*a, blank))(
        E, P, e_rows, p_rows, max_e, w, g_blank, g_emit, log_norm, g_exact, labels)
    a = np.exp(E64 - E64.max(-1, keepdims=True)) * e_used[..., None]
    p = np.exp(P64 - P64.max(-1, keepdims=True)) * p_used[..., None]
    want_e = a * np.einsum("btu,buv->btv", w, p)
    want_p = p * np.einsum("btu,btv->buv", w, a)
    share = g_exact[..., None] * np.exp(logits - log_norm[..., None].astype(np.float64))
    want_e += share.sum(2)
    want_p += share.sum(1)
    for b in range(B):
        want_e[b, :, blank] += g_blank[b].sum(1)
        want_p[b, :, blank] += g_blank[b].sum(0)
        for u in range(U1):
            if labels[b, u] < V:
                want_e[b, :, labels[b, u]] += g_emit[b, :, u]
                want_p[b, u, labels[b, u]] += g_emit[b, :, u].sum()
    np.testing.assert_allclose(np.asarray(d_e), want_e, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(d_p), want_p, rtol=1e-5, atol=1e-5)
    assert (np.asarray(d_e)[~e_used] == 0).all() and (np.asarray(d_p)[~p_used] == 0).all()


def test_norm_kernels_clamp_row_counts():
    # Garbage counts (negative, past the arrays) must stay inside the buffers.
    from jax_transducer import _ffi
    E, P, _, _ = _norm_case(5, 2, 4, 3, 6)
    E, P = np.nan_to_num(E), np.nan_to_num(P, posinf=1.0)
    e_rows = np.array([[-7], [10**6]], np.int32)
    p_rows = np.array([[10**6], [-1]], np.int32)
    labels = np.array([[0, 5, 10**6], [-4, 2, 7]], np.int32)  # out of range: read as the blank
    *cells, max_e, max_p = _ffi.norm_forward(E, P, e_rows, p_rows, labels, 0)
    for x in cells:  # example 0 has no frames, example 1 no predictions
        assert (np.asarray(x) == 0).all()
    for moves in _ffi.norm_viterbi(E, P, e_rows, p_rows, 0):
        assert (np.asarray(moves) == 0).all()
    zeros, ones = np.zeros((2, 4, 3), np.float32), np.ones((2, 4, 3), np.float32)
    d_e, d_p = _ffi.norm_backward(E, P, e_rows, p_rows, max_e, zeros, zeros, zeros, zeros, ones,
                                  np.full((2, 3), 10**6, np.int32), 0)
    assert np.isfinite(np.asarray(d_e)).all() and np.isfinite(np.asarray(d_p)).all()


def test_norm_forward_reads_labels_out_of_range_as_the_blank():
    from jax_transducer import _ffi
    E, P, e_rows, p_rows = _norm_case(6, 2, 5, 4, 7)
    labels = np.array([[-1, 7, 10**6, 2**31 - 1], [-(2**31), 3, 8, 6]], np.int32)
    blank_lp, emit_lp, *_ = _ffi.norm_forward(E, P, e_rows, p_rows, labels, 3)
    as_blank = np.where(labels < 0, 3, np.where(labels >= 7, 3, labels))
    want = _moves_reference(E, P, e_rows, p_rows, 3, as_blank)
    np.testing.assert_allclose(np.asarray(emit_lp), want[2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,fused", [(np.float32, True), (np.float64, False)])
def test_float32_uses_the_fused_cpu_normaliser(dtype, fused):
    import jax
    import jax_transducer as jt
    E, P = np.ones((1, 3, 5), dtype), np.ones((1, 3, 5), dtype)
    args = (E, P, np.ones((1, 2), np.int32), np.array([3]), np.array([2]))
    loss = jax.jit(jax.grad(lambda e, *a: jt.transducer_loss(e, *a).sum()))
    hlo = loss.lower(*args).as_text()
    vit = jax.jit(jt.viterbi).lower(E, P, np.array([3]), np.array([2])).as_text()
    for name, text in (("jax_transducer_norm_forward", hlo), ("jax_transducer_norm_backward", hlo),
                       ("jax_transducer_norm_viterbi", vit)):
        assert (name in text) == fused
