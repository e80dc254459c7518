"""The kernel calls of _ffi.py in pure XLA, for backends without compiled kernels (TPU, or an
install built without them).

Same signatures and semantics as the kernels (lib/lattice.h, lib/cpu/lattice_cpu.h): alpha is -inf
outside the lattice, flows are zero there, and an example whose lengths fall outside the arrays
(input length not in [1, T], label length not in [0, U]) gets a NaN cost, -inf alpha, zero flows
and an all-blank viterbi row. Cells outside an example's lattice may hold anything, NaN included:
no lattice cell ever depends on them.

Like the kernels, the recursions sweep anti-diagonals d = t + u, whose cells are independent: the
(B, T, U+1) arrays are skewed to (T+U, B, U+1), row d holding the cells (d - u, u), and a
`lax.scan` over the rows does one elementwise step per diagonal. Memory stays O(B*T*U): the
skewed copies, the per-diagonal outputs and the compact results. Everything is computed in the
arrays' own dtype (the CPU kernels accumulate float32 in double, so float32 results differ from
theirs by float32 roundings).
"""

import jax
import jax.numpy as jnp

from ._vma import to_varying, varying_axes

NEG_INF = float("-inf")


def lengths_valid(input_lengths, label_lengths, T, U1):
    """(B,) bool: whether each example's lattice fits in the (T, U1) arrays (lib/lattice.h)."""
    return (input_lengths >= 1) & (input_lengths <= T) & (label_lengths >= 0) & (label_lengths < U1)


def log_add(a, b):
    """log(exp(a) + exp(b)) as lib/lattice.h's log_add: NaN in either gives NaN, -inf + -inf is
    -inf."""
    hi, lo = jnp.where(a > b, a, b), jnp.where(a > b, b, a)
    special = ~(hi > NEG_INF) | jnp.isnan(a) | jnp.isnan(b)
    return jnp.where(special, a + b, hi + jnp.log1p(jnp.exp(jnp.where(special, 0, lo - hi))))


def _skew(x, fill):
    """(B, T, U1) -> (T+U1-1, B, U1) with out[d, b, u] = x[b, d - u, u], `fill` where d - u is
    outside [0, T). Row u, padded to T+U1 and laid end to end, shifts by one per row when the
    rows are read back with length T+U1-1."""
    B, T, U1 = x.shape
    y = jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, U1)), constant_values=fill)
    y = y.reshape(B, U1 * (T + U1))[:, :U1 * (T + U1 - 1)].reshape(B, U1, T + U1 - 1)
    return jnp.transpose(y, (2, 0, 1))


def _unskew(y, T):
    """The inverse of _skew: (T+U1-1, B, U1) -> (B, T, U1)."""
    D, B, U1 = y.shape
    y = jnp.transpose(y, (1, 2, 0)).reshape(B, U1 * D)
    y = jnp.pad(y, ((0, 0), (0, U1))).reshape(B, U1, T + U1)[:, :, :T]
    return jnp.swapaxes(y, 1, 2)


def _from_left(x, fill):
    """x[..., u - 1] at u (fill at u = 0)."""
    return jnp.concatenate([jnp.full_like(x[..., :1], fill), x[..., :-1]], axis=-1)


def _from_right(x, fill):
    """x[..., u + 1] at u (fill at the last u)."""
    return jnp.concatenate([x[..., 1:], jnp.full_like(x[..., :1], fill)], axis=-1)


def _lattice(input_lengths, label_lengths, T, U1):
    """(B,) lengths, (B,) validity, and (B, T, U1) masks of the lattice's cells, of the cells
    with a blank move (every row but the last, and the final blank) and of those with a label
    move (u < label length)."""
    il, ll = input_lengths[:, 0], label_lengths[:, 0]
    valid = lengths_valid(il, ll, T, U1)
    t = jnp.arange(T)[None, :, None]
    u = jnp.arange(U1)[None, None, :]
    il3, ll3 = il[:, None, None], ll[:, None, None]
    inside = valid[:, None, None] & (t < il3) & (u <= ll3)
    has_blank = inside & ((t < il3 - 1) | (u == ll3))
    has_emit = inside & (u < ll3)
    return il, ll, valid, inside, has_blank, has_emit


