"""The kernel calls, as FFI targets or in pure XLA (_xla.py), and the choice between them: the
lattice's forward, backward and viterbi, and on CPU the normaliser's fused forward and backward
and viterbi's labels.

`impl` (every public call takes it, trailing) picks the implementation: None or "auto" use the
compiled kernels on the platforms this install has them for (`jax.lax.platform_dependent`, so that
a lowering for any other platform, TPU say, holds no custom call of ours) and the pure-XLA
recursion elsewhere; "ffi" requires the kernels; "xla" always takes the pure-XLA path.

Every call takes lattice arrays shaped (B, T, U+1) and per-example arrays shaped (B, 1) (a
trailing axis: the batch partitioner gathers arrays with no dimension beyond the batch). Three
things make the kernel calls compose with JAX's transforms (the XLA ones do by construction):
- vmap: mapped axes are folded into B (`custom_vmap`), so the kernels run once per call;
- sharded jit: the targets are batch partitionable (`num_batch_dims`), and a Shardy sharding rule
  (the `xla.sdy.sharding_rule` frontend attribute) lets the batch sharding propagate through the
  results instead of gathering them;
- shard_map: the results are typed as varying along the same mesh axes as the inputs.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.xla_metadata import set_xla_metadata

from . import _xla
from ._vma import to_varying, varying_axes

try:  # An install may lack the compiled kernels (built without a C++ compiler): XLA then.
    from . import _cpu
except ImportError:
    _cpu = None

try:  # Built only where nvcc was found at install time.
    from . import _cuda
except ImportError:
    _cuda = None

FORWARD = "jax_transducer_forward"
BACKWARD = "jax_transducer_backward"
VITERBI = "jax_transducer_viterbi"
NORM_FORWARD = "jax_transducer_norm_forward"  # CPU only (float32): on GPUs XLA dots and fusions
NORM_BACKWARD = "jax_transducer_norm_backward"
NORM_VITERBI = "jax_transducer_norm_viterbi"
BEST_LABELS = "jax_transducer_best_labels"

for _module, _platform in ((_cpu, "cpu"), (_cuda, "CUDA")):
    if _module is not None:
        for _name, _capsule in _module.registrations().items():
            jax.ffi.register_ffi_target(_name, _capsule, platform=_platform)
for _name in (FORWARD, BACKWARD, VITERBI, NORM_FORWARD, NORM_BACKWARD, NORM_VITERBI, BEST_LABELS):
    jax.ffi.register_ffi_target_as_batch_partitionable(_name)


def has_cpu():
    return _cpu is not None


def has_cuda():
    return _cuda is not None


def has_cpu_normalizer():
    return _cpu is not None and NORM_FORWARD in _cpu.registrations()


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
        axes = varying_axes(*args)
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


_viterbi_call = _kernel(VITERBI, lambda bl, la, il, ll: (
    _like(bl, jnp.int32, bl.shape[:1] + bl.shape[2:]), _like(bl, jnp.uint8)))
_viterbi = lambda *args: _viterbi_call(*args)[0]


# ---------------------------------------------------------------------------------------------
# The choice of implementation.

IMPLS = ("auto", "ffi", "xla")


def check_impl(impl):
    """None or one of IMPLS -> one of IMPLS."""
    if impl is None:
        return "auto"
    if not isinstance(impl, str) or impl not in IMPLS:
        raise ValueError(f"impl: expected None, 'auto', 'ffi' or 'xla', got {impl!r}")
    return impl


def kernel_platforms():
    """The platforms (as platform_dependent names them) this install has compiled kernels for."""
    return tuple(p for p, m in (("cpu", _cpu), ("cuda", _cuda)) if m is not None)


def _default_platform():
    """jax's default backend, named as platform_dependent names it."""
    backend = jax.default_backend()
    return "cuda" if backend == "gpu" else backend


_warned = set()  # platforms the fallback warning was given for


def _choose(impl, kernel, fallback):
    """f(*args) running `kernel` or `fallback` as `impl` says.

    The platform is known only at lowering; the trace-time warning (auto) and error (ffi) go by
    jax's default backend, where computations run unless their inputs are placed elsewhere.
    """
    impl = check_impl(impl)
    if impl == "xla":
        return fallback
    platforms = kernel_platforms()
    platform = _default_platform()
    if impl == "ffi":
        if platform not in platforms:
            raise RuntimeError(
                f"jax_transducer: impl='ffi' needs the compiled kernels for {platform!r}, and this "
                f"install has them for {list(platforms)}; use impl='xla' (or None) for the "
                "pure-XLA implementation")
        return kernel
    if platform not in platforms and platform not in _warned:
        _warned.add(platform)
        warnings.warn(
            f"jax_transducer: no compiled kernels for {platform!r} in this install; using the "
            "pure-XLA implementation (slower on CPU and GPU). Pass impl='xla' to choose it "
            "explicitly.", RuntimeWarning, stacklevel=2)
    if not platforms:
        return fallback
    return lambda *args: jax.lax.platform_dependent(
        *args, default=fallback, **{p: kernel for p in platforms})


