"""FFI targets: registration and the three kernel calls.

Every call takes lattice arrays shaped (B, T, U+1) and per-example arrays shaped (B, 1) (a
trailing axis: the batch partitioner gathers arrays with no dimension beyond the batch). Three
things make the calls compose with JAX's transforms:
- vmap: mapped axes are folded into B (`custom_vmap`), so the kernels run once per call;
- sharded jit: the targets are batch partitionable (`num_batch_dims`), and a Shardy sharding rule
  (the `xla.sdy.sharding_rule` frontend attribute) lets the batch sharding propagate through the
  results instead of gathering them;
- shard_map: the results are typed as varying along the same mesh axes as the inputs.
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
BEST_LABELS = "jax_transducer_best_labels"  # CPU only: on GPUs an XLA reduction does this well

for _module, _platform in ((_cpu, "cpu"), (_cuda, "CUDA")):
    if _module is not None:
        for _name, _capsule in _module.registrations().items():
            jax.ffi.register_ffi_target(_name, _capsule, platform=_platform)
for _name in (FORWARD, BACKWARD, VITERBI, BEST_LABELS):
    jax.ffi.register_ffi_target_as_batch_partitionable(_name)


def has_cuda():
    return _cuda is not None


def _varying_axes(x):
    """The shard_map axes along which x varies (empty outside shard_map or with check_vma off)."""
    aval = jax.typeof(x)
    axes = getattr(aval, "vma", None)  # the attribute's name differs across jax versions
    if axes is None:
        axes = getattr(getattr(aval, "mat", None), "varying", ())
    return frozenset(axes or ())


def _to_varying(x, axes):
    missing = tuple(sorted(axes - _varying_axes(x)))
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def _sharding_rule(operands, results):
    """Shardy rule: axis 0 is the batch everywhere; every other axis stays whole."""
    letters = iter("jklmnopqrstuvwxyz")
    factors = {}  # size -> factor; equal sizes may share one, as none is ever split
    for a in (*operands, *results):
        for size in a.shape[1:]:
            if size not in factors:
                factors[size] = next(letters)
    spec = lambda a: "[" + ", ".join(["i"] + [factors[s] for s in a.shape[1:]]) + "]"
    sizes = ", ".join([f"i={operands[0].shape[0]}"] + [f"{f}={s}" for s, f in factors.items()])
    replicated = (" need_replication={" + ", ".join(factors.values()) + "}") if factors else ""
    return (f"#sdy.op_sharding_rule<({', '.join(map(spec, operands))})->"
            f"({', '.join(map(spec, results))}) {{{sizes}}}{replicated}, custom>")


def _kernel(name, result_shapes, **attrs):
    """A kernel call f(*arrays) -> tuple of arrays, all with a leading batch axis.

    result_shapes(*arrays) gives the results' ShapeDtypeStructs.
    """

    def call(*args):
        results = result_shapes(*args)
        axes = frozenset().union(*map(_varying_axes, args))
        args = [_to_varying(a, axes) for a in args]
        metadata = {"num_batch_dims": "1", "xla.sdy.sharding_rule": _sharding_rule(args, results)}
        with set_xla_metadata(**metadata):
            out = jax.ffi.ffi_call(name, results, vmap_method="broadcast_all")(*args, **attrs)
        return tuple(_to_varying(r, axes) for r in out)

    call = jax.custom_batching.custom_vmap(call)

    @call.def_vmap
    def _fold_mapped_axis(axis_size, in_batched, *args):
        args = [a if b else jnp.broadcast_to(a, (axis_size,) + a.shape)
                for a, b in zip(args, in_batched)]
        out = call(*[a.reshape((-1,) + a.shape[2:]) for a in args])
        return (tuple(o.reshape((axis_size, -1) + o.shape[1:]) for o in out),
                (True,) * len(out))

    return call


def _like(x, dtype=None, shape=None):
    return jax.ShapeDtypeStruct(x.shape if shape is None else shape, dtype or x.dtype)


_forward = _kernel(FORWARD, lambda bl, em, il, ll: (_like(il, bl.dtype), _like(bl)))
_backward = _kernel(BACKWARD, lambda bl, em, al, co, il, ll: (_like(bl), _like(bl)))


def forward(blank_lp, emit_lp, input_lengths, label_lengths):
    """Costs (B, 1) and alpha (B, T, U+1) of the lattices."""
    return _forward(blank_lp, emit_lp, input_lengths, label_lengths)


def backward(blank_lp, emit_lp, alpha, costs, input_lengths, label_lengths):
    """Posterior flows of the blank and label moves, (B, T, U+1) each, zero outside lattices."""
    return _backward(blank_lp, emit_lp, alpha, costs, input_lengths, label_lengths)


def _viterbi_results(bl, best, best_label, il, ll):
    return (_like(bl, jnp.int32, bl.shape[:1] + bl.shape[2:]), _like(bl, jnp.uint8))


def viterbi_path(blank_lp, best_lp, best_label, input_lengths, label_lengths, blank):
    """Labels emitted along the best path, (B, U+1) int32 (the last column is always blank)."""
    call = _kernel(VITERBI, _viterbi_results, blank=np.int32(blank))
    return call(blank_lp, best_lp, best_label, input_lengths, label_lengths)[0]


def best_labels(emissions, predictions, blank):
    """Max and argmax over v != blank of emissions[b,t,v] + predictions[b,u,v]: (B, T, U+1) each.
    CPU only."""
    def results(e, p):
        cells = e.shape[:2] + p.shape[1:2]
        return (_like(e, shape=cells), _like(e, jnp.int32, cells))
    return _kernel(BEST_LABELS, results, blank=np.int32(blank))(emissions, predictions)
