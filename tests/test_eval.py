"""NAD end to end: best_of_n with early stopping, the eval harness and its CLI, bad input."""
import json

import numpy as np
import pytest

from neurotap import nad, selection
from neurotap.apps.cli import main
from neurotap.apps.evaluate import evaluate
from neurotap.scoring.tasks import arith, format_prompt

NEEDS_MODEL = True  # every test here runs the real model (see conftest.py)

PROMPT = [{"role": "user", "content": format_prompt(arith(1, 3)[0])}]


def test_best_of_n_early_stop_counts_tokens_exactly(model):
    r = nad.best_of_n(model, PROMPT, n=6, method="knn", early_stop=16, max_tokens=48, seed=4)
    full = model.sample(PROMPT, n=6, max_tokens=48, seed=4, reducers=("contributions",), chunk=16)
    # The winner continued alone draws what it drew in the unpruned run.
    assert r.sample.tokens == full[r.index].tokens
    assert r.text == full[r.index].text
    assert r.tokens_generated == nad.early_stop_tokens(r.candidates, full, r.index, 16)
    assert r.tokens_generated < sum(nad.sampled_tokens(s) for s in full)
    # The pick is the knn choice on the first 16 tokens' sets.
    assert r.index == nad.select(r.candidates, "knn", tokens=16)
    assert r.similarity.shape == (6, 6) and np.allclose(np.diag(r.similarity), 1)


def test_best_of_n_without_early_stop(model):
    r = nad.best_of_n(model, PROMPT, n=4, method="minact", early_stop=None, max_tokens=24, seed=1)
    counts = nad.set_sizes(r.candidates)
    assert r.index == int(np.argmin(counts))
    assert r.tokens_generated == sum(nad.sampled_tokens(s) for s in r.candidates)


