"""FFI targets: registration and the three ffi_call wrappers.

Every target takes lattice arrays shaped (B, T, U+1) and per-example arrays shaped (B, 1): the
trailing 1 keeps the batch partitioner from gathering arrays that have no non-batch dimension.
Leading dimensions are all batch to the kernels, which is how vmap (``broadcast_all``) folds
mapped axes into the batch.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.xla_metadata import set_xla_metadata

from . import _cpu

try:  # Built only where nvcc was found at install time.
    from . import _cuda
except ImportError:
    _cuda = None

FORWARD = "jax_transducer_forward"
BACKWARD = "jax_transducer_backward"
VITERBI = "jax_transducer_viterbi"

for _module, _platform in ((_cpu, "cpu"), (_cuda, "CUDA")):
    if _module is not None:
        for _name, _capsule in _module.registrations().items():
            jax.ffi.register_ffi_target(_name, _capsule, platform=_platform)
for _name in (FORWARD, BACKWARD, VITERBI):
    jax.ffi.register_ffi_target_as_batch_partitionable(_name)


def _call(name, result_shapes, *args, **attrs):
    # num_batch_dims tells the batch partitioner that the leading axis may be split across devices.
    with set_xla_metadata(num_batch_dims="1"):
        return jax.ffi.ffi_call(name, result_shapes, vmap_method="broadcast_all")(*args, **attrs)


def forward(blank_lp, emit_lp, input_lengths, label_lengths):
    """Costs (B, 1) and alpha (B, T, U+1) of the lattices."""
    return _call(
        FORWARD,
        (jax.ShapeDtypeStruct(input_lengths.shape, blank_lp.dtype),
         jax.ShapeDtypeStruct(blank_lp.shape, blank_lp.dtype)),
        blank_lp, emit_lp, input_lengths, label_lengths)


def backward(blank_lp, emit_lp, alpha, costs, input_lengths, label_lengths):
    """Posterior flows of the blank and label moves, (B, T, U+1) each, zero outside lattices."""
    out = jax.ShapeDtypeStruct(blank_lp.shape, blank_lp.dtype)
    return _call(BACKWARD, (out, out), blank_lp, emit_lp, alpha, costs, input_lengths,
                 label_lengths)


def viterbi_path(blank_lp, best_lp, best_label, input_lengths, label_lengths, blank):
    """Labels emitted along the best path, (B, U+1) int32 (the last column is always blank)."""
    path, _decisions = _call(
        VITERBI,
        (jax.ShapeDtypeStruct(blank_lp.shape[:-2] + blank_lp.shape[-1:], jnp.int32),
         jax.ShapeDtypeStruct(blank_lp.shape, jnp.uint8)),
        blank_lp, best_lp, best_label, input_lengths, label_lengths, blank=np.int32(blank))
    return path


def has_cuda():
    return _cuda is not None
