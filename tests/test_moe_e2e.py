"""Every user path of issue 23 end to end on small MoE GGUFs (benchmarks/make_shapes.write_moe):
gpt-oss (MXFP4 experts, clamped SwiGLU, biases), qwen3moe (Q8_0 experts) and qwen2moe (a shared
expert). `sample`, `best_of_n` with NAD, RAD and route-knn and early stopping, NEAT calibration and
run-time exit, NEX, NeuReasoner calibration and correction, from the Python API and the command
line; `neurotap serve` is tested in test_moe_server.py... (below, with the official openai client).

The weights are random, so the text is garbage: the tests assert structure, determinism and
equality with reference runs (the same samples decoded alone, numpy recomputations), never content."""
from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import neurotap
from neurotap import nad, neat
from neurotap.apps.cli import main
from neurotap.methods import neureasoner as nr
from neurotap.methods.selection import nex_input, select
from neurotap.scoring.nex import nex_scores
from neurotap.scoring.tasks import arith, format_prompt

from conftest import THREADS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import make_shapes  # noqa: E402

NEEDS_MODEL = True  # the MoE files carry the default model's tokenizer (see conftest.py)
gguf = pytest.importorskip("gguf")

ARCHS = {
    "gpt-oss": dict(arch="gpt-oss", weight_type="mxfp4", seed=6, layers=3),
    "qwen3moe": dict(arch="qwen3moe", weight_type="q8_0", seed=1, layers=3),
    "qwen2moe": dict(arch="qwen2moe", n_ff_shexp=48, seed=3, layers=3),
}
MSGS = [{"role": "user", "content": "Name three colors."}]
EARLY = {"knn": ("contributions",), "rad": ("routing",), "route-knn": ("routing",)}


@pytest.fixture(scope="module")
def moe_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("moe_e2e")
    return {name: str(make_shapes.write_moe(d / f"{name}.gguf", **kw)) for name, kw in ARCHS.items()}


_models: dict = {}


@pytest.fixture(scope="module")
def moe(moe_files):
    """moe(name): the loaded model of that file (one per module and flash-attention setting)."""
    def get(name: str, flash_attn: bool = True) -> "neurotap.Model":
        if (name, flash_attn) not in _models:
            _models[name, flash_attn] = neurotap.load(moe_files[name], n_ctx=2048, n_threads=THREADS,
                                                      flash_attn=flash_attn)
        return _models[name, flash_attn]
    yield get
    _models.clear()


def _dequantized(path: str) -> dict:
    r = gguf.GGUFReader(path)
    out = {}
    for t in r.tensors:
        a = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)
        out[t.name] = a.reshape([int(x) for x in reversed(t.shape)])
    return out


@pytest.mark.parametrize("arch", list(ARCHS))
def test_sample_is_deterministic_and_the_tap_does_not_change_it(moe, arch):
    m = moe(arch)
    assert m.info.is_moe and m.info.has_chat_template
    a = m.sample(MSGS, n=3, max_tokens=16, seed=1)
    b = m.sample(MSGS, n=3, max_tokens=16, seed=1, reducers=(), tap=False)
    assert [s.tokens for s in a] == [s.tokens for s in b] and len({tuple(s.tokens) for s in a}) == 3
    L, F = m.info.n_layers, m.info.n_ff
    for s in a:
        assert s.n_tokens == 16 and s.active_counts.shape == (16, L)
        # Only computed experts' units are ever active: at most n_used experts (+ the shared one).
        per_token = s.active_counts.max()
        assert 0 < per_token <= m.info.n_expert_used * m.info.n_ff_exp + m.info.n_ff_shexp < F


