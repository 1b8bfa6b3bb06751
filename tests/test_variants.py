"""Quantized variants and ranking them with NEX; the `nex` command's phase plot."""
import json

import numpy as np
import pytest

import neurotap
from neurotap.apps.cli import main
from neurotap.apps.quantize import quantize
from neurotap.methods import selection
from neurotap.scoring.tasks import arith, format_prompt

NEEDS_MODEL = True  # every test here runs the real model (see conftest.py)


@pytest.fixture(scope="module")
def q8(tmp_path_factory):
    out = tmp_path_factory.mktemp("variants") / "smol-q8_0.gguf"
    quantize("smollm2-135m", out, "q8_0", threads=2)
    return out


def test_quantize_makes_a_loadable_variant(q8, model):
    m = neurotap.load(str(q8), n_ctx=256, n_threads=2)
    assert m.info.n_layers == model.info.n_layers and m.info.n_ff == model.info.n_ff
    assert m.info.size_bytes > model.info.size_bytes  # 8-bit weights are larger than Q4_1
    g = m.generate("The capital of France is", max_tokens=4, temperature=0)
    assert g.n_tokens == 4
    assert not [p for p in q8.parent.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_quantize_bad_input(tmp_path):
    with pytest.raises(ValueError, match="unknown quantization type 'Q9_9'.*Q8_0"):
        quantize("smollm2-135m", tmp_path / "x.gguf", "Q9_9")
    src = neurotap.resolve("smollm2-135m")
    with pytest.raises(ValueError, match="overwrite the input"):
        quantize(str(src), src, "Q8_0")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 10)
    with pytest.raises(neurotap.ModelError):
        quantize(str(bad), tmp_path / "y.gguf", "Q8_0")
    assert not (tmp_path / "y.gguf").exists()


def test_rank_models_with_labels(q8, tmp_path, capsys):
    out = tmp_path / "rank.json"
    rc = main(["rank-models", "smollm2-135m", str(q8), "--tasks", "arith", "--limit", "2", "-n", "3",
               "--max-tokens", "64", "--labels", "--out", str(out), "--quiet", "--threads", "2"])
    assert rc == 0
    rep = json.loads(out.read_text())
    assert sorted(v["nex_rank"] for v in rep["variants"]) == [1, 2]
    for v in rep["variants"]:
        assert v["responses"] == 6 and 0 <= v["nex"] <= 1 and 0 <= v["accuracy"] <= 1
        assert np.isclose(v["nex"], np.mean(v["nex_scores"]), atol=1e-4)
    # The scores are those of the public API on the same tasks and seeds (the variant's own samples,
    # NEX weights from all its responses), not a recomputation of the command's own arithmetic.
    base = neurotap.load("smollm2-135m", n_ctx=512, n_threads=2)
    responses = []
    for i, task in enumerate(arith(2, 0)):
        prompt = [{"role": "user", "content": format_prompt(task)}]
        for s in base.sample(prompt, n=3, max_tokens=64, seed=i, reducers=("contributions",), chunk=1):
            responses.append(selection.nex_input(s))
    want = neurotap.nex.nex_scores(responses)
    got = next(v for v in rep["variants"] if v["model"] == "smollm2-135m")
    np.testing.assert_allclose(got["nex_scores"], want, atol=1e-5)
    assert "spearman_nex_vs_accuracy" in rep
    assert "Spearman" in capsys.readouterr().out


def test_rank_models_bad_input(tmp_path, capsys):
    assert main(["rank-models", "smollm2-135m", str(tmp_path / "missing.gguf"), "--tasks", "arith"]) == 2
    assert "missing.gguf" in capsys.readouterr().err


def test_nex_command_plots_phases(tmp_path, capsys):
    png = tmp_path / "phases.png"
    rc = main(["nex", "Explain why the sky is blue.", "-n", "3", "--max-tokens", "96", "--plot", str(png),
               "--threads", "2"])
    assert rc == 0
    assert png.stat().st_size > 1000
    out = capsys.readouterr().out
    assert out.count("GMF") == 3
