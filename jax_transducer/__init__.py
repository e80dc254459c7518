"""jax_transducer: RNN-Transducer loss and viterbi for JAX, as XLA FFI custom calls.

    costs = transducer_loss(emissions, predictions, labels, input_lengths, label_lengths)
    best = viterbi(emissions, predictions, input_lengths, label_lengths)
    costs = transducer_loss_from_logits(logits, labels, input_lengths, label_lengths)
    frames = align(emissions, predictions, labels, input_lengths, label_lengths)
    ranges = prune_ranges(emissions, predictions, labels, input_lengths, label_lengths, s_range)
    costs = pruned_transducer_loss(pruned_logits, ranges, labels, input_lengths, label_lengths)
"""

from . import _ffi
from .align import align, align_from_logits
from .logits import transducer_loss_from_logits
from .loss import TransducerLoss, transducer_loss
from .pruned import prune_joiner_inputs, prune_ranges, pruned_transducer_loss
from .viterbi import viterbi

__version__ = "0.1.0"
__all__ = ["transducer_loss", "viterbi", "TransducerLoss", "build_info", "__version__",
           "transducer_loss_from_logits", "align", "align_from_logits", "prune_ranges",
           "prune_joiner_inputs", "pruned_transducer_loss"]


def build_info():
    """What this install holds: {"cpu": bool, "cuda": bool, "xla": True, "version": str}.

    "cpu" and "cuda" say whether the compiled kernels for that platform are there; "xla" that the
    pure-XLA implementation (impl="xla", and impl=None on platforms without kernels) is, always.
    """
    return {"cpu": _ffi.has_cpu(), "cuda": _ffi.has_cuda(), "xla": True, "version": __version__}
