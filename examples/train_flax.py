"""Train a small Flax transducer with jax_transducer's loss on a synthetic transcription task.

    python -m examples.train_flax [--steps 2000] [--batch 32] [--seed 0] [--out DIR] [--quiet]

Run it from the repository root (`python examples/train_flax.py` works too, and uses the
installed jax_transducer). It needs the `examples` extra: `pip install -e ".[examples]"` (flax,
optax and matplotlib; tqdm for the progress bar, which falls back to plain lines without it).

The task: each utterance is a sequence of 1-10 labels out of 20 (printed as the letters a-t; 0 is
the blank), rendered as acoustic-like features: every label is 2-4 frames (at random) of its own
16-dimensional pattern of +-1 plus unit Gaussian noise, with 0-2 frames of silence (noise only)
before, between and after the labels, so input and label lengths vary. Consecutive labels differ,
as this small model could not learn repeats: its encoder sees 9 frames and its predictor only the
previous label, so after emitting label k it cannot tell the rest of k's frames from a second k.

The model: a convolutional encoder projects the frames to V = 21 scores (emissions, (B, T, V)), a
stateless prediction network embeds the previous label and projects it to V scores (predictions,
(B, U+1, V)), and the joiner adds them, which is what `jax_transducer.transducer_loss` takes. A
jitted Adam step trains it on fresh random batches. Before and after training it prints, on a
fixed held-out set: the loss, the teacher-forced accuracy (`jax_transducer.viterbi`'s labels
against the true labels, per position below the label length) and the greedy-decoding accuracy
(1 - edit distance / reference length, floored at 0, and the exact-match rate). It saves into
`--out` (default examples/out/): `loss.png`, the loss and accuracy curves, and `alignment.png`,
one held-out example's features and its best path drawn as a staircase over the (T, U+1) lattice,
on the posterior occupancy of each node.

`main(argv)` returns the metrics as a dict (tests/test_example_train.py runs a short version).
"""

import argparse
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import flax.linen as nn
import optax

import jax_transducer as jt

BLANK = 0
NUM_LABELS = 20          # labels 1..20, printed as a..t
VOCAB = NUM_LABELS + 1   # V, blank included
FEATURES = 16            # F, feature dimension of a frame
MAX_LABELS = 10          # U, longest transcription
DURATION = (2, 4)        # frames per label, inclusive range
SILENCE = (0, 2)         # silence frames before, between and after labels, inclusive range
MAX_FRAMES = (MAX_LABELS + 1) * SILENCE[1] + MAX_LABELS * DURATION[1]  # T, padded length
NOISE = 1.0              # standard deviation of the frame noise; patterns are +-1
EVAL_SIZE = 256          # held-out utterances
MAX_SYMBOLS = 3          # greedy decoding: most labels emitted at one frame

# --------------------------------------------------------------------------------------------
# Data


def make_patterns(rng):
    """(NUM_LABELS + 1, F) float32: row k is label k's frame pattern; row 0 (silence) is zero."""
    patterns = rng.choice([-1.0, 1.0], size=(VOCAB, FEATURES)).astype(np.float32)
    patterns[BLANK] = 0.0
    return patterns


def make_batch(rng, patterns, batch):
    """A batch of synthetic utterances, padded to (MAX_FRAMES, MAX_LABELS).

    Returns a dict of NumPy arrays: features (B, T, F) float32 (padding frames are silence),
    labels (B, U) int32 in [1, NUM_LABELS] (padding holds the blank), input_lengths (B,) and
    label_lengths (B,) int32, and the true segmentation (for the plot only): label u of example b
    occupies frames starts[b, u] <= t < ends[b, u] (B, U) int32.
    """
    features = (rng.normal(size=(batch, MAX_FRAMES, FEATURES)) * NOISE).astype(np.float32)
    labels = np.full((batch, MAX_LABELS), BLANK, np.int32)
    starts, ends = np.zeros((2, batch, MAX_LABELS), np.int32)
    input_lengths = np.zeros(batch, np.int32)
    label_lengths = rng.integers(1, MAX_LABELS + 1, size=batch).astype(np.int32)
    for b in range(batch):
        t = rng.integers(SILENCE[0], SILENCE[1] + 1)
        for u in range(label_lengths[b]):
            # Consecutive labels differ: draw from the NUM_LABELS - 1 others.
            label = rng.integers(1, NUM_LABELS + 1) if u == 0 else \
                1 + (labels[b, u - 1] - 1 + rng.integers(1, NUM_LABELS)) % NUM_LABELS
            labels[b, u] = label
            duration = rng.integers(DURATION[0], DURATION[1] + 1)
            features[b, t:t + duration] += patterns[label]
            starts[b, u], ends[b, u] = t, t + duration
            t += duration + rng.integers(SILENCE[0], SILENCE[1] + 1)
        input_lengths[b] = t + rng.integers(SILENCE[0], SILENCE[1] + 1)
    return {"features": features, "labels": labels, "input_lengths": input_lengths,
            "label_lengths": label_lengths, "starts": starts, "ends": ends}


