"""One process of tests/test_multiprocess.py's job (float64):

    python tests/multiprocess_worker.py OUT_DIR --process-id I --num-processes N --coordinator H:P

Runs examples/multiprocess_train.py's train step on BATCH, batch-sharded over every device of every
process, and writes what it sees to OUT_DIR/process_<I>.npz: the global per-example arrays
(gathered from all processes) and this process's copy of the replicated ones.
"""

import os
import re
import sys

import numpy as np

STEPS, LEARNING_RATE = 3, 0.1
B, T, U, V, F, H = 8, 9, 4, 7, 3, 5
INVALID = 6  # an example of the last process, with an input length past T


def batch():
    """The global batch (NumPy). With 2 processes, process 0 holds rows 0-3 (long inputs) and
    process 1 rows 4-7 (short inputs, one invalid example). Padding holds finite junk, labels
    past label_length hold out-of-range values: neither may change any result."""
    rng = np.random.default_rng(8)
    input_lengths = np.array([9, 8, 9, 7, 2, 1, T + 2, 4], np.int32)
    label_lengths = np.array([4, 0, 2, 4, 3, 4, 2, 0], np.int32)
    features = rng.normal(size=(B, T, F))
    labels = rng.integers(1, V, size=(B, U)).astype(np.int32)
    for b in range(B):
        features[b, input_lengths[b]:] = 100.0
        labels[b, label_lengths[b]:] = [-5, V, 10**6, 3][b % 4]
    return dict(features=features, labels=labels, input_lengths=input_lengths,
                label_lengths=label_lengths)


def params():
    from examples.multiprocess_train import init_params
    return init_params(1, F, H, V, dtype=np.float64)


def main(argv):
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--coordinator", required=True)
    args = parser.parse_args(argv)

    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec

    import jax_transducer as jt
    from examples import multiprocess_train as ex

    ex.initialize(args.coordinator, args.num_processes, args.process_id)
    assert jax.process_count() == args.num_processes
    mesh = ex.batch_mesh()
    rows = ex.local_rows(NamedSharding(mesh, PartitionSpec("batch")), B)
    local = ex.shard_batch(mesh, {k: v[rows] for k, v in batch().items()})
    state = ex.replicate(mesh, params())

    gather = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
    out = {"rows": np.array([rows.start, rows.stop]), "devices": np.array(jax.device_count())}
    # The compiled step: which collectives it holds, and the batch size each kernel call sees.
    hlo = ex.train_step.lower(state, local, LEARNING_RATE).compile().as_text()
    for op in ("all-gather", "all-to-all", "collective-permute", "all-reduce"):
        out[f"hlo_{op}"] = np.array(len(re.findall(rf"\b{op}(-start)?\(", hlo)))
    out["kernel_batch"] = np.array([int(re.search(r"= \(?\w+\[(\d+)", line).group(1))
                                    for line in hlo.splitlines()
                                    if 'custom_call_target="jax_transducer' in line])
    for step in range(STEPS):
        state, metrics = ex.train_step(state, local, LEARNING_RATE)
        out[f"loss_{step}"] = np.asarray(metrics["loss"])
        if step == 0:
            out["costs"] = gather(metrics["costs"])
            out["viterbi"] = gather(metrics["viterbi"])
            for k, g in metrics["grads"].items():
                assert g.is_fully_replicated
                out[f"grad_{k}"] = np.asarray(g)
    for k, w in state.items():
        out[f"param_{k}"] = np.asarray(w)

    # The loss's own gradients, per example: of the summed valid costs wrt emissions, predictions.
    emissions, predictions = jax.jit(ex.model)(ex.replicate(mesh, params()), local["features"],
                                               local["labels"])

    def summed(e, p, labels, input_lengths, label_lengths):
        costs = jt.transducer_loss(e, p, labels, input_lengths, label_lengths, blank=ex.BLANK)
        return jnp.where(jnp.isfinite(costs), costs, 0).sum()  # the invalid example's NaN left out

    d_e, d_p = jax.jit(jax.grad(summed, argnums=(0, 1)))(
        emissions, predictions, local["labels"], local["input_lengths"], local["label_lengths"])
    out.update(emissions=gather(emissions), predictions=gather(predictions),
               d_emissions=gather(d_e), d_predictions=gather(d_p))
    np.savez(os.path.join(args.out_dir, f"process_{args.process_id}.npz"), **out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
