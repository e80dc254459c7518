"""The pure-XLA implementation (impl="xla"): the float64 reference and brute force, the kernels'
results (impl="ffi") on the same inputs, the transforms, the automatic fallback when kernels are
missing, lowerings free of our custom calls, and memory without a V * T * U factor."""

import functools
import importlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from jax.sharding import NamedSharding, PartitionSpec
from jax.test_util import check_grads

import jax_transducer as jt
import reference as ref
from jax_transducer import _ffi, _xla
from test_fuzz import batches
from util import CASES, make_batch, put, unpadded

HAS_KERNELS = _ffi.has_cpu()
needs_kernels = pytest.mark.skipif(not HAS_KERNELS, reason="no CPU kernels in this install")


def costs_and_grads(E, P, labels, in_len, lab_len, impl, **options):
    """Costs (B,) and the gradients of their sum, from one compiled function."""
    out = _costs_and_grads(E, P, labels, in_len, lab_len, impl, tuple(sorted(options.items())))
    return tuple(map(np.asarray, out))


@functools.partial(jax.jit, static_argnums=(5, 6))
def _costs_and_grads(E, P, labels, in_len, lab_len, impl, options):
    f = lambda e, p: jt.transducer_loss(e, p, labels, in_len, lab_len, impl=impl, **dict(options))
    costs, vjp = jax.vjp(f, E, P)
    return (costs, *vjp(jnp.ones_like(costs)))


# ---------------------------------------------------------------------------------------------
# Against the reference.

F64, F32 = (np.float64, 1e-10), (np.float32, 2e-5)


@pytest.mark.parametrize("case,dtype,tol", [(c, *F64) for c in CASES] +
                         [(CASES[i], *F32) for i in (1, 2, 5)])
def test_costs_and_gradients_match_reference(device, case, dtype, tol):
    E, P, labels, in_len, lab_len = make_batch(dtype=dtype, **case)
    blank = case.get("blank", 0)
    costs, gE, gP = costs_and_grads(*put(device, E, P), labels, in_len, lab_len, "xla",
                                    blank=blank)
    assert costs.dtype == dtype and gE.dtype == dtype and gP.dtype == dtype
    E64, P64 = E.astype(np.float64), P.astype(np.float64)
    np.testing.assert_allclose(costs, ref.costs(E64, P64, labels, in_len, lab_len, blank),
                               rtol=tol)
    wE, wP = ref.gradients(E64, P64, labels, in_len, lab_len, blank)
    np.testing.assert_allclose(gE, wE, rtol=tol, atol=tol)
    np.testing.assert_allclose(gP, wP, rtol=tol, atol=tol)
    for b in range(E.shape[0]):  # padding: exactly zero gradient, whatever it holds (NaN here)
        assert (gE[b, in_len[b]:] == 0).all() and (gP[b, lab_len[b] + 1:] == 0).all()


@pytest.mark.parametrize("seed,blank", [(10, 0), (11, 2)])
def test_costs_match_brute_force(seed, blank):
    E, P, labels, in_len, lab_len = make_batch(seed, B=3, T=4, U=3, V=4, blank=blank)
    got = costs_and_grads(E, P, labels, in_len, lab_len, "xla", blank=blank)[0]
    want = ref.brute_force_costs(E, P, labels, in_len, lab_len, blank)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-10)