def _at_end(x, il, ll):
    """x[b, il[b] - 1, ll[b]] (0 where that is outside the arrays), as a masked sum: a gather
    from a batch-sharded array would need its output sharding spelled out."""
    _, T, U1 = x.shape
    end = ((jnp.arange(T)[None, :, None] == il[:, None, None] - 1)
           & (jnp.arange(U1)[None, None, :] == ll[:, None, None]))
    return jnp.sum(jnp.where(end, x, 0), axis=(1, 2))


def forward(blank_lp, emit_lp, input_lengths, label_lengths):
    """Costs (B, 1) and alpha (B, T, U+1) of the lattices, as the forward kernel."""
    B, T, U1 = blank_lp.shape
    axes = varying_axes(blank_lp, emit_lp, input_lengths, label_lengths)
    il, ll, valid, inside, _, _ = _lattice(input_lengths, label_lengths, T, U1)

    def diagonal(prev, moves):
        # alpha[t, u] from alpha[t-1, u] (column u of diagonal d-1) and alpha[t, u-1] (column u-1).
        blank, emit = moves  # the log-probabilities out of diagonal d-1
        cur = log_add(prev + blank, _from_left(prev + emit, NEG_INF))
        return cur, cur

    # Diagonal 0 is the origin alone. Cells with t < 0 read only the -inf fill, so they stay -inf;
    # cells past an example's lattice hold whatever and are masked below.
    first = jnp.where(jnp.arange(U1) == 0, 0, NEG_INF).astype(blank_lp.dtype)
    first = to_varying(jnp.broadcast_to(first, (B, U1)), axes)
    moves = (_skew(blank_lp, NEG_INF)[:-1], _skew(emit_lp, NEG_INF)[:-1])
    _, rest = jax.lax.scan(diagonal, first, moves)
    alpha = _unskew(jnp.concatenate([first[None], rest]), T)
    alpha = jnp.where(inside, alpha, NEG_INF)
    costs = jnp.where(valid, -(_at_end(alpha, il, ll) + _at_end(blank_lp, il, ll)), jnp.nan)
    return to_varying(costs[:, None], axes), to_varying(alpha, axes)


def backward(blank_lp, emit_lp, alpha, costs, input_lengths, label_lengths):
    """Posterior flows of the blank and label moves, (B, T, U+1) each, zero outside lattices and
    for invalid examples, as the backward kernel (exp(alpha + log-prob + beta - log Z) with
    log Z = -costs)."""
    B, T, U1 = blank_lp.shape
    axes = varying_axes(blank_lp, emit_lp, alpha, costs, input_lengths, label_lengths)
    il, ll, _, _, has_blank, has_emit = _lattice(input_lengths, label_lengths, T, U1)
    il2, ll2 = il[:, None], ll[:, None]
    u = jnp.arange(U1)

    def diagonal(nxt, xs):
        # beta[t, u] from beta[t+1, u] (column u of diagonal d+1) and beta[t, u+1] (column u+1).
        d, blank, emit = xs  # the log-probabilities out of diagonal d
        last_row = d - u == il2 - 1
        # Only the final blank leaves an example's last row, into beta = 0.
        down = jnp.where(last_row, 0, nxt) + blank
        down = jnp.where(~last_row | (u == ll2), down, NEG_INF)
        right = jnp.where(u < ll2, _from_right(nxt, NEG_INF) + emit, NEG_INF)
        cur = log_add(down, right)
        return cur, cur

    # Cells inside a lattice read only cells inside it (or the final blank's 0): what the scan
    # computes elsewhere is never used.
    beyond = to_varying(jnp.full((B, U1), NEG_INF, blank_lp.dtype), axes)
    xs = (jnp.arange(T + U1 - 1), _skew(blank_lp, NEG_INF), _skew(emit_lp, NEG_INF))
    _, betas = jax.lax.scan(diagonal, beyond, xs, reverse=True)
    beta = _unskew(betas, T)

    # beta[t+1, u] and beta[t, u+1]; has_blank keeps only the final blank on the last row.
    last_row = jnp.arange(T)[None, :, None] == il[:, None, None] - 1
    beta_down = jnp.concatenate([beta[:, 1:], jnp.full_like(beta[:, :1], NEG_INF)], axis=1)
    beta_down = jnp.where(last_row, 0, beta_down)
    beta_right = _from_right(beta, NEG_INF)
    log_z = -costs[:, :, None]
    flow_blank = jnp.where(has_blank, jnp.exp(alpha + blank_lp + beta_down - log_z), 0)
    flow_emit = jnp.where(has_emit, jnp.exp(alpha + emit_lp + beta_right - log_z), 0)
    return to_varying(flow_blank, axes), to_varying(flow_emit, axes)


