"""Pruned loss: prune_ranges' guarantees, prune_joiner_inputs, and pruned_transducer_loss against
an independent sum over the paths inside the windows, the full loss, and bad ranges."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_transducer as jt
import reference as ref
from test_logits import random_logits
from util import CASES, make_batch, put


# ---------------------------------------------------------------------------------------------
# Independent helpers.

def random_ranges(rng, in_len, lab_len, T, S):
    """Random window starts that let a path through (r[0] = 0, steps in [0, S-1], the last
    window holding U_b), or None where no windowing can. Padding frames hold junk."""
    out = rng.choice([-7, 10**6], size=(len(in_len), T)).astype(np.int32)
    for b, (T_b, U_b) in enumerate(zip(in_len, lab_len)):
        if U_b > (S - 1) * T_b:
            return None
        r = 0
        out[b, 0] = 0
        for t in range(1, T_b):
            lo = max(r, U_b - S + 1 - (S - 1) * (T_b - 1 - t))
            hi = min(r + S - 1, U_b)
            r = int(rng.integers(lo, hi + 1))
            out[b, t] = r
    return out


def windowed_paths(T_b, U_b, r, S):
    """Every path of the (T_b, U_b+1) lattice whose nodes all lie in their frame's window, as
    lists of moves (t, k, is_label) with k = u - r[t] the node's window cell."""
    paths = []
    for label_pos in ref._paths(T_b, U_b):
        t = u = 0
        moves, ok = [], True
        for m in range(T_b - 1 + U_b + 1):  # the final blank is the last move
            ok &= r[t] <= u < r[t] + S
            is_label = m in label_pos
            moves.append((t, u - r[t], is_label, u))
            if is_label:
                u += 1
            else:
                t += 1
        if ok:
            paths.append(moves)
    return paths


def windowed_costs(logits, ranges, labels, in_len, lab_len, blank):
    """Float64 costs (B,) by summing the probabilities of the paths inside the windows, and their
    gradient w.r.t. the pruned logits (jax.grad of that explicit sum)."""
    logits = np.where(np.isfinite(logits), logits, 0.0).astype(np.float64)

    def cost(x, b):
        lp = jax.nn.log_softmax(x, axis=-1)
        paths = windowed_paths(int(in_len[b]), int(lab_len[b]), ranges[b], x.shape[1])
        scores = [sum(lp[t, k, labels[b, u] if is_label else blank]
                      for t, k, is_label, u in moves) for moves in paths]
        return -jax.nn.logsumexp(jnp.stack(scores))

    costs = np.zeros(len(in_len))
    grad = np.zeros(logits.shape)
    for b in range(len(in_len)):
        c, g = jax.value_and_grad(cost)(jnp.asarray(logits[b]), b)
        costs[b], grad[b] = c, g
    return costs, grad


def check_guarantees(ranges, in_len, lab_len, U, S):
    """prune_ranges' documented guarantees, for the examples where a windowing exists."""
    ranges = np.asarray(ranges)
    assert ranges.dtype == np.int32
    assert (ranges >= 0).all() and (ranges <= max(0, U + 1 - S)).all()
    for b, (T_b, U_b) in enumerate(zip(in_len, lab_len)):
        r = ranges[b, :T_b]
        assert r[0] == 0
        assert ((np.diff(r) >= 0) & (np.diff(r) <= S - 1)).all()
        assert r[-1] == max(0, U_b + 1 - S) and r[-1] <= U_b <= r[-1] + S - 1


# ---------------------------------------------------------------------------------------------
# prune_ranges and prune_joiner_inputs.

@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("S", [1, 2, 3, 5])
def test_prune_ranges_guarantees(device, case, S):
    E, P, labels, in_len, lab_len = make_batch(**case)
    U = P.shape[1] - 1
    ranges = jt.prune_ranges(*put(device, E, P, labels, in_len, lab_len), S,
                             blank=case.get("blank", 0))
    possible = lab_len <= (S - 1) * in_len
    check_guarantees(np.asarray(ranges)[possible], in_len[possible], lab_len[possible], U, S)
    if S >= U + 1:
        assert (np.asarray(ranges) == 0).all()