# gpt-oss has sliding-window layers, so its winner goes on in the race's context (no hand-off,
# race.can_hand_off). There, with flash attention on, the logits of the winner's later steps differ
# from the full run's by up to ~5e-3 in log-probability while every tapped activation is equal
# (found by this test; flash_attn=False makes them equal): llama.cpp's flash attention with
# gpt-oss's attention sinks gives other values once the losers' cells are gone. Random weights
# give flat logits, so such a difference changes a draw; tracked as a known issue (xfail, strict).
GPT_OSS_FA = pytest.mark.xfail(strict=True, reason="gpt-oss + flash attention: the race's winner drifts "
                                                   "numerically once the losers leave (see above)")


@pytest.mark.parametrize("arch, flash_attn", [("gpt-oss", False), ("qwen3moe", True), ("qwen2moe", True)])
@pytest.mark.parametrize("method", list(EARLY))
def test_best_of_n_early_stop_winner_equals_its_run_alone(moe, arch, flash_attn, method):
    """The winner picked after 8 tokens and continued alone draws what it drew in the full run of
    all n samples; the pick is the method's choice on the first 8 tokens; the tokens spent are the
    n prefixes plus the winner's tail."""
    check_early_stop_winner(moe(arch, flash_attn), method)


@GPT_OSS_FA
def test_gpt_oss_race_winner_with_flash_attention(moe):
    check_early_stop_winner(moe("gpt-oss", True), "knn")


def check_early_stop_winner(m, method):
    r = nad.best_of_n(m, MSGS, n=4, method=method, early_stop=8, max_tokens=32, seed=4)
    full = m.sample(MSGS, n=4, max_tokens=32, seed=4, reducers=EARLY[method], chunk=8)
    assert r.sample.tokens == full[r.index].tokens and r.text == full[r.index].text
    assert r.sample.n_tokens == 32  # random weights: no sample ends before max_tokens
    assert r.index == select(r.candidates, method, tokens=8, k=3)
    assert r.index == select([s for s in full], method, tokens=8, k=3)  # the prefixes are the full runs' prefixes
    assert r.tokens_generated == nad.early_stop_tokens(r.candidates, full, r.index, 8) < 4 * 32
    if method == "knn":
        assert r.similarity.shape == (4, 4)
    else:  # routing only: no neuron sets were recorded
        assert r.candidates[0].contribution_sets is None and r.candidates[0].routing_ids is not None


def test_best_of_n_on_complete_answers(moe):
    m = moe("gpt-oss")
    for method in ("knn", "rad", "route-knn"):
        r = nad.best_of_n(m, MSGS, n=3, method=method, early_stop=None, max_tokens=12, seed=2)
        full = m.sample(MSGS, n=3, max_tokens=12, seed=2, reducers=EARLY[method])
        assert [c.tokens for c in r.candidates] == [s.tokens for s in full]
        assert r.index == select(full, method, k=3) and r.sample.tokens == full[r.index].tokens


def test_cli_sample_info_and_eval(moe, moe_files, capsys, tmp_path):
    m, path = moe("qwen2moe"), moe_files["qwen2moe"]
    assert main(["info", path, "--threads", str(THREADS)]) == 0
    out = capsys.readouterr().out
    assert "qwen2moe" in out and f"n_ff          {m.info.n_ff}" in out and "ffn_moe_swiglu-0" in out
    assert main(["sample", "Name three colors.", "--model", path, "-n", "2", "--max-tokens", "12", "--seed", "3",
                 "--threads", str(THREADS)]) == 0
    out = capsys.readouterr().out
    ref = m.sample(MSGS, n=2, max_tokens=12, seed=3)
    assert out.count("--- sample") == 2 and all(f"\n{s.text}\n" in out for s in ref)
    rep = tmp_path / "r.json"
    assert main(["eval", "--model", path, "--tasks", "arith", "--limit", "1", "-n", "3", "--max-tokens", "12",
                 "--early-stop", "4", "--methods", "knn,rad,route-knn", "--threads", str(THREADS), "--quiet",
                 "--out", str(rep)]) == 0
    row = json.loads(rep.read_text())["tasks"][0]
    assert set(row["early_picks"]) == {"knn", "rad", "route-knn"} and len(row["samples"]) == 3
