"""RAD and routing-set agreement (neurotap.methods.rad) on a real MoE GGUF run through llama.cpp:
the picks equal a direct recomputation from the samples' routing records, and the methods work
through best_of_n (early and on complete answers) and `neurotap eval`."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import neurotap
from neurotap.methods.nad import best_of_n
from neurotap.methods.rad import rad_states, rad_windows, route_sets
from neurotap.methods.selection import select

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import make_shapes  # noqa: E402

pytest.importorskip("gguf")
PROMPT = "Answer with \\boxed{} please:"


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory):
    path = make_shapes.write_moe(tmp_path_factory.mktemp("rad") / "qwen3moe.gguf", arch="qwen3moe", seed=11)
    return neurotap.load(str(path), n_ctx=2048)


def direct_state(s, n_expert, a, b):
    """The window's mean gate weight per (layer, expert), by loops."""
    L = s.routing_ids.shape[1]
    v = np.zeros((L, n_expert))
    for t in range(a, b):
        for l in range(L):
            for e, w in zip(s.routing_ids[t, l], s.routing_weights[t, l]):
                v[l, e] += w
    return v.ravel() / max(b - a, 1)


def direct_knn_pick(S, k):
    n = len(S)
    scores = [np.sort(np.delete(S[i], i))[-k:].mean() for i in range(n)]
    return int(np.argmax(scores))


def test_rad_pick_equals_direct_recomputation(moe_model):
    samples = moe_model.sample(PROMPT, n=6, max_tokens=24, seed=4, temperature=1.0, reducers=("routing",))
    E = moe_model.info.n_expert
    for tokens in (8, None):
        wins = rad_windows(samples, tokens)
        assert all(0 <= a <= b <= s.n_tokens for (a, b), s in zip(wins, samples))
        V = np.stack([direct_state(s, E, a, b) for s, (a, b) in zip(samples, wins)])
        np.testing.assert_allclose(rad_states(samples, tokens)[:, :V.shape[1]], V, rtol=1e-6, atol=1e-9)
        S = np.array([[np.minimum(x, y).sum() / np.maximum(x, y).sum() for y in V] for x in V])
        assert select(samples, "rad", tokens=tokens, k=3) == direct_knn_pick(S, 3)
    # Routing sets: the (layer, expert) pairs of the first 8 tokens.
    M = route_sets(samples, 8)
    for s, m in zip(samples, M):
        L = s.routing_ids.shape[1]
        want = {(l, int(e)) for t in range(min(8, s.n_tokens)) for l in range(L) for e in s.routing_ids[t, l]}
        got = {(int(i) // (M.shape[1] // L), int(i) % (M.shape[1] // L)) for i in np.flatnonzero(m)}
        assert got == want
    assert 0 <= select(samples, "route-knn", tokens=8) < 6


def test_anchor_window_follows_the_text(moe_model):
    s = moe_model.sample(PROMPT, n=1, max_tokens=16, seed=1, reducers=("routing",))[0]
    assert len(s.piece_end) == s.n_tokens and np.all(np.diff(s.piece_end.astype(np.int64)) >= 0)
    # piece_end[j]: the bytes of the first j + 1 tokens' pieces (the raw text, before UTF-8 decoding)
    want = np.cumsum([len(moe_model.token_piece(t)) for t in s.tokens])
    np.testing.assert_array_equal(s.piece_end, want)


def test_best_of_n_with_rad_early_and_complete(moe_model):
    early = best_of_n(moe_model, PROMPT, n=4, method="rad", early_stop=8, max_tokens=20, seed=2)
    assert 0 <= early.index < 4 and early.similarity is None  # routing only: no neuron sets recorded
    assert early.candidates[0].routing_ids is not None and early.candidates[0].contribution_sets is None
    full = best_of_n(moe_model, PROMPT, n=4, method="rad", early_stop=None, max_tokens=12, seed=2)
    assert full.index == select(full.candidates, "rad", k=3)
    rk = best_of_n(moe_model, PROMPT, n=4, method="route-knn", early_stop=8, max_tokens=12, seed=2)
    assert 0 <= rk.index < 4


def test_rad_refuses_a_dense_model():
    dense = neurotap.load(n_ctx=512)
    with pytest.raises(ValueError, match="mixture-of-experts"):
        best_of_n(dense, "Hi", n=2, method="rad", early_stop=4, max_tokens=8)


def test_eval_runs_rad_on_moe(moe_model, tmp_path):
    out = tmp_path / "report.json"
    r = subprocess.run([sys.executable, "-m", "neurotap", "eval", "-m", moe_model.info.path, "--tasks", "arith", "--limit", "1", "--n", "3",
                        "--max-tokens", "12", "--early-stop", "4", "--methods", "rad,route-knn,knn", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(out.read_text())
    row = rep["tasks"][0]
    assert set(row["early_picks"]) == {"rad", "route-knn", "knn"}