def test_finite_differences():
    blank = 2
    E, P, labels, in_len, lab_len = unpadded(*make_batch(31, B=3, T=4, U=3, V=5, blank=blank))
    f = lambda e, p: jt.transducer_loss(e, p, labels, in_len, lab_len, blank=blank,
                                        reduction="sum", impl="xla")
    check_grads(f, (E, P), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


def test_float32_on_long_lattices():
    # The XLA recursions accumulate in float32 (the CPU kernels in double): over T + U = 330
    # diagonals of values in the hundreds, the costs keep about 7 digits, the gradients about 4.
    rng = np.random.default_rng(34)
    B, T, U, V = 2, 300, 30, 50
    E, P = rng.normal(size=(B, T, V)), rng.normal(size=(B, U + 1, V))
    labels = rng.integers(1, V, size=(B, U)).astype(np.int32)
    lens = np.full(B, T, np.int32), np.full(B, U, np.int32)
    costs, gE, gP = costs_and_grads(E.astype(np.float32), P.astype(np.float32), labels, *lens,
                                    "xla")
    np.testing.assert_allclose(costs, ref.costs(E, P, labels, *lens), rtol=1e-6)
    wE, wP = ref.gradients(E, P, labels, *lens)
    assert np.abs(gE - wE).max() < 1e-3 * np.abs(wE).max()
    assert np.abs(gP - wP).max() < 1e-3 * np.abs(wP).max()


@pytest.mark.parametrize("case,fastemit,delay", [(CASES[1], 0.5, 0.0), (CASES[2], 0.0, 0.3),
                                                 (CASES[5], 0.2, -0.4)])
def test_fastemit_and_delay_penalty_match_reference(case, fastemit, delay):
    E, P, labels, in_len, lab_len = make_batch(**case)
    blank = case.get("blank", 0)
    costs, gE, gP = costs_and_grads(E, P, labels, in_len, lab_len, "xla", blank=blank,
                                    fastemit_lambda=fastemit, delay_penalty=delay)
    want = ref.costs(E, P, labels, in_len, lab_len, blank, delay_penalty=delay)
    np.testing.assert_allclose(costs, want, rtol=1e-10)
    wE, wP = ref.gradients(E, P, labels, in_len, lab_len, blank, fastemit_lambda=fastemit,
                           delay_penalty=delay)
    np.testing.assert_allclose(gE, wE, atol=1e-10)
    np.testing.assert_allclose(gP, wP, atol=1e-10)


@pytest.mark.parametrize("case,dtype", [(c, np.float64) for c in CASES] +
                         [(CASES[i], np.float32) for i in (2, 5)])
def test_viterbi_matches_reference(device, case, dtype):
    E, P, _, in_len, lab_len = make_batch(dtype=dtype, **case)
    blank = case.get("blank", 0)
    got = jt.viterbi(*put(device, E, P, in_len, lab_len), blank=blank, impl="xla")
    assert got.dtype == np.int32 and got.shape == (E.shape[0], P.shape[1] - 1)
    want = ref.viterbi(E.astype(np.float64), P.astype(np.float64), in_len, lab_len, blank)
    np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("seed,blank", [(40, 0), (41, 3)])
def test_viterbi_matches_brute_force(seed, blank):
    E, P, _, in_len, lab_len = make_batch(seed, B=4, T=4, U=3, V=5, blank=blank)
    got = jt.viterbi(E, P, in_len, lab_len, blank=blank, impl="xla")
    np.testing.assert_array_equal(np.asarray(got),
                                  ref.brute_force_viterbi(E, P, in_len, lab_len, blank))


def test_viterbi_ties_go_to_blank_arrivals_and_lowest_label():
    E, P = np.zeros((1, 3, 4)), np.zeros((1, 3, 4))
    got = jt.viterbi(E, P, np.array([3]), np.array([2]), impl="xla")
    np.testing.assert_array_equal(np.asarray(got), [[1, 1]])


def test_invalid_examples_inside_jit():
    E, P, labels, in_len, lab_len = make_batch(60, B=4, T=6, U=4, V=7, pad=0.0)
    bad = [(1, 0, None), (1, 7, None), (2, None, -1), (2, None, 5)]  # (example, in_len, lab_len)
    loss = jax.jit(lambda *a: jt.transducer_loss(*a, impl="xla"))
    grad = jax.jit(jax.grad(lambda *a: loss(*a).sum(), argnums=(0, 1)))
    path = jax.jit(lambda *a: jt.viterbi(*a, blank=3, impl="xla"))
    good_costs = np.asarray(loss(E, P, labels, in_len, lab_len))
    for b, i, j in bad:
        il, ll = in_len.copy(), lab_len.copy()
        il[b] = il[b] if i is None else i
        ll[b] = ll[b] if j is None else j
        costs = np.asarray(loss(E, P, labels, il, ll))
        gE, gP = grad(E, P, labels, il, ll)
        others = np.arange(4) != b
        assert np.isnan(costs[b]) and np.isfinite(costs[others]).all()
        np.testing.assert_array_equal(costs[others], good_costs[others])
        assert (np.asarray(gE)[b] == 0).all() and (np.asarray(gP)[b] == 0).all()
        assert (np.asarray(path(E, P, il, ll))[b] == 3).all()


# ---------------------------------------------------------------------------------------------
# Against the kernels.

def random_lattice(rng, B, T, U1, ties=False):
    """Compact lattice arrays with NaN outside every lattice, and lengths that include invalid
    ones (input length 0 or > T, label length < 0 or > U)."""
    blank_lp, emit_lp = -rng.random((B, T, U1)) * 3, -rng.random((B, T, U1)) * 3
    if ties:  # coarse values: equal path scores are common
        blank_lp, emit_lp = np.round(blank_lp), np.round(emit_lp)
    il = rng.integers(1, T + 1, size=B)
    ll = rng.integers(0, U1, size=B)
    il[0], ll[0] = T, U1 - 1
    for b in range(B):
        blank_lp[b, il[b]:], emit_lp[b, :, ll[b] + 1:] = np.nan, np.nan
        emit_lp[b, :, ll[b]] = np.nan  # column U_b's label move is never taken
    if B > 2:
        il[1], ll[2] = rng.choice([0, T + 1, -3, 2**31 - 1]), rng.choice([-1, U1, 2**30])
    return blank_lp, emit_lp, il[:, None].astype(np.int32), ll[:, None].astype(np.int32)


SHAPES = [(5, 6, 4), (3, 3, 8), (4, 1, 4), (3, 5, 1), (6, 9, 3), (1, 1, 1), (4, 17, 12)]


@needs_kernels
@pytest.mark.parametrize("B,T,U1", SHAPES)
def test_raw_calls_match_the_kernels(B, T, U1):
    rng = np.random.default_rng(B * 100 + T * 10 + U1)
    blank_lp, emit_lp, il, ll = random_lattice(rng, B, T, U1)
    costs, alpha = _ffi.forward(blank_lp, emit_lp, il, ll, "ffi")
    got_costs, got_alpha = jax.jit(_xla.forward)(blank_lp, emit_lp, il, ll)
    np.testing.assert_allclose(np.asarray(got_costs), np.asarray(costs), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(got_alpha), np.asarray(alpha), rtol=1e-12)
    want = _ffi.backward(blank_lp, emit_lp, alpha, costs, il, ll, "ffi")
    got = jax.jit(_xla.backward)(blank_lp, emit_lp, alpha, costs, il, ll)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-12, atol=1e-300)
        assert (np.asarray(g)[np.isnan(np.asarray(costs))[:, 0]] == 0).all()

    for ties in (False, True):
        bl, best, _, _ = random_lattice(np.random.default_rng(T), B, T, U1, ties=ties)
        want = _ffi.viterbi_frames(bl, best, il, ll, "ffi")
        got = jax.jit(_xla.viterbi_frames)(bl, best, il, ll)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@needs_kernels
