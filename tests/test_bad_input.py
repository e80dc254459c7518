"""Bad input: clear errors at trace time and in eager calls; inside jit, NaN for that example only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_transducer as jt
from jax_transducer import _ffi
from util import make_batch, put

E, P, LABELS, IN_LEN, LAB_LEN = make_batch(60, B=4, T=6, U=4, V=7, pad=0.0)
B, T, V = E.shape
U = P.shape[1] - 1


def arguments(**changes):
    return {**dict(emissions=E, predictions=P, labels=LABELS, input_lengths=IN_LEN,
                   label_lengths=LAB_LEN), **changes}


def call(**changes):
    return jt.transducer_loss(**arguments(**changes))


@pytest.mark.parametrize("changes,error,words", [
    (dict(emissions=E[0]), ValueError, "emissions: expected rank 3"),
    (dict(predictions=P[..., :-1]), ValueError, "predictions: expected shape"),
    (dict(predictions=P[:2]), ValueError, "predictions: expected shape"),
    (dict(labels=LABELS[:, :-1]), ValueError, "labels: expected shape"),
    (dict(labels=np.zeros((B, U + 1), np.int32)), ValueError, "labels: expected shape"),
    (dict(labels=LABELS.astype(np.float32)), TypeError, "labels: expected an integer"),
    (dict(input_lengths=IN_LEN[:2]), ValueError, "input_lengths: expected shape"),
    (dict(label_lengths=LAB_LEN[:, None]), ValueError, "label_lengths: expected rank 1"),
    (dict(emissions=E.astype(np.int32)), TypeError, "emissions: expected float32, float64"),
    (dict(predictions=P.astype(np.float32)), TypeError, "predictions: expected dtype float64"),
    (dict(emissions=E[:, :0]), ValueError, "emissions: expected shape"),
])
def test_trace_time_errors_name_the_argument(changes, error, words):
    with pytest.raises(error, match=words):
        call(**changes)
    with pytest.raises(error, match=words):  # the same inside jit
        jax.jit(lambda: call(**changes))()


@pytest.mark.parametrize("blank,error", [(-1, ValueError), (V, ValueError), (1.0, TypeError)])
def test_blank_out_of_range(blank, error):
    with pytest.raises(error, match="blank"):
        jt.transducer_loss(E, P, LABELS, IN_LEN, LAB_LEN, blank=blank)
    with pytest.raises(error, match="blank"):
        jt.viterbi(E, P, IN_LEN, LAB_LEN, blank=blank)


def test_unknown_reduction():
    with pytest.raises(ValueError, match="reduction"):
        call(reduction="average")
    with pytest.raises(ValueError, match="reduction"):
        jt.TransducerLoss(reduction="max")


def with_value(a, index, value):
    a = a.copy()
    a[index] = value
    return a


BAD_VALUES = [
    ("input_lengths", dict(input_lengths=with_value(IN_LEN, 1, 0))),
    ("input_lengths", dict(input_lengths=with_value(IN_LEN, 1, T + 1))),
    ("label_lengths", dict(label_lengths=with_value(LAB_LEN, 1, -1))),
    ("label_lengths", dict(label_lengths=with_value(LAB_LEN, 1, U + 1))),
    ("labels", dict(labels=with_value(LABELS, (0, 0), V))),
    ("labels", dict(labels=with_value(LABELS, (0, U - 1), -3))),
]


@pytest.mark.parametrize("name,changes", BAD_VALUES)
def test_eager_value_errors(name, changes):
    with pytest.raises(ValueError, match=name):
        call(**changes)
    if name != "labels":
        args = arguments(**changes)
        with pytest.raises(ValueError, match=name):
            jt.viterbi(E, P, args["input_lengths"], args["label_lengths"])


def test_labels_past_label_length_may_hold_anything():
    labels = LABELS.copy()
    for b in range(B):
        labels[b, LAB_LEN[b]:] = -(10**6)
    np.testing.assert_array_equal(call(labels=labels), call())


@pytest.mark.parametrize("name,changes", BAD_VALUES)
def test_inside_jit_an_invalid_example_gets_nan_and_zero_gradient(device, name, changes):
    bad = 0 if name == "labels" else 1
    e, p, l, i, j = put(device, *arguments(**changes).values())
    f = jax.jit(jt.transducer_loss)
    costs = np.asarray(f(e, p, l, i, j))
    gE, gP = jax.jit(jax.grad(lambda *a: f(*a).sum(), argnums=(0, 1)))(e, p, l, i, j)
    good = np.arange(B) != bad
    assert np.isnan(costs[bad])
    np.testing.assert_array_equal(costs[good], np.asarray(call())[good])
    assert (np.asarray(gE)[bad] == 0).all() and (np.asarray(gP)[bad] == 0).all()
    gE0, gP0 = jax.grad(lambda e, p: call(emissions=e, predictions=p).sum(), argnums=(0, 1))(E, P)
    np.testing.assert_allclose(np.asarray(gE)[good], np.asarray(gE0)[good], rtol=1e-12)
    np.testing.assert_allclose(np.asarray(gP)[good], np.asarray(gP0)[good], rtol=1e-12)
    if name != "labels":
        paths = np.asarray(jax.jit(jt.viterbi)(e, p, i, j))
        assert (paths[bad] == 0).all()
        np.testing.assert_array_equal(paths[good], np.asarray(jt.viterbi(E, P, IN_LEN, LAB_LEN))[good])


@pytest.mark.parametrize("in_len,lab_len", [(-7, 2), (2**31 - 1, 1), (3, -2**31), (3, 2**30),
                                            (0, 0), (T + 1, 0)])
def test_kernels_never_index_with_invalid_lengths(device, in_len, lab_len):
    # The kernels guard their own bounds, whatever the Python layer passes them.
    shape = (2, T, U + 1)
    rng = np.random.default_rng(61)
    blank_lp, emit_lp = put(device, -rng.random(shape), -rng.random(shape))
    il = jnp.asarray([[in_len], [T]], jnp.int32)
    ll = jnp.asarray([[lab_len], [U]], jnp.int32)
    costs, alpha = _ffi.forward(blank_lp, emit_lp, il, ll)
    fb, fe = _ffi.backward(blank_lp, emit_lp, alpha, costs, il, ll)
    frames = _ffi.viterbi_frames(blank_lp, emit_lp, il, ll)
    assert np.isnan(np.asarray(costs)[0, 0]) and np.isfinite(np.asarray(costs)[1, 0])
    assert (np.asarray(fb)[0] == 0).all() and (np.asarray(fe)[0] == 0).all()
    assert (np.asarray(frames)[0] == _ffi.NO_FRAME).all()
    assert (np.diff(np.asarray(frames)[1, :U]) >= 0).all() and (np.asarray(frames)[1, :U] >= 0).all()


@pytest.mark.parametrize("name,value,error", [
    ("fastemit_lambda", -0.1, ValueError), ("fastemit_lambda", np.nan, ValueError),
    ("delay_penalty", np.inf, ValueError), ("delay_penalty", "0.1", TypeError),
    ("fastemit_lambda", np.ones(2), TypeError),
])
def test_bad_options(name, value, error):
    with pytest.raises(error, match=name):
        call(**{name: value})
