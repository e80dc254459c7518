"""The Flax training example (examples/train_flax.py): a short run lowers the loss and writes its
plots, and its small helpers (greedy decoding, edit distance) do what they say."""

import importlib.util
import os

import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("optax")
pytest.importorskip("matplotlib")

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                       "train_flax.py")


@pytest.fixture(scope="module")
def example():
    # Loaded from its file, so the test does not depend on the repository root being importable.
    spec = importlib.util.spec_from_file_location("train_flax", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_short_run_lowers_the_loss_and_writes_the_plots(example, tmp_path):
    result = example.main(["--steps", "30", "--quiet", "--out", str(tmp_path)])
    losses = np.array(result["losses"])
    assert losses.shape == (30,) and np.isfinite(losses).all()
    assert result["train_loss_last"] < 0.8 * result["train_loss_first"]
    assert result["loss_after"] < 0.8 * result["loss_before"]  # on the held-out set
    for key in ("loss_png", "alignment_png"):
        path = result[key]
        assert os.path.dirname(path) == str(tmp_path)
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert os.path.getsize(path) > 10_000
    # The plot's own float64 forward pass gives the library's cost for the same example.
    assert result["alignment_cost"] == pytest.approx(result["library_cost"], rel=1e-4)


def test_edit_distance(example):
    assert example.edit_distance([], []) == 0
    assert example.edit_distance([1, 2, 3], []) == 3
    assert example.edit_distance([], [4, 5]) == 2
    assert example.edit_distance([1, 2, 3], [1, 3]) == 1
    assert example.edit_distance([1, 2, 3], [3, 2, 1]) == 2
    assert example.edit_distance([5, 1, 2, 6], [1, 2, 7, 8]) == 3


def test_greedy_decode_emits_until_blank_and_at_most_max_symbols_per_frame(example):
    V, blank = example.VOCAB, example.BLANK
    # Emissions favour label 3 at frame 0 and label 4 at frame 2; the predictor table forbids
    # repeating the previous label. Frame 1 is blank. Example 1 ends after frame 0.
    emissions = np.zeros((2, 3, V))
    emissions[:, 0, 3] = emissions[:, 2, 4] = 5.0
    emissions[:, :, blank] = 1.0
    table = np.zeros((V, V))
    table[np.arange(V), np.arange(V)] = -10.0
    hyps = example.greedy_decode(emissions, table, np.array([3, 1]))
    assert hyps == [[3, 4], [3]]
    # Without the penalty the same label is emitted again and again: max_symbols per frame.
    hyps = example.greedy_decode(emissions, np.zeros((V, V)), np.array([3, 1]), max_symbols=2)
    assert hyps == [[3, 3, 4, 4], [3, 3]]


def test_alignment_occupancy_and_best_path_by_enumeration(example):
    # Every path from (0, 0) to (T-1, U) is a choice of the frames at which the U labels are
    # emitted (non-decreasing), followed by the final blank out of (T-1, U).
    import itertools
    rng = np.random.default_rng(7)
    T, U = 5, 3
    blank_lp, emit_lp = rng.normal(size=(T, U + 1)) - 1.0, rng.normal(size=(T, U)) - 1.0
    scores, visits = [], []
    for frames in itertools.combinations_with_replacement(range(T), U):
        nodes, t, u, score = [(0, 0)], 0, 0, 0.0
        for emit_t in list(frames) + [T - 1]:
            while t < emit_t:
                score += blank_lp[t, u]
                t += 1
                nodes.append((t, u))
            if u < U:
                score += emit_lp[t, u]
                u += 1
                nodes.append((t, u))
        scores.append(score + blank_lp[T - 1, U])
        visits.append(nodes)
    scores = np.array(scores)
    log_z = np.log(np.exp(scores).sum())

    cost, occupancy, path = example.alignment(blank_lp, emit_lp)
    assert cost == pytest.approx(-log_z, rel=1e-12)
    want = np.zeros((T, U + 1))
    for score, nodes in zip(scores, visits):
        for node in nodes:
            want[node] += np.exp(score - log_z)
    np.testing.assert_allclose(occupancy, want, rtol=1e-10, atol=1e-12)
    assert path == visits[int(np.argmax(scores))]