@pytest.mark.parametrize("dtype,tol,options", [
    (np.float64, 1e-12, dict(blank=4)),
    (np.float64, 1e-12, dict(fastemit_lambda=0.3, delay_penalty=0.2, blank=1)),
    (np.float32, 2e-5, dict(fastemit_lambda=0.1, delay_penalty=-0.3, blank=5))])
@pytest.mark.parametrize("shape", [dict(B=5, T=4, U=9, V=7), dict(B=3, T=11, U=3, V=6)])
def test_public_functions_match_the_kernels(dtype, tol, options, shape):
    # U > T or U < T, label length 0 (example 1), variable lengths, NaN padding.
    blank = options.get("blank", 0)
    E, P, labels, in_len, lab_len = make_batch(70, dtype=dtype, blank=blank, **shape)
    want = costs_and_grads(E, P, labels, in_len, lab_len, "ffi", **options)
    got = costs_and_grads(E, P, labels, in_len, lab_len, "xla", **options)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol)
    if dtype == np.float64:
        np.testing.assert_array_equal(
            np.asarray(jt.viterbi(E, P, in_len, lab_len, blank=blank, impl="xla")),
            np.asarray(jt.viterbi(E, P, in_len, lab_len, blank=blank, impl="ffi")))


@needs_kernels
@settings(max_examples=max(5, settings.default.max_examples // 6))  # two compilations each
@given(batches())
def test_fuzzed_batches_match_the_kernels(batch):
    # Junk padding, non-finite values inside one example, bfloat16, logit scales up to 1e3: the
    # same examples are NaN, the others agree.
    E, P, labels, in_len, lab_len, blank, _, scale = batch
    got, want = (costs_and_grads(E, P, labels, in_len, lab_len, impl, blank=blank)
                 for impl in ("xla", "ffi"))
    tol = 1e-9 if E.dtype == np.float64 else 2e-4 if E.dtype == np.float32 else 1e-2
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.isnan(g), np.isnan(w))
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol * max(1.0, scale))


# ---------------------------------------------------------------------------------------------
# Transforms.

BATCH = make_batch(50, B=8, T=7, U=4, V=9, blank=2, pad=0.0)


def loss(e, p, l, i, j, impl="xla"):
    return jt.transducer_loss(e, p, l, i, j, blank=2, impl=impl)


def total(e, p, l, i, j, impl="xla"):
    return loss(e, p, l, i, j, impl).sum()


def vit(e, p, i, j, impl="xla"):
    return jt.viterbi(e, p, i, j, blank=2, impl=impl)


GRAD = jax.grad(total, argnums=(0, 1))


