"""A short soak (benchmarks/soak.py): many jitted loss+gradient+viterbi steps at one shape with
lengths changing every step, and invalid examples, leave RSS, live arrays and compilations flat."""

import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import soak  # noqa: E402

MiB = 2**20


def test_the_measures_see_what_they_measure():
    before = soak.rss_bytes()
    block = np.ones(64 * MiB, np.uint8)  # touched: resident
    assert soak.rss_bytes() - before > 60 * MiB
    del block
    live = len(jax.live_arrays())
    kept = [jax.numpy.ones(3) + k for k in range(5)]
    assert len(jax.live_arrays()) == live + 5
    del kept
    with soak.CompileCounter() as compiles:
        jax.jit(lambda x: x * 3 + 1)(np.arange(7.0)).block_until_ready()
    assert compiles.count == 1
    # A level that moves by 10 MiB between the first and last thirds, under +-3 MiB oscillation.
    at = np.arange(0, 1000, 50, dtype=np.float64)
    size = 300 * MiB + np.where(at > 500, 10 * MiB, 0) + np.resize([3, -3], len(at)) * MiB
    assert 12 * MiB < soak.growth_per_1000_steps(at, size) < 20 * MiB


def test_soak_stays_flat():
    """1000 steps: after 200, RSS may grow by at most 16 MiB per 1000 steps (every score-sized or
    lattice-sized buffer at this shape is 35 KiB or more, so leaking one each step grows it twice as
    fast; a 36 KiB leak per step measured 40 MiB per 1000), live arrays must not grow and nothing may
    compile after the first step."""
    figures = soak.soak(steps=1000, shape=(8, 64, 16, 64), warmup=200, samples=20)
    print(soak.report(figures))
    assert soak.failures(figures, max_growth_mib=16.0) == []


def test_exact_pass_steps_neither_compile_nor_keep_arrays():
    """Extreme scores every other step (the normaliser's exact pass: the other branch of a cond)."""
    figures = soak.soak(steps=60, shape=(4, 20, 5, 16), warmup=10, samples=3, extreme_every=2)
    assert figures["compiles_first_step"] >= 1 and figures["compiles_after_first_step"] == 0
    assert figures["live_arrays_end"] <= figures["live_arrays_warm"]
    assert figures["finite_losses"] == figures["steps"]