def forward(blank_lp, emit_lp, input_lengths, label_lengths, impl=None):
    """Costs (B, 1) and alpha (B, T, U+1) of the lattices (alpha -inf outside them).

    An example whose lengths do not fit the arrays (input length outside [1, T], label length
    outside [0, U]) gets a NaN cost."""
    return _choose(impl, _forward, _xla.forward)(blank_lp, emit_lp, input_lengths, label_lengths)


def backward(blank_lp, emit_lp, alpha, costs, input_lengths, label_lengths, impl=None):
    """Posterior flows of the blank and label moves, (B, T, U+1) each, zero outside lattices and
    for invalid examples."""
    return _choose(impl, _backward, _xla.backward)(
        blank_lp, emit_lp, alpha, costs, input_lengths, label_lengths)


NO_FRAME = _xla.NO_FRAME


def viterbi_frames(blank_lp, label_lp, input_lengths, label_lengths, impl=None):
    """The best path through the lattice whose blank moves score blank_lp and label moves label_lp
    (B, T, U+1): per label position u, the frame t of its label move (t, u) -> (t, u+1), (B, U+1)
    int32; NO_FRAME past label_length (so the last column always) and for an invalid example's
    whole row. Ties go to the blank arrival."""
    return _choose(impl, _viterbi, _xla.viterbi_frames)(
        blank_lp, label_lp, input_lengths, label_lengths)


def _cells(e, p, *_):
    return _like(e, shape=e.shape[:2] + p.shape[1:2])


def norm_forward(emissions, predictions, e_rows, p_rows, labels, blank):
    """CPU, float32. The move log-probabilities blank_lp and emit_lp (labels (B, U+1) int32), and
    for the gradient log_norm, S = exp(E - mE) @ exp(P - mP)^T (these four (B, T, U+1)) and the
    row maxima mE (B, T), mP (B, U+1) (lib/cpu/normalizer_cpu.h). Only the first e_rows[b, 0] rows
    of E and p_rows[b, 0] rows of P are read; the others count as absent (their cells and maxima
    are 0)."""
    results = lambda e, p, *_: (*[_cells(e, p)] * 4, _like(e, shape=e.shape[:2]),
                                _like(p, shape=p.shape[:2]))
    return _kernel(NORM_FORWARD, results, blank=np.int32(blank))(emissions, predictions, e_rows,
                                                                   p_rows, labels)


def norm_viterbi(emissions, predictions, e_rows, p_rows, blank):
    """CPU, float32. Viterbi's move log-probabilities, (B, T, U+1) each: the blank move's and the
    best non-blank label's, max_{v != blank} (E + P) - log_norm (lib/cpu/normalizer_cpu.h). Rows
    as in `norm_forward`; cells outside them are 0."""
    results = lambda e, p, *_: (_cells(e, p), _cells(e, p))
    return _kernel(NORM_VITERBI, results, blank=np.int32(blank))(emissions, predictions, e_rows,
                                                                   p_rows)


def best_labels(emissions, predictions, frames, blank):
    """CPU, float32. Viterbi's labels (B, U) int32 at its label moves: the first argmax over
    v != blank of E[b, t, v] + P[b, u, v] (the first NaN if any) where t = frames[b, u] (B, U) is
    a frame, the blank where it is not (NO_FRAME)."""
    results = lambda e, p, f: (_like(f),)
    return _kernel(BEST_LABELS, results, blank=np.int32(blank))(emissions, predictions, frames)[0]


def norm_backward(emissions, predictions, e_rows, p_rows, max_e, w, g_blank, g_emit, log_norm,
                  g_exact, labels, blank):
    """CPU, float32. dE (B, T, V) and dP (B, U+1, V) of the move log-probabilities for their
    cotangents g_blank, g_emit (B, T, U+1), with W = -(g_blank + g_emit) / S where S is exact and
    g_exact = -(g_blank + g_emit) (0 elsewhere) where the share comes from the scores and log_norm
    (B, T, U+1); labels (B, U+1)."""
    def results(e, p, *_):
        return (_like(e), _like(p))
    call = _kernel(NORM_BACKWARD, results, blank=np.int32(blank))
    return call(emissions, predictions, e_rows, p_rows, max_e, w, g_blank, g_emit, log_norm,
                g_exact, labels)
