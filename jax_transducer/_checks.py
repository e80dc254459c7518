"""Argument checks: shapes and dtypes at trace time, values when they are concrete.

Inside jit the values are unknown, so `valid_examples` computes the same rules as a (B,) mask: the
loss gives an invalid example a NaN cost and zero gradient, viterbi an all-blank row.
"""

import operator

import jax
import jax.numpy as jnp
import numpy as np

FLOAT_DTYPES = (jnp.float32, jnp.float64, jnp.bfloat16, jnp.float16)


def _shape_error(name, expected, actual):
    return ValueError(f"{name}: expected shape {expected}, got {tuple(actual)}")


def concrete(x):
    """The value of x as a NumPy array, or None while it is traced."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _as_int32(name, x, ndim):
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name}: expected an integer array, got dtype {x.dtype}")
    if x.ndim != ndim:
        raise ValueError(f"{name}: expected rank {ndim}, got shape {x.shape}")
    return x.astype(jnp.int32)


def check_float_array(name, x, ndim):
    """x as an array of one of FLOAT_DTYPES and rank ndim (TypeError / ValueError otherwise)."""
    x = jnp.asarray(x)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected float32, float64, bfloat16 or float16, got dtype "
                        f"{x.dtype}")
    if x.ndim != ndim:
        raise ValueError(f"{name}: expected rank {ndim}, got shape {x.shape}")
    return x


def check_scores(emissions, predictions):
    """Checks the float inputs; returns them as arrays and (B, T, U, V)."""
    emissions = check_float_array("emissions", emissions, 3)
    predictions = check_float_array("predictions", predictions, 3)
    if emissions.dtype != predictions.dtype:
        raise TypeError(f"predictions: expected dtype {emissions.dtype} (as emissions), "
                        f"got {predictions.dtype}")
    B, T, V = emissions.shape
    if predictions.shape[0] != B or predictions.shape[2] != V or predictions.shape[1] < 1:
        raise _shape_error("predictions", f"({B}, U+1 >= 1, {V})", predictions.shape)
    if T < 1 or V < 1:
        raise _shape_error("emissions", "(B, T >= 1, V >= 1)", emissions.shape)
    return emissions, predictions, dims_of(emissions, predictions)


def check_logits(logits):
    """Checks full joiner logits (B, T, U+1, V); returns them as an array and (B, T, U, V)."""
    logits = check_float_array("logits", logits, 4)
    B, T, U1, V = logits.shape
    if T < 1 or U1 < 1 or V < 1:
        raise _shape_error("logits", "(B, T >= 1, U+1 >= 1, V >= 1)", logits.shape)
    return logits, (B, T, U1 - 1, V)


def check_int_array(name, x, shape):
    """x as an int32 array of the given shape (TypeError / ValueError otherwise)."""
    x = _as_int32(name, x, len(shape))
    if x.shape != tuple(shape):
        raise _shape_error(name, tuple(shape), x.shape)
    return x


def dims_of(emissions, predictions):
    """(B, T, U, V) of checked scores."""
    B, T, V = emissions.shape
    return B, T, predictions.shape[1] - 1, V


def compute_dtype(dtype):
    """Inside, everything runs in float32 at least: bfloat16 and float16 are widened (their
    gradients come back in their own dtype through the cast)."""
    return jnp.promote_types(dtype, jnp.float32)


def check_blank(blank, V):
    try:
        blank = operator.index(blank)
    except TypeError:
        raise TypeError(f"blank: expected a Python int, got {type(blank).__name__}") from None
    if not 0 <= blank < V:
        raise ValueError(f"blank: expected an index in [0, {V}), got {blank}")
    return blank


def check_float(name, value, minimum=None):
    """A static option: a finite Python float (at least `minimum`)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name}: expected a Python float, got {type(value).__name__}")
    value = float(value)
    if not np.isfinite(value) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ValueError(f"{name}: expected a finite float{bound}, got {value}")
    return value


def check_lengths(input_lengths, label_lengths, dims):
    B, T, U, _ = dims
    input_lengths = _as_int32("input_lengths", input_lengths, 1)
    label_lengths = _as_int32("label_lengths", label_lengths, 1)
    for name, x in (("input_lengths", input_lengths), ("label_lengths", label_lengths)):
        if x.shape != (B,):
            raise _shape_error(name, (B,), x.shape)
    for name, x, lo, hi in (("input_lengths", input_lengths, 1, T),
                            ("label_lengths", label_lengths, 0, U)):
        value = concrete(x)
        if value is not None and value.size and not ((value >= lo) & (value <= hi)).all():
            bad = int(np.flatnonzero((value < lo) | (value > hi))[0])
            raise ValueError(f"{name}: expected values in [{lo}, {hi}], got {value[bad]} "
                             f"at example {bad}")
    return input_lengths, label_lengths


def check_labels(labels, label_lengths, dims):
    B, _, U, V = dims
    labels = _as_int32("labels", labels, 2)
    if labels.shape != (B, U):
        raise _shape_error("labels", f"({B}, {U}) (U from predictions' U+1)", labels.shape)
    value, lengths = concrete(labels), concrete(label_lengths)
    if value is not None and lengths is not None:
        used = np.arange(U)[None, :] < lengths[:, None]
        bad = used & ((value < 0) | (value >= V))
        if bad.any():
            b, u = map(int, np.argwhere(bad)[0])
            raise ValueError(f"labels: expected values in [0, {V}) where u < label_lengths, got "
                             f"{value[b, u]} at example {b}, position {u}")
    return labels


def valid_examples(input_lengths, label_lengths, dims, labels=None):
    """(B,) bool: the examples whose lengths (and labels, if given) are in range."""
    _, T, U, V = dims
    ok = (input_lengths >= 1) & (input_lengths <= T) & (label_lengths >= 0) & (label_lengths <= U)
    if labels is not None:
        used = jnp.arange(U) < label_lengths[:, None]
        ok &= jnp.all(~used | ((labels >= 0) & (labels < V)), axis=1)
    return ok


REDUCTIONS = ("none", "sum", "mean")


def check_options(reduction, fastemit_lambda, delay_penalty):
    """The losses' shared options: -> (fastemit_lambda, delay_penalty) as Python floats."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    return (check_float("fastemit_lambda", fastemit_lambda, minimum=0.0),
            check_float("delay_penalty", delay_penalty))
