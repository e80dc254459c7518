"""Soak: thousands of jitted loss+gradient+viterbi steps at one shape, lengths changing every step.

    python -m benchmarks.soak                          # 3000 steps at B,T,U,V = 8,100,20,64
    python -m benchmarks.soak --steps 10000 --shape 16,200,40,128
    MALLOC_MMAP_THRESHOLD_=131072 python -m benchmarks.soak --extreme-every 5

After warm-up, host memory (RSS), the number of live jax arrays and the number of compilations must
stay flat: a step that leaks a buffer, a native allocation or a cache entry, or that recompiles when
only the lengths change, shows up here. Every step draws new lengths (label length 0 included) and
labels, and one step in 10 has an invalid example (NaN cost, zero gradient, blank path). With
--extreme-every N, every N-th step has scores scaled by 1e3, which the normaliser recomputes
exactly in chunks; its large temporaries raise glibc's dynamic mmap threshold, so RSS then climbs
in steps to the allocator's high-water mark (bounded; run with MALLOC_MMAP_THRESHOLD_=131072 to
pin the threshold and see RSS flat again). Prints the figures; exits with status 1 if a check
fails: any compilation after the first step, more live arrays at the end than after warm-up, or RSS
growing faster than --max-growth MiB per 1000 steps.
"""

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_transducer as jt

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # one per XLA compilation
MiB = 2**20


def rss_bytes():
    """This process's resident set size now (Linux /proc), else its peak (getrusage)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in bytes on macOS, else KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class CompileCounter:
    """Counts XLA compilations (jax.monitoring's backend-compile event) while in the `with` block."""

    def __init__(self):
        self.count = 0

    def _listener(self, event, duration, **kwargs):
        if event == COMPILE_EVENT:
            self.count += 1

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self._listener)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listener)


def step_fn(blank):
    """jit(batch -> (summed valid costs, (d emissions, d predictions), viterbi paths))."""
    def total(e, p, labels, il, ll):
        costs = jt.transducer_loss(e, p, labels, il, ll, blank=blank)
        return jnp.where(jnp.isfinite(costs), costs, 0).sum()

    def step(e, p, labels, il, ll):
        loss, grads = jax.value_and_grad(total, argnums=(0, 1))(e, p, labels, il, ll)
        return loss, grads, jt.viterbi(e, p, il, ll, blank=blank)
    return jax.jit(step)


class Batches:
    """Fixed-shape float32 batches: new lengths and labels every step, scores from a small pool.

    Every `invalid_every`-th step has an invalid example (input length T + 1: NaN cost, zero
    gradient, blank path); every `extreme_every`-th step has scores scaled by 1e3, whose cells the
    normaliser recomputes exactly (0: never)."""

    def __init__(self, B, T, U, V, blank, seed=0, extreme_every=25, invalid_every=10, pool=4):
        self.rng = np.random.default_rng(seed)
        self.shape, self.blank = (B, T, U, V), blank
        self.extreme_every, self.invalid_every = extreme_every, invalid_every
        self.scores = [(self.rng.normal(size=(B, T, V)).astype(np.float32),
                        self.rng.normal(size=(B, U + 1, V)).astype(np.float32))
                       for _ in range(pool)]

    def __call__(self, i):
        B, T, U, V = self.shape
        every = lambda n: n and i % n == n - 1
        e, p = self.scores[i % len(self.scores)]
        if every(self.extreme_every):
            e, p = e * 1e3, p * 1e3
        labels = self.rng.integers(0, V - 1, size=(B, U)).astype(np.int32)
        labels += labels >= self.blank  # any label but blank
        il = self.rng.integers(1, T + 1, size=B).astype(np.int32)
        ll = self.rng.integers(0, U + 1, size=B).astype(np.int32)
        if every(self.invalid_every):
            il[self.rng.integers(B)] = T + 1
        return e, p, labels, il, ll