@pytest.mark.parametrize("S", [1, 2, 3, 6])
def test_window_adjustment_holds_for_any_scores(S):
    # The adjustment alone, on arbitrary (non-lattice) flows whose argmax jumps up and down.
    from jax_transducer.pruned import windows
    rng = np.random.default_rng(S)
    B, T, U = 64, 9, 7
    flow_blank, flow_emit = rng.uniform(size=(2, B, T, U + 1)) ** 4
    in_len = rng.integers(1, T + 1, size=B).astype(np.int32)
    lab_len = rng.integers(0, U + 1, size=B).astype(np.int32)
    ranges = windows(flow_blank, flow_emit, in_len, lab_len, np.ones(B, bool), S)
    possible = lab_len <= (S - 1) * in_len
    assert possible.sum() >= 4
    check_guarantees(np.asarray(ranges)[possible], in_len[possible], lab_len[possible], U, S)


def test_prune_ranges_follow_the_lattice_and_keep_its_mass(device):
    # A peaked additive lattice: label u is emitted at frame f[u] by a margin of 5 nats per move.
    T, U, V, S = 30, 10, 12, 4
    rng = np.random.default_rng(0)
    frames = np.sort(rng.integers(0, T, size=U))
    y = rng.permutation(np.arange(1, V))[:U]
    E = np.full((1, T, V), -5.0)
    E[0, :, 0] = 5.0
    E[0, frames, y] = 5.0
    P = np.zeros((1, U + 1, V))
    P[0, np.arange(U), y] = 5.0
    args = put(device, E, P, y[None].astype(np.int32), np.array([T]), np.array([U]))
    np.testing.assert_array_equal(np.asarray(jt.align(*args))[0], frames)

    ranges = np.asarray(jt.prune_ranges(*args, S))
    check_guarantees(ranges, [T], [U], U, S)
    r = ranges[0]
    assert all(r[f] <= u and u + 1 < r[f] + S for u, f in enumerate(frames))  # the best path

    enc, dec = jt.prune_joiner_inputs(*put(device, E, P, ranges), S)
    pruned = jt.pruned_transducer_loss(enc + dec, ranges, *args[2:])
    full = jt.transducer_loss(*args)
    assert 0 <= float(pruned[0] - full[0]) < 1e-3


def test_prune_ranges_invalid_example_inside_jit_gets_zeros(device):
    E, P, labels, in_len, lab_len = make_batch(3, B=4, T=8, U=5)
    bad = in_len.copy()
    bad[2] = 0
    got = np.asarray(jax.jit(jt.prune_ranges, static_argnums=5)(
        *put(device, E, P, labels, bad, lab_len), 2))
    want = np.asarray(jt.prune_ranges(*put(device, E, P, labels, in_len, lab_len), 2))
    assert (got[2] == 0).all()
    np.testing.assert_array_equal(got[[0, 1, 3]], want[[0, 1, 3]])
    with pytest.raises(ValueError, match="input_lengths"):
        jt.prune_ranges(E, P, labels, bad, lab_len, 2)
    with pytest.raises(ValueError, match="s_range"):
        jt.prune_ranges(E, P, labels, in_len, lab_len, 0)


def test_prune_joiner_inputs(device):
    rng = np.random.default_rng(1)
    B, T, U, D, D2, S = 2, 5, 3, 6, 4, 6  # S > U + 1: positions past U repeat row U
    enc, dec = rng.normal(size=(B, T, D)), rng.normal(size=(B, U + 1, D2))
    ranges = rng.integers(0, U + 1, size=(B, T)).astype(np.int32)
    got_enc, got_dec = jt.prune_joiner_inputs(*put(device, enc, dec, ranges), S)
    assert got_enc.shape == (B, T, S, D) and got_dec.shape == (B, T, S, D2)
    for b in range(B):
        for t in range(T):
            for k in range(S):
                np.testing.assert_array_equal(got_enc[b, t, k], enc[b, t])
                np.testing.assert_array_equal(got_dec[b, t, k], dec[b, min(ranges[b, t] + k, U)])
    # Differentiable: the gradient of a sum counts how often each row was used.
    g_enc, g_dec = jax.grad(lambda e, d: sum(x.sum() for x in jt.prune_joiner_inputs(
        e, d, ranges, S)), argnums=(0, 1))(*put(device, enc, dec))
    np.testing.assert_array_equal(np.asarray(g_enc), np.full(enc.shape, S))
    counts = np.zeros((B, U + 1))
    for b in range(B):
        np.add.at(counts[b], np.minimum(ranges[b][:, None] + np.arange(S), U).ravel(), 1)
    np.testing.assert_array_equal(np.asarray(g_dec), np.repeat(counts[..., None], D2, -1))
    with pytest.raises(ValueError, match="ranges: expected shape"):
        jt.prune_joiner_inputs(enc, dec, ranges[:, :-1], S)
    with pytest.raises(ValueError, match="decoder_out"):
        jt.prune_joiner_inputs(enc, dec[:1], ranges, S)


