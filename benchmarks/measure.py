"""Timing, compiled-memory and machine-info helpers for the benchmark suite."""

import datetime
import os
import platform
import statistics
import sys
import time

import jax
import numpy as np


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def inputs(B, T, U, V, seed=0):
    """Random float32 scores, labels in [1, V) (0 is blank), example 0 full length, the others
    with input lengths in [T/2, T] and label lengths in [U/2, U]."""
    rng = np.random.default_rng(seed)
    return dict(
        emissions=rng.normal(size=(B, T, V)).astype(np.float32),
        predictions=rng.normal(size=(B, U + 1, V)).astype(np.float32),
        labels=rng.integers(1, V, size=(B, U)).astype(np.int32),
        input_lengths=np.r_[T, rng.integers(T // 2, T + 1, size=B - 1)].astype(np.int32),
        label_lengths=np.r_[U, rng.integers(U // 2, U + 1, size=B - 1)].astype(np.int32),
    )


def compile_jit(fn, *args):
    """(compiled, temp bytes) of jax.jit(fn) at these arguments; compiling allocates nothing."""
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, compiled.memory_analysis().temp_size_in_bytes


def busy_cpu_seconds():
    """CPU seconds spent by the whole machine so far (all processes), from /proc/stat, or None."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(n) for n in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def time_round_robin(fns, repeats):
    """Median and min wall seconds of each function over `repeats` rounds that call each one once
    (after a warm-up round), so that a burst of load on this shared machine hits all of them
    alike, with cpu_per_wall (this process's CPU seconds per wall second of its calls: how many
    cores it kept busy) and other_per_wall (CPU seconds of every other process per wall second
    over the whole loop, the same for all: contention; coarse, the kernel counts in 10 ms ticks;
    None under 0.5 s). Each function must block on its result."""
    for fn in fns.values():
        fn()
    walls = {name: [] for name in fns}
    cpus = dict.fromkeys(fns, 0.0)
    busy0, t0 = busy_cpu_seconds(), time.perf_counter()
    for _ in range(repeats):
        for name, fn in fns.items():
            cpu0, start = time.process_time(), time.perf_counter()
            fn()
            walls[name].append(time.perf_counter() - start)
            cpus[name] += time.process_time() - cpu0
    wall, busy1 = time.perf_counter() - t0, busy_cpu_seconds()
    other = (None if busy1 is None or wall < 0.5 else
             max(0.0, (busy1 - busy0 - sum(cpus.values())) / wall))
    return {name: dict(median_s=statistics.median(w), min_s=min(w), repeats=repeats,
                       cpu_per_wall=cpus[name] / sum(w), other_per_wall=other)
            for name, w in walls.items()}


def time_calls(fn, repeats):
    """time_round_robin of one function."""
    return time_round_robin({"fn": fn}, repeats)["fn"]


def jax_timer(compiled, *args):
    return lambda: jax.block_until_ready(compiled(*args))


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_fingerprint():
    """sha256 (12 hex digits) of the imported jax_transducer's .py and .so files, and their
    newest modification time: which build was measured, while the package is being edited."""
    import hashlib
    import pathlib

    import jax_transducer as jt
    files = sorted(f for f in pathlib.Path(jt.__file__).parent.iterdir()
                   if f.suffix in (".py", ".so"))
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:12]
    newest = max(f.stat().st_mtime for f in files)
    return f"{digest} (newest file {datetime.datetime.fromtimestamp(newest).isoformat()})"


def machine_info(device):
    import jax_transducer as jt
    return dict(
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        cpu_model=cpu_model(),
        cpu_count=os.cpu_count(),
        cpu_affinity=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        platform=platform.platform(),
        python=platform.python_version(),
        jax=jax.__version__,
        jax_transducer=jt.__version__,
        build_info=jt.build_info(),
        package_fingerprint=package_fingerprint(),
        device=str(device),
        xla_flags=os.environ.get("XLA_FLAGS", ""),
        load_average_at_start=os.getloadavg(),
    )