def text(labels):
    return "".join(chr(ord("a") + int(k) - 1) for k in labels)

# --------------------------------------------------------------------------------------------
# Model


class Encoder(nn.Module):
    """(B, T, F) frames -> (B, T, V) emission scores: two residual 1-D convolutions over 5 frames,
    so each output sees 9 frames."""
    hidden: int = 64

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(self.hidden)(x))
        for _ in range(2):
            x = x + nn.relu(nn.Conv(self.hidden, kernel_size=(5,))(x))
        return nn.Dense(VOCAB)(x)


class Predictor(nn.Module):
    """(..., ) previous labels (blank = start of the utterance) -> (..., V) prediction scores."""
    hidden: int = 32

    @nn.compact
    def __call__(self, previous):
        return nn.Dense(VOCAB)(nn.tanh(nn.Embed(VOCAB, self.hidden)(previous)))


class Transducer(nn.Module):
    """The encoder and the prediction network; the additive joiner lives in the loss."""

    def setup(self):
        self.encoder = Encoder()
        self.predictor = Predictor()

    def __call__(self, features, labels):
        """-> emissions (B, T, V), predictions (B, U+1, V). Row u of the predictions comes after
        labels[:u]; this predictor sees only the last of them (the blank for u = 0)."""
        previous = jnp.pad(labels, ((0, 0), (1, 0)), constant_values=BLANK)
        return self.encoder(features), self.predictor(previous)

    def predict(self, previous):
        return self.predictor(previous)


def batch_loss(model, params, batch, reduction="mean"):
    emissions, predictions = model.apply(params, batch["features"], batch["labels"])
    return jt.transducer_loss(emissions, predictions, batch["labels"], batch["input_lengths"],
                              batch["label_lengths"], blank=BLANK, reduction=reduction)

# --------------------------------------------------------------------------------------------
# Decoding and metrics


def greedy_decode(emissions, table, input_lengths, max_symbols=MAX_SYMBOLS):
    """Greedy RNN-T decoding: at each frame emit the argmax label until it is the blank (at most
    `max_symbols` labels per frame). The predictor is stateless, so its scores for every previous
    label are one (V, V) `table`. emissions (B, T, V) -> a list of B label lists."""
    batch, frames, _ = emissions.shape
    previous = np.full(batch, BLANK)
    hyps = [[] for _ in range(batch)]
    for t in range(frames):
        active = t < input_lengths
        for _ in range(max_symbols):
            best = np.argmax(emissions[:, t] + table[previous], axis=-1)
            active &= best != BLANK
            if not active.any():
                break
            for b in np.flatnonzero(active):
                hyps[b].append(int(best[b]))
            previous = np.where(active, best, previous)
    return hyps


def edit_distance(a, b):
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        diagonal, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (x != y))
    return row[-1]


