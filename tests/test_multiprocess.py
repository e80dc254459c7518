"""Two processes x two host devices (loopback coordinator, gloo collectives) give the values of one
process on the whole batch: examples/multiprocess_train.py's train step, batch-sharded over all 4
devices, with uneven lengths across the processes and an invalid example on one of them.

The workers (tests/multiprocess_worker.py, float64) write what they see; the reference runs here,
on one device. Every subprocess is killed when the job fails or runs past TIMEOUT seconds.
"""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # for `examples`

import multiprocess_worker as worker  # noqa: E402
import reference  # noqa: E402
from examples import multiprocess_train as ex  # noqa: E402

TIMEOUT = 120
PROCESSES, HOST_DEVICES = 2, 2
# The subprocesses import this checkout's jax_transducer and examples, and run on CPU only.
ENV = {"PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
       "JAX_PLATFORMS": "cpu"}


def close(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-12)


def logs(directory):
    return "\n".join(f"--- process {i}:\n" + open(os.path.join(directory, f"process_{i}.log")).read()[-3000:]
                     for i in range(PROCESSES))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """What each of the 2 processes saw: a dict of arrays per process."""
    out = str(tmp_path_factory.mktemp("multiprocess"))
    try:
        status = ex.launch([sys.executable, worker.__file__, out], PROCESSES, HOST_DEVICES,
                           env=ENV, timeout=TIMEOUT, log_dir=out)
    except TimeoutError as e:
        pytest.fail(f"{e}\n{logs(out)}")
    if status != 0:
        pytest.fail(f"a process failed with status {status}\n{logs(out)}")
    return [dict(np.load(os.path.join(out, f"process_{i}.npz"))) for i in range(PROCESSES)]


def single_process(batch, params):
    """The worker's computation on one device, on the whole batch."""
    import jax

    state, out = params, {}
    for step in range(worker.STEPS):
        state, metrics = ex.train_step(state, batch, worker.LEARNING_RATE)
        out[f"loss_{step}"] = np.asarray(metrics["loss"])
        if step == 0:
            out["costs"], out["viterbi"] = np.asarray(metrics["costs"]), np.asarray(metrics["viterbi"])
            out.update({f"grad_{k}": np.asarray(g) for k, g in metrics["grads"].items()})
    out.update({f"param_{k}": np.asarray(w) for k, w in state.items()})

    import jax_transducer as jt
    emissions, predictions = jax.jit(ex.model)(params, batch["features"], batch["labels"])
    def total(e, p):
        costs = jt.transducer_loss(e, p, batch["labels"], batch["input_lengths"],
                                   batch["label_lengths"], blank=ex.BLANK)
        return jax.numpy.where(jax.numpy.isfinite(costs), costs, 0).sum()

    d_e, d_p = jax.jit(jax.grad(total, argnums=(0, 1)))(emissions, predictions)
    out.update(emissions=np.asarray(emissions), predictions=np.asarray(predictions),
               d_emissions=np.asarray(d_e), d_predictions=np.asarray(d_p))
    return out


@pytest.fixture(scope="module")
def single():
    return single_process(worker.batch(), worker.params())


def test_each_process_feeds_its_rows_and_sees_the_same_replicated_values(runs):
    B = worker.B
    for i, run in enumerate(runs):
        assert run["devices"] == PROCESSES * HOST_DEVICES
        np.testing.assert_array_equal(run["rows"], [i * B // PROCESSES, (i + 1) * B // PROCESSES])
    # The lengths are uneven across processes: all of process 0's inputs outlast process 1's.
    lengths = worker.batch()["input_lengths"]
    assert lengths[:B // 2].min() > lengths[B // 2:][np.arange(B // 2) != worker.INVALID - B // 2].max()
    for k in runs[0]:
        if k not in ("rows", "kernel_batch"):
            np.testing.assert_array_equal(runs[0][k], runs[1][k], err_msg=k)


def test_the_kernels_run_on_each_device_s_rows_and_nothing_is_gathered(runs):
    for run in runs:
        assert run["hlo_all-gather"] == run["hlo_all-to-all"] == run["hlo_collective-permute"] == 0
        assert run["hlo_all-reduce"] > 0  # the gradients are summed across devices
        # forward, backward and viterbi (float64: the normaliser is XLA's), each on B / devices
        # examples
        assert len(run["kernel_batch"]) == 3
        np.testing.assert_array_equal(run["kernel_batch"], worker.B // run["devices"])


def test_matches_a_single_process_on_the_whole_batch(runs, single):
    run = runs[0]
    assert set(single) <= set(run)
    for k, want in single.items():
        if k == "viterbi":
            np.testing.assert_array_equal(run[k], want)
        else:
            np.testing.assert_allclose(run[k], want, rtol=1e-11, atol=1e-12, err_msg=k)
    # Training moved the parameters and lowered the loss.
    assert run["loss_2"] < run["loss_0"]


def test_the_invalid_example_stays_confined(runs):
    run, bad = runs[0], worker.INVALID
    ok = np.arange(worker.B) != bad
    assert np.isnan(run["costs"][bad]) and np.isfinite(run["costs"][ok]).all()
    assert not run["d_emissions"][bad].any() and not run["d_predictions"][bad].any()
    np.testing.assert_array_equal(run["viterbi"][bad], ex.BLANK)
    for k in run:
        if k.startswith(("grad_", "param_", "loss_")):
            assert np.isfinite(run[k]).all(), k
    # Everything else is what a single process gives on the batch without the invalid example.
    batch = {k: v[ok] for k, v in worker.batch().items()}
    without = single_process(batch, worker.params())
    for k, want in without.items():
        got = run[k][ok] if run[k].ndim and run[k].shape[0] == worker.B else run[k]
        if k == "viterbi":
            np.testing.assert_array_equal(got, want)
        else:
            np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-12, err_msg=k)


def test_against_the_float64_reference(runs):
    """Costs, gradients and viterbi of the valid examples from the independent NumPy reference, on
    the emissions and predictions the processes computed."""
    run = runs[0]
    ok = np.arange(worker.B) != worker.INVALID
    b = worker.batch()
    E, P, labels = run["emissions"][ok], run["predictions"][ok], b["labels"][ok]
    lengths = b["input_lengths"][ok], b["label_lengths"][ok]
    close(run["costs"][ok], reference.costs(E, P, labels, *lengths, blank=ex.BLANK))
    d_e, d_p = reference.gradients(E, P, labels, *lengths, blank=ex.BLANK)
    close(run["d_emissions"][ok], d_e)
    close(run["d_predictions"][ok], d_p)
    np.testing.assert_array_equal(run["viterbi"][ok], reference.viterbi(E, P, *lengths,
                                                                        blank=ex.BLANK))


def test_the_example_script_launches_and_trains():
    """The documented command: `python examples/multiprocess_train.py --launch 2`."""
    script = os.path.join(ROOT, "examples", "multiprocess_train.py")
    proc = subprocess.Popen([sys.executable, script, "--launch", "2", "--steps", "3"],
                            env=dict(os.environ, **ENV), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the launcher kills its processes on SIGTERM
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        pytest.fail(f"still running after {TIMEOUT} s")
    assert proc.returncode == 0, output
    steps = [line.split() for line in output.splitlines() if line.startswith("step")]
    assert [int(s[1]) for s in steps] == [0, 1, 2], output  # printed once, by process 0
    assert all(np.isfinite(float(s[3])) for s in steps), output
    assert "2 processes, 4 devices" in output, output
