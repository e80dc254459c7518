"""Demo: a jitted loss+gradient step and viterbi on a random batch of realistic size.

    python -m jax_transducer.demo [--batch 8 --frames 500 --labels 50 --vocab 1000]
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_transducer as jt


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--frames", type=int, default=500)
    parser.add_argument("--labels", type=int, default=50)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    B, T, U, V = args.batch, args.frames, args.labels, args.vocab

    rng = np.random.default_rng(0)
    emissions = jnp.asarray(rng.normal(size=(B, T, V)), jnp.float32)
    predictions = jnp.asarray(rng.normal(size=(B, U + 1, V)), jnp.float32)
    labels = jnp.asarray(rng.integers(1, V, size=(B, U)), jnp.int32)
    # Example 0 is full length; the others are padded, as in a real batch.
    input_lengths = jnp.asarray(np.r_[T, rng.integers(T // 2, T + 1, size=B - 1)], jnp.int32)
    label_lengths = jnp.asarray(np.r_[U, rng.integers(0, U + 1, size=B - 1)], jnp.int32)

    def loss(e, p):
        return jt.transducer_loss(e, p, labels, input_lengths, label_lengths, reduction="mean")

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    compiled = step.lower(emissions, predictions).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    jax.block_until_ready(step(emissions, predictions))
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        value, (g_e, g_p) = jax.block_until_ready(step(emissions, predictions))
        times.append(time.perf_counter() - start)
    costs = jt.transducer_loss(emissions, predictions, labels, input_lengths, label_lengths)
    best = jax.jit(jt.viterbi)(emissions, predictions, input_lengths, label_lengths)

    joiner = B * T * (U + 1) * V * 4
    print(f"jax_transducer {jt.__version__} on {jax.devices()[0].platform}: "
          f"B={B} T={T} U={U} V={V} (float32), build {jt.build_info()}")
    print("input lengths:", np.asarray(input_lengths).tolist())
    print("label lengths:", np.asarray(label_lengths).tolist())
    print("costs:", [round(float(c), 2) for c in costs])
    print(f"mean loss {float(value):.4f}; gradient norms: emissions {float(jnp.linalg.norm(g_e)):.4f}, "
          f"predictions {float(jnp.linalg.norm(g_p)):.4f}")
    n = int(label_lengths[0])
    print(f"example 0 best path ({n} labels), first 20:", np.asarray(best[0, :min(n, 20)]).tolist())
    print(f"jitted loss+gradient step: median {1e3 * float(np.median(times)):.1f} ms "
          f"over {args.repeats} runs")
    print(f"compiled temp memory: {temp / 2**20:.1f} MiB; a (B,T,U+1,V) float32 joiner alone "
          f"would need {joiner / 2**20:.1f} MiB ({joiner / max(temp, 1):.0f}x)")


if __name__ == "__main__":
    main()
