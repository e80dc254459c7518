"""FFI targets: registration and the kernel calls (the lattice's forward, backward and viterbi;
on CPU also the normaliser's fused forward and backward).

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
NORM_FORWARD = "jax_transducer_norm_forward"  # CPU only (float32): on GPUs XLA dots and fusions
NORM_BACKWARD = "jax_transducer_norm_backward"

for _module, _platform in ((_cpu, "cpu"), (_cuda, "CUDA")):
    if _module is not None:
        for _name, _capsule in _module.registrations().items():
            jax.ffi.register_ffi_target(_name, _capsule, platform=_platform)
for _name in (FORWARD, BACKWARD, VITERBI, NORM_FORWARD, NORM_BACKWARD):
    jax.ffi.register_ffi_target_as_batch_partitionable(_name)


def has_cuda():
    return _cuda is not None


def has_cpu_normalizer():
    return NORM_FORWARD in _cpu.registrations()


def varying_axes(x):
    """The shard_map axes along which x varies (empty outside shard_map or with check_vma off)."""
    aval = jax.typeof(x)
    axes = getattr(aval, "vma", None)  # the attribute's name differs across jax versions
    if axes is None:
        axes = getattr(getattr(aval, "mat", None), "varying", ())
    return frozenset(axes or ())


def to_varying(x, axes):
    missing = tuple(sorted(axes - varying_axes(x)))
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
        axes = frozenset().union(*map(varying_axes, args))
        args = [to_varying(a, axes) for a in args]
        metadata = {"num_batch_dims": "1", "xla.sdy.sharding_rule": _sharding_rule(args, results)}
        with set_xla_metadata(**metadata):
            out = jax.ffi.ffi_call(name, results, vmap_method="broadcast_all")(*args, **attrs)
        return tuple(to_varying(r, axes) for r in out)

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


def viterbi_path(blank_lp, best_lp, best_label, input_lengths, label_lengths, fill):
    """best_label[b, t, u] at each label move (t, u) of the best path, per label position u:
    (B, U+1) int32, `fill` past label_length (so the last column always) and for an invalid
    example."""
    call = _kernel(VITERBI, _viterbi_results, blank=np.int32(fill))
    return call(blank_lp, best_lp, best_label, input_lengths, label_lengths)[0]


def norm_forward(emissions, predictions, e_rows, p_rows, blank, with_best):
    """CPU, float32. S = exp(E - mE) @ exp(P - mP)^T (B, T, U+1), mE (B, T), mP (B, U+1), and with
    with_best the largest product over v != blank (B, T, U+1; else a (B, 1, 1) placeholder). Only
    the first e_rows[b, 0] rows of E and p_rows[b, 0] rows of P are read; the others count as
    absent (S, products and maxima 0)."""
    def results(e, p, er, pr):
        B, T, _ = e.shape
        U1 = p.shape[1]
        cells = _like(e, shape=(B, T, U1))
        return (cells, _like(e, shape=(B, T)), _like(e, shape=(B, U1)),
                cells if with_best else _like(e, shape=(B, 1, 1)))
    call = _kernel(NORM_FORWARD, results, blank=np.int32(blank), with_best=bool(with_best))
    return call(emissions, predictions, e_rows, p_rows)


def norm_backward(emissions, predictions, e_rows, p_rows, max_e, w, g_blank, g_emit, labels,
                  blank):
    """CPU, float32. dE (B, T, V) and dP (B, U+1, V) of the move log-probabilities for their
    cotangents g_blank, g_emit (B, T, U+1), with W = -(g_blank + g_emit) / S; labels (B, U+1)."""
    def results(e, p, *_):
        return (_like(e), _like(p))
    call = _kernel(NORM_BACKWARD, results, blank=np.int32(blank))
    return call(emissions, predictions, e_rows, p_rows, max_e, w, g_blank, g_emit, labels)
