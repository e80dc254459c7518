"""Data-parallel RNN-T training over many processes: one jitted step, the batch sharded over every
device of every process.

    # 2 processes on this machine, over a loopback coordinator (on CPU each gets --host-devices 2;
    # on one GPU host, run a single process instead: it drives all the GPUs):
    python examples/multiprocess_train.py --launch 2

    # by hand, one command per process (the coordinator is process 0's host and a free port):
    python examples/multiprocess_train.py --process-id 0 --num-processes 2 --coordinator 10.0.0.1:12345
    python examples/multiprocess_train.py --process-id 1 --num-processes 2 --coordinator 10.0.0.1:12345

    # on a cluster: SLURM (inside srun), Open MPI (mpirun) and Kubernetes are detected by
    # jax.distributed.initialize() from the environment, no flags needed. There each process gets
    # the one GPU of its local rank (SLURM_LOCALID), so start one process per GPU:
    srun --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 python examples/multiprocess_train.py

Every process runs this same program (SPMD). Each feeds only its own rows of the global batch
(`jax.make_array_from_process_local_data`); `jit` partitions the step by batch, so the loss kernels
run on each device's examples with no gather, and the parameter gradients are summed across all
devices by XLA's all-reduce. The loss is the mean of the valid examples' costs: an invalid example
(lengths out of range inside jit) gets a NaN cost and a zero gradient, so it is left out of the mean
and cannot spoil the step. Process 0 prints the loss of each step.
"""

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

import jax_transducer as jt

BLANK = 0


# ---- Starting the processes -------------------------------------------------------------------

def initialize(coordinator=None, num_processes=None, process_id=None):
    """Joins the job; afterwards jax.devices() lists every process's devices.

    With a coordinator ("host:port" of process 0) the three arguments say everything. Without, the
    cluster (SLURM, Open MPI, ...) is detected from the environment; where there is none, this
    process runs alone on its local devices.
    """
    # Cross-process collectives on CPU (the default on recent jax; no effect on GPUs and TPUs).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator is not None:
        jax.distributed.initialize(coordinator, num_processes, process_id)
        return
    try:
        jax.distributed.initialize()
    except ValueError:  # "coordinator_address should be defined": no cluster environment found
        print("no cluster environment detected: running as a single process", file=sys.stderr)


def free_port():
    """A TCP port free on the loopback interface now (another program could take it before use)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_host_devices(xla_flags, n):
    """XLA_FLAGS with --xla_force_host_platform_device_count=n (replacing any earlier count)."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "", xla_flags or "").split()
    return " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])


def launch(command, num_processes, host_devices=2, env=None, timeout=None, log_dir=None):
    """Runs `command` (a list, the program and its arguments) as processes 0..num_processes-1 of one
    job on this machine, adding --process-id/--num-processes/--coordinator; returns 0 when all
    succeed, else the first failure's exit status.

    The coordinator listens on a free loopback port. On CPU each process gets `host_devices`
    devices. `env` adds to this process's environment; with `log_dir`, process i writes its stdout
    and stderr to log_dir/process_<i>.log. Each process gets its own process group, and when one
    fails (the others would wait forever in a collective) or `timeout` seconds pass, every process
    still running is killed with its children.
    """
    env = dict(os.environ, **(env or {}))
    env["XLA_FLAGS"] = with_host_devices(env.get("XLA_FLAGS"), host_devices)
    coordinator = f"127.0.0.1:{free_port()}"
    deadline = None if timeout is None else time.monotonic() + timeout
    procs, logs = [], []
    try:
        for i in range(num_processes):
            out = None
            if log_dir is not None:
                out = open(os.path.join(log_dir, f"process_{i}.log"), "w")
                logs.append(out)
            procs.append(subprocess.Popen(
                command + ["--process-id", str(i), "--num-processes", str(num_processes),
                           "--coordinator", coordinator],
                env=env, stdout=out, stderr=subprocess.STDOUT if out else None,
                start_new_session=True))
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                return failed[0]
            if all(c == 0 for c in codes):
                return 0
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"processes still running after {timeout} s")
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        for f in logs:
            f.close()


# ---- Data and model ---------------------------------------------------------------------------

