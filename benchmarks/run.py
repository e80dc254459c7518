"""Benchmark jax_transducer against the peers in benchmarks/peers.py.

    python -m benchmarks.run                       # default shapes, < 5 minutes on 2 CPU cores
    python -m benchmarks.run --full --device gpu   # the original table: T=2000, U=100
    python -m benchmarks.run --shapes "8,2000,100,1000;32,2000,100,100" --json out.json
    python -m benchmarks.run --threads             # ours fwd+bwd on 1 core vs all cores

Per shape (B,T,U,V): ours forward, forward+backward and viterbi; the pure-JAX full-joiner loss
(fwd+bwd), the matmul yardstick and torchaudio (if it imports); compiled temp memory. The pure-JAX
peer's costs and gradients are checked against ours before anything is timed. Progress goes to
stderr, the Markdown table to stdout.
"""

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile

import jax
import numpy as np

import jax_transducer as jt

from . import peers
from .measure import (compile_jit, inputs, jax_timer, log, machine_info, time_calls,
                      time_round_robin)

DEFAULT_SHAPES = "4,150,20,100;8,300,40,500;8,500,50,100;8,500,50,1000;8,500,50,2000"
QUICK_SHAPES = "2,50,10,50;4,100,20,200"
FULL_SHAPES = ";".join(f"{B},2000,100,{V}" for B in (8, 32) for V in (100, 1000, 2000, 10000))
PEERS = ("pure_jax", "matmul", "torchaudio")
GiB = 2**30


def fwd_bwd(loss):
    """jit-able (e, p, labels, il, ll) -> ((sum of costs, costs), (d/de, d/dp))."""
    def total(*args):
        costs = loss(*args)
        return costs.sum(), costs
    return jax.value_and_grad(total, argnums=(0, 1), has_aux=True)


def check_agreement(name, ours, theirs, rtol=1e-4, grad_tol=1e-2):
    """Assert the peer's costs match ours (rtol) and its gradients to grad_tol of their largest
    entry (float32 gradients at T=500 differ by ~1e-3 of the max; a real bug gives O(1))."""
    (_, c_ours), g_ours = ours
    (_, c_peer), g_peer = theirs
    np.testing.assert_allclose(np.asarray(c_peer), np.asarray(c_ours), rtol=rtol,
                               err_msg=f"{name} costs disagree with ours")
    worst = 0.0
    for a, b in zip(g_ours, g_peer):
        a, b = np.asarray(a), np.asarray(b)
        worst = max(worst, float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-30)))
    assert worst < grad_tol, f"{name} gradients disagree with ours: max rel. diff {worst:.2e}"
    cost_rel = float(np.max(np.abs(np.asarray(c_peer) - np.asarray(c_ours)) / np.abs(c_ours)))
    log(f"  check {name}: costs rel. diff {cost_rel:.1e}, gradients {worst:.1e} (of max) -- ok")
    return dict(cost_rel_diff=cost_rel, grad_rel_diff=worst)


def skip_reason(cells, bytes_needed, rate, args):
    """'OOM ...' / 'too slow ...' if a full-joiner peer should not run, else None."""
    if bytes_needed > args.mem_budget_gib * GiB:
        return f"OOM: needs ~{bytes_needed / GiB:.3g} GiB > budget {args.mem_budget_gib:g} GiB"
    if rate and rate * cells * (args.repeats + 2) > args.peer_max_seconds:
        return (f"too slow: ~{rate * cells:.0f} s/call, x{args.repeats + 2} calls "
                f"> {args.peer_max_seconds:g} s")
    return None