class Evaluator:
    """Metrics on a fixed held-out batch: loss, teacher-forced accuracy, greedy token accuracy and
    exact-match rate. The model's outputs are computed by one jitted function."""

    def __init__(self, model, batch):
        self.batch = batch
        self.inputs = model_inputs(batch)
        self.refs = [list(map(int, l[:n])) for l, n in zip(batch["labels"], batch["label_lengths"])]

        @jax.jit
        def outputs(params, batch):
            emissions, predictions = model.apply(params, batch["features"], batch["labels"])
            costs = jt.transducer_loss(emissions, predictions, batch["labels"],
                                       batch["input_lengths"], batch["label_lengths"], blank=BLANK)
            best = jt.viterbi(emissions, predictions, batch["input_lengths"],
                              batch["label_lengths"], blank=BLANK)
            # The stateless predictor's scores after every possible previous label: (V, V).
            table = model.apply(params, jnp.arange(VOCAB), method=Transducer.predict)
            return emissions, predictions, costs, best, table

        self.outputs = outputs

    def __call__(self, params):
        """-> dict of the four metrics (floats) and the raw outputs (NumPy) for the plots."""
        emissions, predictions, costs, best, table = jax.device_get(
            self.outputs(params, self.inputs))
        labels, lengths = self.batch["labels"], self.batch["label_lengths"]
        used = np.arange(labels.shape[1]) < lengths[:, None]
        hyps = greedy_decode(emissions, table, self.batch["input_lengths"])
        errors = sum(edit_distance(h, r) for h, r in zip(hyps, self.refs))
        return {
            "loss": float(costs.mean()),
            "teacher_forced_acc": float((best == labels)[used].mean()),
            "greedy_acc": max(0.0, 1.0 - errors / int(lengths.sum())),
            "greedy_exact": float(np.mean([h == r for h, r in zip(hyps, self.refs)])),
            "hyps": hyps, "emissions": emissions, "predictions": predictions, "costs": costs,
        }


METRICS = {"loss": "loss (nats per utterance)",
           "teacher_forced_acc": "teacher-forced accuracy (viterbi)",
           "greedy_acc": "greedy token accuracy",
           "greedy_exact": "greedy exact match"}

# --------------------------------------------------------------------------------------------
# The lattice of one example, for the alignment plot (float64 NumPy, one example at a time)


def lattice_log_probs(emissions, predictions, labels):
    """emissions (T, V), predictions (U+1, V), labels (U,) of one example, unpadded ->
    blank_lp (T, U+1): log-prob of the blank out of node (t, u); emit_lp (T, U): of labels[u]."""
    logits = emissions[:, None, :].astype(np.float64) + predictions[None, :, :]
    peak = logits.max(-1, keepdims=True)
    log_probs = logits - peak - np.log(np.exp(logits - peak).sum(-1, keepdims=True))
    return log_probs[:, :, BLANK], log_probs[:, np.arange(len(labels)), labels]


def alignment(blank_lp, emit_lp):
    """Forward-backward and Viterbi over one lattice (T, U+1).

    Returns (cost, occupancy, path): cost is -log of the total probability of the paths from
    (0, 0) that end with the blank out of (T-1, U), the quantity transducer_loss computes;
    occupancy (T, U+1) is the posterior probability that a path visits node (t, u), which is
    minus the gradient of the cost with respect to the log-probs of the two moves out of the node,
    summed (it sums to 1 along every anti-diagonal t + u = k); path is the best path's nodes from
    (0, 0) to (T-1, U).
    """
    frames, nodes = blank_lp.shape
    alpha, beta, best = np.full((3, frames, nodes), -np.inf)
    by_label = np.zeros((frames, nodes), bool)  # the best path into (t, u) is a label move
    alpha[0, 0] = best[0, 0] = 0.0
    for t in range(frames):
        for u in range(nodes):
            if t == u == 0:
                continue
            blank_in = blank_lp[t - 1, u] + np.array([alpha[t - 1, u], best[t - 1, u]]) \
                if t else np.full(2, -np.inf)
            label_in = emit_lp[t, u - 1] + np.array([alpha[t, u - 1], best[t, u - 1]]) \
                if u else np.full(2, -np.inf)
            alpha[t, u] = np.logaddexp(blank_in[0], label_in[0])
            best[t, u] = max(blank_in[1], label_in[1])
            by_label[t, u] = label_in[1] > blank_in[1]
    for t in reversed(range(frames)):
        for u in reversed(range(nodes)):
            after_blank = beta[t + 1, u] if t + 1 < frames else 0.0 if u + 1 == nodes else -np.inf
            after_label = beta[t, u + 1] if u + 1 < nodes else -np.inf
            beta[t, u] = np.logaddexp(blank_lp[t, u] + after_blank,
                                      (emit_lp[t, u] if u + 1 < nodes else 0.0) + after_label)
    log_z = beta[0, 0]
    path = [(frames - 1, nodes - 1)]
    while path[-1] != (0, 0):
        t, u = path[-1]
        path.append((t, u - 1) if by_label[t, u] else (t - 1, u))
    return -log_z, np.exp(alpha + beta - log_z), path[::-1]