def make_batch(seed, B, T, U, V, F):
    """A random global batch (NumPy): features (B, T, F) float32, labels (B, U) in [1, V), lengths
    (B,) int32 (what lies past them is padding). A real loader would read only this process's rows."""
    rng = np.random.default_rng(seed)
    input_lengths = rng.integers(max(1, T // 2), T + 1, size=B).astype(np.int32)
    label_lengths = rng.integers(0, U + 1, size=B).astype(np.int32)
    return dict(features=rng.normal(size=(B, T, F)).astype(np.float32),
                labels=rng.integers(1, V, size=(B, U)).astype(np.int32),
                input_lengths=input_lengths, label_lengths=label_lengths)


def init_params(seed, F, H, V, dtype=np.float32):
    """A tiny transducer: a one-layer encoder (F -> H -> V) and an embedding predictor (V -> H -> V)."""
    rng = np.random.default_rng(seed)
    shapes = dict(enc_in=(F, H), enc_out=(H, V), embed=(V, H), pred_out=(H, V))
    return {k: (rng.normal(size=s) / np.sqrt(s[0])).astype(dtype) for k, s in shapes.items()}


def model(params, features, labels):
    """(emissions (B, T, V), predictions (B, U+1, V)). The predictor reads blank, then the labels."""
    emissions = jnp.tanh(features.astype(params["enc_in"].dtype) @ params["enc_in"]) @ params["enc_out"]
    V = params["embed"].shape[0]
    previous = jnp.pad(labels, ((0, 0), (1, 0)), constant_values=BLANK)
    previous = jnp.clip(previous, 0, V - 1)  # labels past label_length may hold anything
    # A one-hot matmul rather than an indexed gather: it needs no sharding annotation.
    one_hot = jax.nn.one_hot(previous, V, dtype=params["embed"].dtype)
    predictions = jnp.tanh(one_hot @ params["embed"]) @ params["pred_out"]
    return emissions, predictions


def loss_fn(params, batch):
    """The mean cost of the valid examples, and the per-example costs (NaN where invalid)."""
    emissions, predictions = model(params, batch["features"], batch["labels"])
    costs = jt.transducer_loss(emissions, predictions, batch["labels"], batch["input_lengths"],
                               batch["label_lengths"], blank=BLANK)
    valid = jnp.isfinite(costs)
    loss = jnp.where(valid, costs, 0).sum() / jnp.maximum(valid.sum(), 1)
    return loss, (costs, emissions, predictions)


@jax.jit
def train_step(params, batch, learning_rate):
    """One SGD step. Returns the new parameters and the step's loss, costs (B,), parameter
    gradients and viterbi paths (B, U) of the batch (before the update)."""
    (loss, (costs, emissions, predictions)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch)
    paths = jt.viterbi(emissions, predictions, batch["input_lengths"], batch["label_lengths"],
                       blank=BLANK)
    params = jax.tree.map(lambda w, g: w - learning_rate * g, params, grads)
    return params, dict(loss=loss, costs=costs, grads=grads, viterbi=paths)


# ---- Sharding ---------------------------------------------------------------------------------

def batch_mesh():
    """A 1-D mesh over every device of every process, its axis named "batch"."""
    return jax.make_mesh((jax.device_count(),), ("batch",))


def local_rows(sharding, global_batch):
    """The rows of the global batch that this process's devices hold: a slice."""
    starts_stops = sorted((index[0].start or 0, index[0].stop or global_batch)
                          for index in sharding.addressable_devices_indices_map(
                              (global_batch,)).values())
    for (_, stop), (start, _) in zip(starts_stops, starts_stops[1:]):
        assert stop == start, "this process's devices hold rows that are not contiguous"
    return slice(starts_stops[0][0], starts_stops[-1][1])


def shard_batch(mesh, local_batch):
    """Global arrays, sharded over "batch", from this process's rows of every array."""
    sharding = NamedSharding(mesh, PartitionSpec("batch"))
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def replicate(mesh, tree):
    """Global arrays held whole by every device, from the same NumPy values on every process."""
    sharding = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), tree)


# ---- Main -------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launch", type=int, metavar="N",
                        help="start N processes of this script on this machine and wait for them")
    parser.add_argument("--host-devices", type=int, default=2,
                        help="with --launch: CPU devices per process (default 2)")
    parser.add_argument("--process-id", type=int)
    parser.add_argument("--num-processes", type=int)
    parser.add_argument("--coordinator", help="host:port of process 0")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16, help="global batch size")
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--labels", type=int, default=10)
    parser.add_argument("--vocab", type=int, default=32)
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=0.05)
    args = parser.parse_args(argv)

    if args.launch and args.coordinator is None:
        # Re-run this script as each of the processes (they see --coordinator, so they do not launch).
        # SIGTERM (from a scheduler, or a test's timeout) ends the wait; launch then kills them all.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
        return launch([sys.executable, os.path.abspath(__file__)] + sys.argv[1:], args.launch,
                      args.host_devices)

    initialize(args.coordinator, args.num_processes, args.process_id)
    mesh = batch_mesh()
    B = args.batch
    if B % jax.device_count():
        parser.error(f"--batch {B} must be a multiple of the {jax.device_count()} devices")
    rows = local_rows(NamedSharding(mesh, PartitionSpec("batch")), B)
    if jax.process_index() == 0:
        print(f"{jax.process_count()} processes, {jax.device_count()} devices, global batch {B}, "
              f"{B // jax.process_count()} rows per process", flush=True)

    params = replicate(mesh, init_params(0, args.features, args.hidden, args.vocab))
    for step in range(args.steps):
        batch = make_batch(step, B, args.frames, args.labels, args.vocab, args.features)
        batch = shard_batch(mesh, {k: v[rows] for k, v in batch.items()})
        params, out = train_step(params, batch, args.learning_rate)
        if jax.process_index() == 0:
            print(f"step {step:4d}  loss {float(out['loss']):.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