@pytest.fixture(scope="module")
def expected():
    """The kernels' (costs, gradients, paths) on BATCH, or the reference's without kernels."""
    E, P, L, I, J = BATCH
    if HAS_KERNELS:
        return (loss(*BATCH, impl="ffi"), GRAD(*BATCH, impl="ffi"),
                vit(E, P, I, J, impl="ffi"))
    return ref.costs(E, P, L, I, J, 2), ref.gradients(E, P, L, I, J, 2), ref.viterbi(E, P, I, J, 2)


def close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-12, atol=1e-12)


def test_jit_grad_vmap(expected):
    costs, grads, paths = expected
    E, P, L, I, J = BATCH
    close(jax.jit(loss)(*BATCH), costs)
    close(jax.jit(GRAD)(*BATCH), grads)
    close(jax.value_and_grad(total, argnums=(0, 1))(*BATCH), (np.sum(costs), grads))
    close(jax.jit(vit)(E, P, I, J), paths)
    S = [np.stack([E + k for k in range(3)]), np.stack([P * (1 + k) for k in range(3)])]
    S += [np.stack([x] * 3) for x in (L, I, J)]
    each = [[a[k] for a in S] for k in range(3)]
    close(jax.jit(jax.vmap(loss))(*S), np.stack([loss(*x, impl=None) for x in each]))
    close(jax.vmap(GRAD)(*S), [np.stack(g) for g in zip(*[GRAD(*x, impl=None) for x in each])])
    close(jax.vmap(vit)(S[0], S[1], S[3], S[4]),
          np.stack([vit(x[0], x[1], x[3], x[4], impl=None) for x in each]))


@pytest.fixture
def mesh():
    return jax.make_mesh((4,), ("batch",))


def test_shard_map_and_sharded_jit(mesh, expected):
    costs, grads, paths = expected
    spec = PartitionSpec("batch")
    args = [jax.device_put(x, NamedSharding(mesh, spec)) for x in BATCH]
    vargs = [args[i] for i in (0, 1, 3, 4)]
    smap = lambda f, n: jax.shard_map(f, mesh=mesh, in_specs=(spec,) * n, out_specs=spec)
    close(jax.jit(smap(loss, 5))(*args), costs)
    grad = jax.jit(jax.grad(lambda e, p: smap(loss, 5)(e, p, *args[2:]).sum(), argnums=(0, 1)))
    close(grad(*args[:2]), grads)
    close(jax.jit(smap(vit, 4))(*vargs), paths)

    step = jax.jit(jax.value_and_grad(total, argnums=(0, 1)),
                   out_shardings=(NamedSharding(mesh, PartitionSpec()),
                                  (NamedSharding(mesh, spec),) * 2))
    close(step(*args), (np.sum(costs), grads))
    close(jax.jit(vit)(*vargs), paths)
    for f, a in ((step, args), (jax.jit(vit, out_shardings=NamedSharding(mesh, spec)), vargs)):
        hlo = f.lower(*a).compile().as_text()
        assert "all-gather" not in hlo and "all-to-all" not in hlo


# ---------------------------------------------------------------------------------------------
# Choosing the implementation.

def custom_calls(text):
    return [t for t in (_ffi.FORWARD, _ffi.BACKWARD, _ffi.VITERBI, _ffi.NORM_FORWARD,
                          _ffi.NORM_BACKWARD) if t in text]


def lowered_texts(impl, args=BATCH):
    E, P, L, I, J = args
    grad = jax.jit(lambda *a: GRAD(*a, impl=impl))
    return (grad.lower(*args).as_text(), jax.jit(lambda *a: vit(*a, impl=impl)).lower(E, P, I, J)
            .as_text())


def test_xla_lowering_holds_no_custom_call():
    for text in lowered_texts("xla"):
        assert custom_calls(text) == []
    if HAS_KERNELS:  # the check can fail: the default lowering on CPU holds the kernels
        assert all(custom_calls(text) for text in lowered_texts(None))


def test_auto_exports_for_tpu_without_custom_calls():
    # platform_dependent resolves at lowering: a TPU lowering holds the XLA branch only. (Export
    # would also refuse custom calls it does not know.)
    E, P, L, I, J = BATCH
    for f, args in ((lambda *a: GRAD(*a, impl=None), BATCH),
                    (lambda *a: vit(*a, impl=None), (E, P, I, J))):
        exported = jax.export.export(jax.jit(f), platforms=["tpu"])(*args)
        assert custom_calls(exported.mlir_module()) == []