# --------------------------------------------------------------------------------------------
# Plots


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_curves(path, losses, history):
    """Training loss per step (and its running mean) and the held-out metrics over the run."""
    plt = _pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    steps = np.arange(1, len(losses) + 1)
    ax_loss.plot(steps, losses, color="0.75", lw=0.7, label="train batch")
    window = max(1, len(losses) // 30)
    if losses:
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax_loss.plot(steps[window - 1:], smooth, color="C0", label=f"train, mean of {window}")
    ax_loss.plot([h["step"] for h in history], [h["loss"] for h in history], "o-", color="C3",
                 ms=3, label="held-out")
    ax_loss.set(yscale="log", xlabel="step", ylabel=METRICS["loss"], title="transducer loss")
    ax_loss.legend()
    for key in ("teacher_forced_acc", "greedy_acc", "greedy_exact"):
        ax_acc.plot([h["step"] for h in history], [h[key] for h in history], "o-", ms=3,
                    label=METRICS[key])
    ax_acc.set(ylim=(-0.02, 1.02), xlabel="step", ylabel="accuracy", title="held-out accuracy")
    ax_acc.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_alignment(path, features, labels, starts, ends, occupancy, best_path, hyp):
    """One example: its features with the true label segments, and over the (T, U+1) lattice the
    posterior occupancy of each node with the best path as a staircase."""
    plt = _pyplot()
    frames, nodes = occupancy.shape
    fig, (ax_f, ax_a) = plt.subplots(2, 1, figsize=(10, 7), sharex=True,
                                     gridspec_kw={"height_ratios": [1, 1.6]})
    ax_f.imshow(features.T, aspect="auto", origin="lower", cmap="RdBu_r",
                extent=(-0.5, frames - 0.5, -0.5, features.shape[1] - 0.5))
    for label, start, end in zip(labels, starts, ends):
        ax_f.axvspan(start - 0.5, end - 0.5, ymin=0.9, color="k", alpha=0.6)
        ax_f.text((start + end - 1) / 2, features.shape[1] - 1.5, text([label]), color="w",
                  ha="center", va="center", fontweight="bold")
    ax_f.set(ylabel="feature",
             title=f"features, true segments on top: reference {text(labels)!r}, "
                   f"greedy {text(hyp)!r}")

    image = ax_a.imshow(occupancy.T, aspect="auto", origin="lower", cmap="Greys", vmin=0, vmax=1,
                        extent=(-0.5, frames - 0.5, -0.5, nodes - 0.5))
    for start in starts:
        ax_a.axvline(start - 0.5, color="C0", lw=0.8, ls=":")
    # The staircase: a blank move goes right, a label move up; the final blank leaves (T-1, U).
    ts, us = zip(*best_path)
    ax_a.plot(list(ts) + [frames - 0.5], list(us) + [us[-1]], color="C3", lw=2, label="best path")
    emits = [(t, u) for (t, u), (_, u2) in zip(best_path, best_path[1:]) if u2 > u]
    ax_a.plot([t for t, _ in emits], [u + 0.5 for _, u in emits], "^", color="C3", ms=6)
    ax_a.set_yticks(np.arange(nodes - 1) + 0.5, list(text(labels)))
    ax_a.set(xlabel="frame t", ylabel="label u (emitted between rows)",
             title="lattice: posterior occupancy of each node, best path, segment starts (dotted)")
    ax_a.legend(loc="upper left")
    fig.colorbar(image, ax=[ax_f, ax_a], shrink=0.5, label="occupancy")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)

# --------------------------------------------------------------------------------------------


def parse_args(argv):
    default_out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="training steps (default 2000)")
    parser.add_argument("--batch", type=int, default=32, help="utterances per step (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the task, data and model")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak Adam learning rate")
    parser.add_argument("--out", default=default_out,
                        help="directory for the plots (default: examples/out)")
    parser.add_argument("--quiet", action="store_true", help="print nothing")
    return parser.parse_args(argv)


