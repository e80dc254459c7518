"""Plot a benchmarks.run JSON: time vs V and compiled temp memory vs V, log axes.

    python -m benchmarks.plot results.json [--out benchmarks/results.png]

matplotlib is optional (not a dependency of jax_transducer): `pip install matplotlib`.
"""

import argparse
import json
import sys
from collections import defaultdict

TIMES = {"ours_fwd": "ours fwd", "ours_fwd_bwd": "ours fwd+bwd", "ours_viterbi": "ours viterbi",
         "matmul": "matmul yardstick", "pure_jax": "pure-JAX fwd+bwd",
         "torchaudio": "torchaudio fwd+bwd"}
MEMORY = {"ours_fwd_bwd_temp": "ours fwd+bwd temp", "pure_jax_temp": "pure-JAX fwd+bwd temp",
          "joiner_bytes": "one (B,T,U+1,V) f32 joiner"}


def series(rows, key, value):
    """{(B, T, U): ([V...], [y...])} for the rows that have `key`."""
    out = defaultdict(lambda: ([], []))
    for r in sorted(rows, key=lambda r: r["V"]):
        if r.get(key) is not None:
            xs, ys = out[(r["B"], r["T"], r["U"])]
            xs.append(r["V"])
            ys.append(value(r[key]))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json")
    ap.add_argument("--out", default="benchmarks/results.png")
    args = ap.parse_args(argv)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("benchmarks.plot needs matplotlib, which is optional: pip install matplotlib",
              file=sys.stderr)
        return 1
    report = json.load(open(args.json))
    rows = report.get("results")
    if not rows:
        print(f"{args.json} has no per-shape results (a --threads run?): nothing to plot",
              file=sys.stderr)
        return 1
    groups = sorted({(r["B"], r["T"], r["U"]) for r in rows})
    styles = dict(zip(groups, ["o-", "s--", "^:", "D-.", "v-", "x--"] * 4))
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(13, 5.5))
    for ax, names, value, ylabel in (
            (ax_t, TIMES, lambda m: 1e3 * m["median_s"], "median time (ms)"),
            (ax_m, MEMORY, lambda b: b / 2**20, "compiled temp memory (MiB)")):
        for i, (key, label) in enumerate(names.items()):
            lines = series(rows, key, value)
            for group, (xs, ys) in lines.items():
                ax.plot(xs, ys, styles[group], color=f"C{i}")
            if lines:
                ax.plot([], [], "-", color=f"C{i}", label=label)  # one legend entry per method
        for group in groups:
            ax.plot([], [], styles[group], color="gray", label="B,T,U = %d,%d,%d" % group)
        ax.set(xscale="log", yscale="log", xlabel="vocabulary V", ylabel=ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    m = report["machine"]
    fig.suptitle(f"jax_transducer {m['jax_transducer']}, jax {m['jax']}, {m['device']}: "
                 f"{m['cpu_model']} ({m['cpu_count']} cores), {m['date'][:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