@pytest.fixture
def without_kernels(monkeypatch):
    """This process as an install without compiled kernels would run it (fresh jit caches, so
    that cached traces with kernels are not reused)."""
    monkeypatch.setattr(_ffi, "_cpu", None)
    monkeypatch.setattr(_ffi, "_cuda", None)
    monkeypatch.setattr(_ffi, "_warned", set())
    jitted = (importlib.import_module("jax_transducer.loss")._costs,
              importlib.import_module("jax_transducer.viterbi")._viterbi)
    for f in jitted:
        f.clear_cache()
    yield
    for f in jitted:
        f.clear_cache()


def test_automatic_fallback_warns_once(expected, without_kernels):
    costs, grads, paths = expected
    E, P, L, I, J = BATCH
    with pytest.warns(RuntimeWarning, match="no compiled kernels for 'cpu'.*pure-XLA"):
        got = loss(*BATCH, impl=None)
    close(got, costs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: no second warning, for any function or shape
        close(GRAD(*BATCH, impl=None), grads)
        close(vit(E, P, I, J, impl=None), paths)
        close(jt.TransducerLoss(blank=2)(E[:3], P[:3], L[:3], I[:3], J[:3]), costs[:3])
        _ffi._warned.clear()  # explicitly chosen, the fallback never warns
        loss(E[:5], P[:5], L[:5], I[:5], J[:5], impl="xla")
    for text in lowered_texts(None):
        assert custom_calls(text) == []
    with pytest.raises(RuntimeError, match="impl='ffi' needs the compiled kernels for 'cpu'"):
        loss(*BATCH, impl="ffi")


def test_impl_values_and_build_info():
    with pytest.raises(ValueError, match="impl"):
        loss(*BATCH, impl="tpu")
    with pytest.raises(ValueError, match="impl"):
        jt.TransducerLoss(impl="XLA")
    with pytest.raises(ValueError, match="impl"):
        vit(*(BATCH[i] for i in (0, 1, 3, 4)), impl=1)
    info = jt.build_info()
    assert info["xla"] is True and info["cpu"] == HAS_KERNELS
    model = jt.TransducerLoss(blank=2, impl="xla")
    close(model(*BATCH), loss(*BATCH))


# ---------------------------------------------------------------------------------------------
# Memory.

def temp_bytes(f, *args):
    return jax.jit(f).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_memory_has_no_vocabulary_times_lattice_term():
    # Without a (B, T, U+1, V) tensor the temporaries are O(B*T*U + B*(T+U)*V) (plus the bounded
    # chunk of the normaliser's exact pass): from V = 512 to 1024 they may grow by a few
    # B*(T+U)*V-sized arrays (0.4 MB each here), not by a joiner's growth (8.7 MB).
    B, T, U = 2, 64, 32
    rng = np.random.default_rng(80)
    sizes = {}
    for V in (512, 1024):
        E = rng.normal(size=(B, T, V)).astype(np.float32)
        P = rng.normal(size=(B, U + 1, V)).astype(np.float32)
        labels = rng.integers(1, V, size=(B, U)).astype(np.int32)
        args = (E, P, labels, np.full(B, T, np.int32), np.full(B, U, np.int32))
        sizes[V] = temp_bytes(jax.value_and_grad(
            lambda e, p, *a: jt.transducer_loss(e, p, *a, impl="xla").sum(), argnums=(0, 1)),
            *args)
    growth = sizes[1024] - sizes[512]
    assert growth < 4 * (4 * B * (T + U + 1) * 512), sizes
    assert growth < (4 * B * T * (U + 1) * 512) / 8, sizes


@needs_kernels
def test_every_public_function_takes_impl():
    # The full-logits, pruned and alignment functions run on the same lattice calls: with
    # impl="xla" their lowering holds no custom call of ours and their values are the kernels'.
    E, P, L, I, J = make_batch(90, B=3, T=5, U=3, V=6, pad=0.0)
    logits = E[:, :, None, :] + P[:, None, :, :]
    ranges = np.zeros((3, 5), np.int32)
    calls = {
        "from_logits": lambda impl: jt.transducer_loss_from_logits(
            logits, L, I, J, impl=impl),
        "pruned": lambda impl: jt.pruned_transducer_loss(logits, ranges, L, I, J, impl=impl),
        "prune_ranges": lambda impl: jt.prune_ranges(E, P, L, I, J, 2, impl=impl),
        "align": lambda impl: jt.align(E, P, L, I, J, impl=impl),
        "align_from_logits": lambda impl: jt.align_from_logits(logits, L, I, J, impl=impl),
    }
    for name, f in calls.items():
        got, want = f("xla"), f("ffi")
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-9, err_msg=name)
        assert not custom_calls(jax.jit(lambda: f("xla")).lower().as_text()), name