def bench_shape(shape, args, device, rates):
    B, T, U, V = shape
    cells = B * T * (U + 1) * V
    row = dict(B=B, T=T, U=U, V=V, joiner_bytes=4 * cells, skipped={})
    x = inputs(B, T, U, V)
    args5 = [jax.device_put(x[k], device) for k in
             ("emissions", "predictions", "labels", "input_lengths", "label_lengths")]
    e, p = args5[:2]
    log(f"[{B},{T},{U},{V}] compiling ours")
    loss = functools.partial(jt.transducer_loss, impl=args.impl)
    ours_fwd, row["ours_fwd_temp"] = compile_jit(loss, *args5)
    ours_fb, row["ours_fwd_bwd_temp"] = compile_jit(fwd_bwd(loss), *args5)
    ours_vit, _ = compile_jit(functools.partial(jt.viterbi, impl=args.impl), e, p, *args5[3:])
    reference = ours_fb(*args5)
    timers = {"ours_fwd": jax_timer(ours_fwd, *args5), "ours_fwd_bwd": jax_timer(ours_fb, *args5),
              "ours_viterbi": jax_timer(ours_vit, e, p, *args5[3:])}

    if "matmul" in args.peers:
        mm, _ = compile_jit(peers.matmul_yardstick, e, p)
        timers["matmul"] = jax_timer(mm, e, p)
    if "pure_jax" in args.peers:
        reason = skip_reason(cells, 4 * cells, rates.get("pure_jax"), args)
        if reason is None:
            log(f"[{B},{T},{U},{V}] compiling pure_jax")
            pj, row["pure_jax_temp"] = compile_jit(fwd_bwd(peers.full_joiner_loss), *args5)
            reason = skip_reason(cells, row["pure_jax_temp"], None, args)
        if reason is None:
            row["pure_jax_check"] = check_agreement("pure_jax", reference, pj(*args5))
            timers["pure_jax"] = jax_timer(pj, *args5)
        else:
            row["skipped"]["pure_jax"] = reason
    if "torchaudio" in args.peers and peers.torchaudio_available():
        # rnnt_loss keeps the logits, their gradient and log-probs: ~3 joiners.
        reason = skip_reason(cells, 12 * cells, rates.get("torchaudio"), args)
        if reason is None:
            run = peers.torchaudio_fwd_bwd(args.device)(
                x["emissions"], x["predictions"], x["labels"], x["input_lengths"],
                x["label_lengths"])
            np.testing.assert_allclose(run(), np.asarray(reference[0][1]), rtol=1e-4,
                                       err_msg="torchaudio costs disagree with ours")
            timers["torchaudio"] = run
        else:
            row["skipped"]["torchaudio"] = reason

    # Ours round-robin (viterbi / forward is a target); each peer alone, as before: the matmul
    # yardstick runs slower right after our calls (cold caches), which would flatter our ratio.
    fast = [name for name in timers if name.startswith("ours_")]
    row.update(time_round_robin({name: timers[name] for name in fast}, args.repeats))
    for name, fn in timers.items():
        if name not in fast:
            row[name] = time_calls(fn, args.repeats)
        if name in ("pure_jax", "torchaudio"):
            rates[name] = max(rates.get(name, 0.0), row[name]["median_s"] / cells)
        other = row[name]["other_per_wall"]
        log(f"[{B},{T},{U},{V}] {name:13s} median {1e3 * row[name]['median_s']:9.2f} ms "
            f"(cpu/wall {row[name]['cpu_per_wall']:.2f}, other processes "
            f"{'?' if other is None else f'{other:.2f}'} cores)")
    for name, why in row["skipped"].items():
        log(f"[{B},{T},{U},{V}] {name:13s} skipped: {why}")
    return row


def ms(row, key):
    if key in row:
        return f"{1e3 * row[key]['median_s']:.3g}"
    return row["skipped"].get(key, "—").split(":")[0]


def ratio(row, num, den):
    if num in row and den in row:
        return f"{row[num]['median_s'] / row[den]['median_s']:.3g}"
    return "—"


def mib(n):
    return "—" if n is None else f"{n / 2**20:.3g}"


def temp_ratio(row):
    if row.get("pure_jax_temp") and row["ours_fwd_bwd_temp"]:
        return f"{row['pure_jax_temp'] / row['ours_fwd_bwd_temp']:.3g}"
    return "—"


def other_load(row):
    """Most CPU (in cores) other processes used during any of the row's measurements."""
    loads = [m["other_per_wall"] for m in row.values()
             if isinstance(m, dict) and m.get("other_per_wall") is not None]
    return f"{max(loads):.2f}" if loads else "?"


def table(rows):
    head = ["B", "T", "U", "V", "ours fwd ms", "ours fwd+bwd ms", "ours viterbi ms", "matmul ms",
            "fwd+bwd / matmul", "pure-JAX fwd+bwd ms", "pure-JAX / ours", "torchaudio ms",
            "ours temp MiB", "pure-JAX temp MiB", "pure-JAX / ours temp", "joiner MiB",
            "other load (cores)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["B"], r["T"], r["U"], r["V"], ms(r, "ours_fwd"), ms(r, "ours_fwd_bwd"),
                 ms(r, "ours_viterbi"), ms(r, "matmul"), ratio(r, "ours_fwd_bwd", "matmul"),
                 ms(r, "pure_jax"), ratio(r, "pure_jax", "ours_fwd_bwd"), ms(r, "torchaudio"),
                 mib(r["ours_fwd_bwd_temp"]), mib(r.get("pure_jax_temp")), temp_ratio(r),
                 mib(r["joiner_bytes"]), other_load(r)]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