def growth_per_1000_steps(at, size):
    """RSS growth per 1000 steps: the difference of the medians of the last and the first third of
    the samples over the distance of their mean steps. Medians, because RSS oscillates by a few
    MiB from step to step (large temporaries come and go) where a leak moves its whole level."""
    k = max(1, len(at) // 3)
    return (np.median(size[-k:]) - np.median(size[:k])) / (at[-k:].mean() - at[:k].mean()) * 1000


def soak(steps=3000, shape=(8, 100, 20, 64), blank=1, warmup=None, samples=30, seed=0,
         extreme_every=0, invalid_every=10):
    """Runs `steps` steps; returns the figures (a dict). The first `warmup` steps (default: a tenth,
    at least 20) are the warm-up: every later figure is measured from their end."""
    warmup = max(20, steps // 10) if warmup is None else warmup
    assert 0 < warmup < steps and samples >= 3
    step = step_fn(blank)
    batches = Batches(*shape, blank, seed, extreme_every, invalid_every)
    sample_at = np.linspace(warmup, steps, samples).astype(int).tolist()
    rss, finite = [], 0
    with CompileCounter() as compiles:
        for i in range(steps + 1):
            if i == 1:
                first_step_compiles = compiles.count
            if i == warmup:
                live_warm, start = len(jax.live_arrays()), time.perf_counter()
            if i in sample_at:
                rss.append((i, rss_bytes()))
            if i == steps:
                break
            loss, grads, paths = jax.block_until_ready(step(*batches(i)))
            finite += bool(np.isfinite(float(loss)))
            del loss, grads, paths
        seconds = time.perf_counter() - start
        live_end, compiles_end = len(jax.live_arrays()), compiles.count
    at, size = (np.array(x, np.float64) for x in zip(*rss))
    return dict(
        steps=steps, shape=tuple(shape), warmup=warmup,
        extreme_every=extreme_every, invalid_every=invalid_every,
        rss_samples_mib=[(int(i), r / MiB) for i, r in zip(at, size)],
        rss_warm_mib=size[0] / MiB, rss_end_mib=size[-1] / MiB,
        rss_min_mib=size.min() / MiB, rss_max_mib=size.max() / MiB,
        rss_growth_per_1000_steps_mib=growth_per_1000_steps(at, size) / MiB,
        live_arrays_warm=live_warm, live_arrays_end=live_end,
        compiles_first_step=first_step_compiles,
        compiles_after_first_step=compiles_end - first_step_compiles,
        steps_per_second=(steps - warmup) / seconds,
        finite_losses=finite)


def failures(figures, max_growth_mib=4.0):
    """What is wrong with the figures, as a list of messages (empty: the soak passed).
    max_growth_mib: the RSS growth allowed, in MiB per 1000 steps."""
    f, wrong = figures, []
    if f["compiles_first_step"] < 1:
        wrong.append("no compilation seen in the first step: the compile counter is not working")
    if f["compiles_after_first_step"]:
        wrong.append(f"{f['compiles_after_first_step']} compilations after the first step")
    if f["live_arrays_end"] > f["live_arrays_warm"]:
        wrong.append(f"live arrays grew from {f['live_arrays_warm']} to {f['live_arrays_end']}")
    if f["rss_growth_per_1000_steps_mib"] > max_growth_mib:
        wrong.append(f"RSS grows {f['rss_growth_per_1000_steps_mib']:.2f} MiB per 1000 steps")
    if f["finite_losses"] != f["steps"]:
        wrong.append(f"only {f['finite_losses']} of {f['steps']} losses are finite")
    return wrong


def report(f):
    B, T, U, V = f["shape"]
    samples = f["rss_samples_mib"][::max(1, len(f["rss_samples_mib"]) // 10)]
    return "\n".join([
        f"soak: {f['steps']} steps of jit(loss + grad + viterbi) at B={B} T={T} U={U} V={V}, float32, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}; warm-up {f['warmup']} steps; "
        + ", ".join(f"{what} every {n} steps" if n else f"no {what}s" for what, n in (
            ("invalid example", f["invalid_every"]), ("extreme score", f["extreme_every"]))),
        f"  RSS after warm-up   {f['rss_warm_mib']:8.1f} MiB",
        f"  RSS at the end      {f['rss_end_mib']:8.1f} MiB  (between {f['rss_min_mib']:.1f} and "
        f"{f['rss_max_mib']:.1f} after warm-up)",
        f"  RSS growth          {f['rss_growth_per_1000_steps_mib']:+8.2f} MiB per 1000 steps "
        f"(medians of the first and last thirds)",
        "  RSS by step         " + ", ".join(f"{i}: {r:.1f}" for i, r in samples),
        f"  live arrays         {f['live_arrays_warm']} after warm-up, {f['live_arrays_end']} "
        f"at the end",
        f"  compilations        {f['compiles_first_step']} in the first step, "
        f"{f['compiles_after_first_step']} after it",
        f"  speed               {f['steps_per_second']:8.1f} steps/s after warm-up",
    ])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--shape", default="8,100,20,64", help="B,T,U,V (default 8,100,20,64)")
    parser.add_argument("--blank", type=int, default=1)
    parser.add_argument("--extreme-every", type=int, default=0,
                        help="extreme scores every N steps (default 0: never)")
    parser.add_argument("--invalid-every", type=int, default=10,
                        help="an invalid example every N steps (0: never; default 10)")
    parser.add_argument("--max-growth", type=float, default=4.0,
                        help="allowed RSS growth in MiB per 1000 steps (default 4)")
    args = parser.parse_args(argv)
    figures = soak(args.steps, tuple(int(x) for x in args.shape.split(",")), args.blank,
                   extreme_every=args.extreme_every, invalid_every=args.invalid_every)
    print(report(figures))
    wrong = failures(figures, args.max_growth)
    print("FAILED: " + "; ".join(wrong) if wrong else "OK: flat memory, live arrays and compiles")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