@pytest.mark.parametrize("kwargs, match", [
    (dict(n=1, method="knn"), "needs at least 2 samples"),
    (dict(n=4, method="vote"), "unknown method"),
    (dict(n=4, method="avg"), "evaluation baseline"),
    (dict(n=4, method="knn", early_stop=64, max_tokens=32), "longer than max_tokens"),
    (dict(n=4, method="majority", early_stop=16, max_tokens=32), "cannot decide early"),
])
def test_best_of_n_bad_parameters(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        nad.best_of_n(model, PROMPT, **kwargs)


def test_evaluate_report(model, tmp_path):
    tasks = arith(2, 7)
    rep = evaluate(model, tasks, n=4, methods=["knn", "minact", "majority", "avg", "deepconf", "selfcert", "random"],
                   early_stop=16, max_tokens=32, seed=2, progress=False)
    assert rep["config"]["n_tasks"] == 2
    for row in rep["tasks"]:
        assert len(row["samples"]) == 4
        for s in row["samples"]:
            assert s["correct"] == (s["answer"] is not None and float(s["answer"]) == float(row["answer"]))
    avg = np.mean([np.mean([s["correct"] for s in r["samples"]]) for r in rep["tasks"]])
    assert rep["methods"]["avg"]["accuracy"] == pytest.approx(avg)
    knn = np.mean([r["samples"][r["picks"]["knn"]]["correct"] for r in rep["tasks"]])
    assert rep["methods"]["knn"]["accuracy"] == pytest.approx(knn)
    assert set(rep["methods"]) >= {"knn@16", "minact@16", "deepconf@16"}
    assert rep["methods"]["knn@16"]["tokens"] < rep["methods"]["knn"]["tokens"]
    assert rep["early_run"]["picks_diverged_from_full_run"] == 0
    lo, hi = rep["methods"]["knn"]["ci95"]
    assert 0 <= lo <= rep["methods"]["knn"]["accuracy"] <= hi <= 1


def test_cli_eval_writes_report_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    rc = main(["eval", "--tasks", "arith", "--limit", "1", "-n", "3", "--max-tokens", "16", "--methods",
               "knn,avg", "--out", str(out), "--plot", str(png), "--quiet", "--threads", "2"])
    assert rc == 0
    rep = json.loads(out.read_text())
    assert set(rep["methods"]) == {"knn", "avg"}
    assert png.stat().st_size > 1000
    assert "| knn |" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.png"]


@pytest.mark.parametrize("content, match", [
    ('{"id": 1, "question": "2+2?", "answer": 4}\n{"id": 2, "question": "3+3?"\n', "tasks.jsonl:2"),
    ('{"id": 1, "question": "2+2?", "answer": 4}\n\n[1, 2]\n', "tasks.jsonl:3"),
])
def test_cli_eval_malformed_jsonl(tmp_path, capsys, content, match):
    f = tmp_path / "tasks.jsonl"
    f.write_text(content)
    rc = main(["eval", "--tasks", str(f), "--out", str(tmp_path / "r.json"), "--quiet"])
    assert rc == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("args, match", [
    (["-n", "1", "--methods", "knn"], "needs at least 2 samples"),
    (["--methods", "knn,best"], "unknown method"),
    (["--early-stop", "300", "--max-tokens", "256"], "longer than --max-tokens"),
    (["--tasks", "missing.jsonl"], "missing.jsonl"),
])
def test_cli_eval_bad_parameters(tmp_path, capsys, args, match):
    base = ["eval", "--tasks", "arith", "--out", str(tmp_path / "r.json"), "--quiet"]
    rc = main(base + args)
    assert rc == 2
    assert match in capsys.readouterr().err


def test_nex_selector_on_real_samples(model):
    """NEX as a selector: per-token sets (chunk=1) give NAD the same chunk unions as chunk=32."""
    from neurotap import nex

    s1 = model.sample(PROMPT, n=4, max_tokens=72, seed=6, reducers=("contributions",), chunk=1)
    s32 = model.sample(PROMPT, n=4, max_tokens=72, seed=6, reducers=("contributions",), chunk=32)
    np.testing.assert_array_equal(nad.similarity(s1), nad.similarity(s32))
    np.testing.assert_array_equal(nad.similarity(s1, 32), nad.similarity(s32, 32))
    responses = [selection.nex_input(s) for s in s1]
    for (mass, toks), s in zip(responses, s1):
        assert mass.shape[0] == -(-s.n_tokens // 32) and toks.sum() == s.n_tokens
        assert mass.sum() == s.contribution_counts.sum()
    scores = nex.nex_scores(responses)
    assert np.all(np.isfinite(scores)) and np.all((0 <= scores) & (scores <= 1))
    assert nad.select(s1, "nex") == int(np.argmax(scores))
    with pytest.raises(ValueError, match="chunk=1"):
        nad.select(s32, "nex")


def test_evaluate_with_neat_same_seeds(model, tmp_path, capsys):
    from neurotap import neat

    cal = neat.load_calibration("default", model)
    cal.exit_similarity, cal.magnitude = -2.0, -1.0  # exit at every line start: a visible effect
    rep = evaluate(model, arith(2, 4), n=3, methods=["knn", "avg"], max_tokens=48, seed=1, progress=False, neat=cal)
    nr = rep["neat_run"]
    assert nr["tokens_saved"] == rep["full_run"]["tokens"] - nr["tokens"] > 0
    assert nr["exits"] == sum(s["finish"] == "neat_exit" for r in rep["tasks"] for s in r["neat"]["samples"]) > 0
    assert {"knn+neat", "avg+neat"} <= set(rep["methods"])
    for r in rep["tasks"]:
        for plain, with_neat in zip(r["samples"], r["neat"]["samples"]):
            if with_neat["exit_at"] < 0 and with_neat["bans"] == 0:
                assert with_neat["text"] == plain["text"]  # untouched samples are the same samples
            else:
                assert with_neat["tokens"] <= plain["tokens"] or with_neat["bans"] > 0
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    assert main(["eval", "--tasks", "arith", "--neat", str(bad), "--out", str(tmp_path / "r.json"), "--quiet"]) == 2
    assert "bad.json" in capsys.readouterr().err and not (tmp_path / "r.json").exists()


def test_early_stop_holds_cells_for_the_race_only():
    """Decided after 16 tokens, the race holds 16 tokens of KV per sample and the winner moves
    into a context of its own: a best-of-8 whose full version does not fit the cell budget runs."""
    import neurotap

    m = neurotap.load("smollm2-135m", n_ctx=1024, n_threads=2, max_sample_cells=2048)
    with pytest.raises(neurotap.ContextError, match="max_sample_cells=2048"):
        nad.best_of_n(m, PROMPT, n=8, early_stop=None, max_tokens=600, ignore_eos=True)
    r = nad.best_of_n(m, PROMPT, n=8, early_stop=16, max_tokens=600, seed=2, ignore_eos=True)
    assert r.sample.n_tokens == 600 and r.sample.finish_reason == "length"
    assert r.tokens_generated == 8 * 16 + (600 - 16)  # the losers stopped at the decision
    assert m.memory()["kv"] <= (1024 + 8 * 256 + 768) * m.info.kv_bytes_per_cell  # no race context kept
    m.close()