def progress(steps, quiet):
    """(iterable, report(step, loss)): tqdm's bar where tqdm is installed, else a plain line every
    tenth of the run; nothing when quiet."""
    if quiet:
        return range(steps), lambda step, loss: None
    try:
        from tqdm import tqdm
    except ImportError:
        every = max(1, steps // 10)

        def report(step, loss):
            if (step + 1) % every == 0:
                print(f"step {step + 1}/{steps}  loss {loss:.3f}", flush=True)
        return range(steps), report
    bar = tqdm(range(steps), desc="training", unit="step")
    return bar, lambda step, loss: bar.set_postfix(loss=f"{loss:.3f}", refresh=False)


def model_inputs(batch):
    return {k: jnp.asarray(batch[k]) for k in ("features", "labels", "input_lengths",
                                               "label_lengths")}


def main(argv=None):
    """Train, evaluate, plot; returns the metrics (see the end of this function) as a dict."""
    args = parse_args(argv)
    say = (lambda *a: None) if args.quiet else functools.partial(print, flush=True)
    start = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    patterns = make_patterns(rng)
    eval_set = make_batch(rng, patterns, EVAL_SIZE)

    model = Transducer()
    batch = model_inputs(make_batch(rng, patterns, args.batch))
    params = jax.jit(model.init)(jax.random.key(args.seed), batch["features"], batch["labels"])
    schedule = optax.cosine_decay_schedule(args.lr, max(1, args.steps), alpha=0.05)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(lambda p: batch_loss(model, p, batch))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    evaluate = Evaluator(model, eval_set)
    before = evaluate(params)
    history = [{"step": 0, **{k: before[k] for k in METRICS}}]
    eval_every = max(1, args.steps // 15)

    losses = []
    steps, report = progress(args.steps, args.quiet)
    for step in steps:
        params, opt_state, loss = train_step(params, opt_state, batch)
        batch = model_inputs(make_batch(rng, patterns, args.batch))  # while the step runs
        losses.append(float(loss))
        report(step, losses[-1])
        if (step + 1) % eval_every == 0 or step + 1 == args.steps:
            metrics = evaluate(params)
            history.append({"step": step + 1, **{k: metrics[k] for k in METRICS}})
    if hasattr(steps, "close"):
        steps.close()
    after = evaluate(params) if args.steps else before
    train_seconds = time.perf_counter() - start

    # The plots; the alignment is that of the first held-out example with 5 labels or more.
    os.makedirs(args.out, exist_ok=True)
    curves_png = os.path.join(args.out, "loss.png")
    alignment_png = os.path.join(args.out, "alignment.png")
    plot_curves(curves_png, losses, history)
    b = int(np.argmax(eval_set["label_lengths"] >= 5))
    frames, length = eval_set["input_lengths"][b], eval_set["label_lengths"][b]
    labels = eval_set["labels"][b, :length]
    cost, occupancy, best_path = alignment(*lattice_log_probs(
        after["emissions"][b, :frames], after["predictions"][b, :length + 1], labels))
    plot_alignment(alignment_png, eval_set["features"][b, :frames], labels,
                   eval_set["starts"][b, :length], eval_set["ends"][b, :length], occupancy,
                   best_path, after["hyps"][b])

    tail = losses[-max(1, len(losses) // 10):]
    result = {
        "steps": args.steps, "batch": args.batch, "losses": losses, "history": history,
        "train_loss_first": losses[0] if losses else float("nan"),
        "train_loss_last": float(np.mean(tail)) if losses else float("nan"),
        **{f"{k}_before": before[k] for k in METRICS}, **{f"{k}_after": after[k] for k in METRICS},
        "loss_png": curves_png, "alignment_png": alignment_png,
        # The plot's own float64 forward pass against the library's cost of the same example.
        "alignment_cost": float(cost), "library_cost": float(after["costs"][b]),
        "train_seconds": train_seconds, "wall_seconds": time.perf_counter() - start,
    }

    say(f"\njax_transducer {jt.__version__} on {jax.devices()[0].platform}: {args.steps} steps of "
        f"{args.batch} utterances (T <= {MAX_FRAMES}, U <= {MAX_LABELS}, V = {VOCAB}); "
        f"held-out set of {EVAL_SIZE}")
    say(f"{'':36}{'before':>9}{'after':>9}")
    for key, name in METRICS.items():
        say(f"{name:36}{before[key]:9.3f}{after[key]:9.3f}")
    say(f"train loss: first step {result['train_loss_first']:.3f}, "
        f"mean of the last {len(tail)} steps {result['train_loss_last']:.3f}")
    for i in range(3):
        say(f"  reference {text(evaluate.refs[i])!r:13} greedy {text(after['hyps'][i])!r}")
    say(f"wall time {result['wall_seconds']:.1f} s "
        f"(training and evaluation {train_seconds:.1f} s, compilation included)")
    say(f"plots: {curves_png}, {alignment_png}")
    return result


if __name__ == "__main__":
    main()