# ---------------------------------------------------------------------------------------------
# pruned_transducer_loss.

@pytest.mark.parametrize("seed,blank,S,dims", [
    (0, 0, 2, dict(B=4, T=4, U=3, V=5)),
    (1, 2, 3, dict(B=4, T=5, U=4, V=6)),
    (2, 0, 3, dict(B=3, T=2, U=4, V=4)),     # U > T: windows must climb several labels a frame
    (3, 1, 3, dict(B=3, T=3, U=4, V=3)),
    (4, 0, 1, dict(B=2, T=5, U=0, V=4)),     # no labels: a one-position window suffices
    (5, 3, 4, dict(B=4, T=4, U=3, V=7)),     # S = U + 1
])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_matches_sum_over_paths_inside_windows(device, seed, blank, S, dims, dtype):
    _, labels, in_len, lab_len = random_logits(seed, blank=blank, **dims)
    B, T, V = dims["B"], dims["T"], dims["V"]
    lab_len = np.minimum(lab_len, (S - 1) * in_len)  # where no windowing exists: test_bad_ranges
    rng = np.random.default_rng(seed)
    ranges = random_ranges(rng, in_len, lab_len, T, S)
    logits = (rng.normal(size=(B, T, S, V)) * 2).astype(dtype)
    for b in range(B):
        logits[b, in_len[b]:] = np.nan  # padding frames
        for t in range(in_len[b]):
            logits[b, t, max(0, lab_len[b] + 1 - ranges[b, t]):] = np.nan  # positions past U_b

    args = put(device, logits, ranges, labels, in_len, lab_len)
    f = lambda x: jt.pruned_transducer_loss(x, *args[1:], blank=blank)
    costs, vjp = jax.vjp(f, args[0])
    weights = np.linspace(0.5, 1.5, B)
    (grad,) = vjp(jnp.asarray(weights, costs.dtype))
    want_costs, want_grad = windowed_costs(logits, ranges, labels, in_len, lab_len, blank)
    tol = 1e-10 if dtype == np.float64 else 2e-5
    assert costs.dtype == dtype and grad.dtype == dtype
    np.testing.assert_allclose(np.asarray(costs), want_costs, rtol=tol)
    np.testing.assert_allclose(np.asarray(grad), want_grad * weights[:, None, None, None],
                               rtol=0, atol=tol)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("extra", [0, 2])
@pytest.mark.parametrize("options", [{}, dict(fastemit_lambda=0.5, delay_penalty=0.3)])
def test_full_width_equals_the_full_loss(device, case, extra, options):
    # s_range >= U + 1 with all ranges 0: the windows hold the whole lattice.
    case = dict(case)
    logits, labels, in_len, lab_len = random_logits(case.pop("seed"), **case)
    blank = case.get("blank", 0)
    wide = np.concatenate([logits, np.full(logits.shape[:2] + (extra,) + logits.shape[3:],
                                           np.nan)], axis=2)
    ranges = np.zeros(logits.shape[:2], np.int32)
    lengths = put(device, labels, in_len, lab_len)
    pruned = lambda x: jt.pruned_transducer_loss(x, ranges, *lengths, blank=blank, **options)
    full = lambda x: jt.transducer_loss_from_logits(x, *lengths, blank=blank, **options)
    got, got_vjp = jax.vjp(pruned, *put(device, wide))
    want, want_vjp = jax.vjp(full, *put(device, logits))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-12)
    weights = jnp.linspace(0.5, 1.5, len(in_len))
    (g,), (w,) = got_vjp(weights), want_vjp(weights)
    U1 = logits.shape[2]
    np.testing.assert_allclose(np.asarray(g)[:, :, :U1], np.asarray(w), rtol=1e-10, atol=1e-12)
    assert (np.asarray(g)[:, :, U1:] == 0).all()


@pytest.mark.parametrize("S", [2, 3, 4])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_pruned_cost_is_never_below_the_full_cost(device, S, dtype):
    E, P, labels, in_len, lab_len = make_batch(7, B=6, T=9, U=6, V=8, dtype=dtype)
    possible = lab_len <= (S - 1) * in_len
    E, P, labels, in_len, lab_len = (x[possible] for x in (E, P, labels, in_len, lab_len))
    args = put(device, E, P, labels, in_len, lab_len)
    ranges = jt.prune_ranges(*args, S)

    @jax.jit
    def pruned(e, p):
        enc, dec = jt.prune_joiner_inputs(e, p, ranges, S)
        return jt.pruned_transducer_loss(enc + dec, ranges, *args[2:])

    costs = pruned(*args[:2])
    g_e, g_p = jax.grad(lambda e, p: pruned(e, p).sum(), argnums=(0, 1))(*args[:2])
    full = jt.transducer_loss(*args)
    slack = 1e-9 if dtype == np.float64 else 1e-4
    assert (np.asarray(costs) >= np.asarray(full) - slack).all()
    assert (np.asarray(costs) > np.asarray(full) + 1e-3).any()  # something was pruned
    assert np.isfinite(np.asarray(g_e)).all() and np.isfinite(np.asarray(g_p)).all()