NO_FRAME = -1  # lib/lattice.h's kNoFrame


def viterbi_frames(blank_lp, label_lp, input_lengths, label_lengths):
    """The frame of each label move of the best path, per label position u, (B, U+1) int32, as
    the viterbi kernel: ties go to the blank arrival (a NaN on the label side loses), positions
    >= label length hold NO_FRAME, and an invalid example's row is all NO_FRAME."""
    B, T, U1 = blank_lp.shape
    axes = varying_axes(blank_lp, label_lp, input_lengths, label_lengths)
    il, ll, valid, _, _, _ = _lattice(input_lengths, label_lengths, T, U1)
    u = jnp.arange(U1)

    def diagonal(prev, xs):
        d, blank_move, label_move = xs  # diagonal d, the moves out of diagonal d-1
        t = d - u
        top = jnp.where(t > 0, prev + blank_move, NEG_INF)
        left = jnp.where(u > 0, _from_left(prev + label_move, NEG_INF), NEG_INF)
        by_blank = (t > 0) & ((u == 0) | ~(left > top))
        return jnp.where(by_blank, top, left), by_blank.astype(jnp.uint8)

    first = jnp.where(u == 0, 0, NEG_INF).astype(blank_lp.dtype)
    first = to_varying(jnp.broadcast_to(first, (B, U1)), axes)
    D = T + U1 - 1
    xs = (jnp.arange(1, D), _skew(blank_lp, NEG_INF)[:-1], _skew(label_lp, NEG_INF)[:-1])
    _, decisions = jax.lax.scan(diagonal, first, xs)  # diagonals 1 .. D-1

    # The backtrack walks one diagonal down per move, so it is a reverse scan over diagonals too:
    # example b acts on diagonal d when its current cell (t, v) has t + v = d. Cells are picked
    # by masked sums over u, not gathers, which a batch-sharded array admits without collectives.
    def back(carry, xs):
        t, v, path = carry
        d, decision = xs  # diagonal d's decisions
        act = valid & (v > 0) & (t + v == d)
        by_blank = jnp.any((u == v[:, None]) & (decision != 0), axis=1)
        emitted = act & ~by_blank
        t = jnp.where(act & by_blank, t - 1, t)
        v = jnp.where(emitted, v - 1, v)
        # The label move (t, v) -> (t, v+1) is position v's, at frame t.
        path = jnp.where(emitted[:, None] & (u == v[:, None]), t[:, None], path)
        return (t, v, path), None

    start = (jnp.where(valid, il - 1, 0), jnp.where(valid, ll, 0),
             jnp.full((B, U1), NO_FRAME, jnp.int32))
    start = tuple(to_varying(x, axes) for x in start)
    (_, _, path), _ = jax.lax.scan(back, start, (jnp.arange(1, D), decisions), reverse=True)
    return to_varying(path, axes)

