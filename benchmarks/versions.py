"""Time loss+gradient of several checkouts of this repository in one run (issue #6: the common
case before and after a change), each in its own process, interleaved round by round.

    python -m benchmarks.versions --shape 8,500,50,1000 PATH_A PATH_B ...

Each PATH is a checkout with its extension built in place (`python setup.py build_ext
--inplace`); it is put first on PYTHONPATH of a child process that reports the median and min wall
time of jit(value_and_grad(sum of costs)) on float32 random inputs (benchmarks.measure.inputs).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time
import jax, numpy as np
import jax_transducer as jt
sys.path.insert(0, sys.argv[3])
from benchmarks.measure import inputs
B, T, U, V = map(int, sys.argv[1].split(","))
x = inputs(B, T, U, V)
args = [x[k] for k in ("emissions", "predictions", "labels", "input_lengths", "label_lengths")]
step = jax.jit(jax.value_and_grad(lambda e, p, *a: jt.transducer_loss(e, p, *a).sum(),
                                  argnums=(0, 1)))
jax.block_until_ready(step(*args))
walls = []
for _ in range(int(sys.argv[2])):
    t = time.perf_counter()
    jax.block_until_ready(step(*args))
    walls.append(time.perf_counter() - t)
print(json.dumps(dict(file=jt.__file__, walls=walls)))
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--shape", default="8,500,50,1000")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    walls = {p: [] for p in args.paths}
    for r in range(args.rounds):
        for path in args.paths:
            env = dict(os.environ, PYTHONPATH=os.path.abspath(path))
            out = subprocess.run([sys.executable, "-c", CHILD, args.shape, str(args.repeats), here],
                                 env=env, cwd=os.path.abspath(path), capture_output=True, text=True,
                                 check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            assert result["file"].startswith(os.path.abspath(path)), result["file"]
            walls[path] += result["walls"]
            print(f"round {r + 1}: {path}: median {statistics.median(result['walls']) * 1e3:.1f} ms",
                  file=sys.stderr, flush=True)
    print(f"loss+gradient at B,T,U,V = {args.shape}, float32, {args.rounds} x {args.repeats} calls")
    print("| checkout | median ms | min ms |\n|---|---|---|")
    for path, w in walls.items():
        print(f"| {path} | {statistics.median(w) * 1e3:.1f} | {min(w) * 1e3:.1f} |")


if __name__ == "__main__":
    main()