def test_bad_ranges(device):
    logits, labels, in_len, lab_len = random_logits(9, B=4, T=6, U=4, V=5)
    S = 3
    rng = np.random.default_rng(9)
    ranges = random_ranges(rng, in_len, lab_len, logits.shape[1], S)
    logits = logits[:, :, :S]
    f = jt.pruned_transducer_loss
    good = f(logits, ranges, labels, in_len, lab_len)
    breakers = {
        "first": lambda r: r.__setitem__((0, 0), 1),
        "step": lambda r: r.__setitem__((0, slice(2, None)), r[0, 2:] + S),
        "down": lambda r: r.__setitem__((0, 1), -1),
        "end": lambda r: r.__setitem__((0, in_len[0] - 1), 0),  # U_0 = 4 >= S: not held
    }
    for name, breaker in breakers.items():
        bad = ranges.copy()
        breaker(bad)
        with pytest.raises(ValueError, match="ranges: example 0"):
            f(logits, bad, labels, in_len, lab_len)
        costs, vjp = jax.vjp(lambda x: jax.jit(f)(x, bad, labels, in_len, lab_len), logits)
        (grad,) = vjp(jnp.ones_like(costs))
        assert np.isnan(costs[0]), name
        np.testing.assert_allclose(np.asarray(costs[1:]), np.asarray(good[1:]), rtol=1e-12)
        assert (np.asarray(grad)[0] == 0).all() and np.isfinite(np.asarray(grad)).all()
    with pytest.raises(ValueError, match="ranges: expected shape"):
        f(logits, ranges[:, :-1], labels, in_len, lab_len)
    with pytest.raises(TypeError, match="ranges: expected an integer"):
        f(logits, ranges.astype(np.float32), labels, in_len, lab_len)
    with pytest.raises(ValueError, match="labels: expected shape"):
        f(logits, ranges, labels[:2], in_len, lab_len)


def test_jit_and_vmap(device):
    E, P, labels, in_len, lab_len = make_batch(11, B=3, T=7, U=4, V=6,
                                               lengths=[(7, 4), (2, 0), (3, 4)])
    S = 3
    stacked = [np.stack([x, x[::-1]]) for x in (E, P, labels, in_len, lab_len)]

    def loss(e, p, labels, in_len, lab_len):
        ranges = jt.prune_ranges(e, p, labels, in_len, lab_len, S)
        enc, dec = jt.prune_joiner_inputs(e, p, ranges, S)
        return jt.pruned_transducer_loss(enc + dec, ranges, labels, in_len, lab_len)

    got = jax.jit(jax.vmap(loss))(*put(device, *stacked))
    want = loss(*put(device, E, P, labels, in_len, lab_len))
    np.testing.assert_allclose(np.asarray(got), np.stack([want, want[::-1]]), rtol=1e-12)


def test_memory_scales_with_s_range_not_with_u():
    # Loss + gradient of a pruned joiner: O(B*T*s_range*V) (plus the simple loss normaliser's
    # bounded 2^20-logit chunk), far below one (B, T, U+1, V) buffer.
    B, T, U, V, S = 2, 128, 64, 512, 4
    labels = jnp.ones((B, U), jnp.int32)
    lens = (jnp.full((B,), T, jnp.int32), jnp.full((B,), U, jnp.int32))
    shapes = (jax.ShapeDtypeStruct((B, T, V), jnp.float32),
              jax.ShapeDtypeStruct((B, U + 1, V), jnp.float32))

    def loss(e, p):
        ranges = jt.prune_ranges(e, p, labels, *lens, S)
        enc, dec = jt.prune_joiner_inputs(e, p, ranges, S)
        return jt.pruned_transducer_loss(jnp.tanh(enc + dec), ranges, labels, *lens).sum()

    step = jax.jit(jax.grad(loss, argnums=(0, 1)))
    temp = step.lower(*shapes).compile().memory_analysis().temp_size_in_bytes
    assert temp < 0.3 * B * T * (U + 1) * V * 4
