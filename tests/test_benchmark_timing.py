"""The benchmark suite's round-robin timer (benchmarks/measure.py) calls each function once per
round, in turn, and reports each one's own times."""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.measure import time_round_robin  # noqa: E402


def test_round_robin_interleaves_and_times_each_function():
    calls = []
    fns = {"short": lambda: calls.append("short"),
           "long": lambda: (calls.append("long"), time.sleep(0.02))}
    out = time_round_robin(fns, repeats=4)
    assert calls == ["short", "long"] * 5  # a warm-up round, then 4
    assert set(out) == {"short", "long"}
    assert all(r["repeats"] == 4 for r in out.values())
    assert out["long"]["min_s"] >= 0.02 > out["short"]["median_s"]
    assert out["long"]["cpu_per_wall"] < 0.5  # sleeping keeps no core busy