THREAD_VARIANTS = {  # name: (extra environment, command prefix)
    "default": ({}, []),
    "XLA_FLAGS=--xla_cpu_multi_thread_eigen=false": (
        {"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false"}, []),
    "taskset -c 0 (one core)": ({}, ["taskset", "-c", "0"]),
}


def threads_study(args):
    """Ours fwd+bwd at one shape in child processes: default, the Eigen flag, one-core affinity.
    cpu/wall (process CPU seconds per wall second) shows how many cores were actually busy."""
    results = {}
    for name, (env, prefix) in THREAD_VARIANTS.items():
        if prefix and shutil.which(prefix[0]) is None:
            log(f"threads study: {name}: {prefix[0]} not found, skipped")
            continue
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            cmd = prefix + [sys.executable, "-m", "benchmarks.run", "--shapes",
                            args.threads_shape, "--peers", "", "--repeats", str(args.repeats),
                            "--device", "cpu", "--json", out.name]
            log(f"threads study: {name}")
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, **env})
            child = json.load(open(out.name))
        results[name] = dict(shape=args.threads_shape, cpu_affinity=child["machine"]["cpu_affinity"],
                             **child["results"][0]["ours_fwd_bwd"])
    base = results["default"]["median_s"]
    lines = [f"ours fwd+bwd at B,T,U,V = {args.threads_shape}", "",
             "| setting | cores visible | median ms | vs default | cpu/wall |", "|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['cpu_affinity']} | {1e3 * r['median_s']:.3g} | "
                     f"{r['median_s'] / base:.2f} | {r['cpu_per_wall']:.2f} |")
    return results, "\n".join(lines)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", help='"B,T,U,V;B,T,U,V;..." (default: a < 5 minute CPU set)')
    ap.add_argument("--full", action="store_true", help="T=2000, U=100, B in {8,32}, "
                    "V in {100,1000,2000,10000}")
    ap.add_argument("--quick", action="store_true", help="two tiny shapes, 3 repeats")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per measurement "
                    "after one warm-up (default 5, --quick 3)")
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--impl", choices=("auto", "ffi", "xla"), default="auto",
                    help="ours: compiled kernels (auto/ffi) or the pure-XLA fallback")
    ap.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated subset of {PEERS}")
    ap.add_argument("--mem-budget-gib", type=float, default=6.0,
                    help="skip a peer whose memory would exceed this (default 6)")
    ap.add_argument("--peer-max-seconds", type=float, default=120.0, help="skip a peer whose "
                    "estimated time for one shape (warm-up + check + repeats) exceeds this")
    ap.add_argument("--json", help="also write the raw results and machine info here")
    ap.add_argument("--threads", action="store_true", help="instead of the table: ours fwd+bwd "
                    "at --threads-shape with all cores vs restricted to one")
    ap.add_argument("--threads-shape", default="8,300,40,500")
    args = ap.parse_args(argv)
    args.peers = [s for s in args.peers.split(",") if s]
    unknown = set(args.peers) - set(PEERS)
    if unknown:
        ap.error(f"--peers: unknown {sorted(unknown)}; choose from {PEERS}")
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    spec = args.shapes or (FULL_SHAPES if args.full else QUICK_SHAPES if args.quick
                           else DEFAULT_SHAPES)
    args.shape_list = [tuple(int(n) for n in s.split(",")) for s in spec.split(";") if s.strip()]
    return args


def main(argv=None):
    args = parse_args(argv)
    device = jax.devices(args.device)[0]
    report = dict(machine=machine_info(device), command="python -m benchmarks.run " +
                  " ".join(argv if argv is not None else sys.argv[1:]), repeats=args.repeats)
    if args.threads:
        report["threads"], text = threads_study(args)
    else:
        if "torchaudio" in args.peers and not peers.torchaudio_available():
            log("torchaudio does not import (or has no rnnt_loss): its column stays empty")
        rates, rows = {}, []
        for shape in args.shape_list:
            rows.append(bench_shape(shape, args, device, rates))
        report["results"] = rows
        text = table(rows)
    report["machine"]["load_average_at_end"] = os.getloadavg()
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
