"""Every user path of issue 23 end to end on small MoE GGUFs (benchmarks/make_shapes.write_moe):
gpt-oss (MXFP4 experts, clamped SwiGLU, biases), qwen3moe (Q8_0 experts) and qwen2moe (a shared
expert). `sample`, `best_of_n` with NAD, RAD and route-knn and early stopping, NEAT calibration and
run-time exit, NEX, NeuReasoner calibration and correction, from the Python API and the command
line, `neurotap serve` through the official openai client, and the memory estimate of MoE runs.

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


# --- NEAT ---------------------------------------------------------------------------------------

def common_marker(m, tasks) -> str:
    """A one-token text that ends at least two of the greedy answers (random weights never end an
    answer with an end-of-generation token): NEAT's termination marker for these files."""
    gs = [m.generate([{"role": "user", "content": format_prompt(t)}], temperature=0, max_tokens=48).tokens
          for t in tasks]
    tok, n = Counter(x for g in gs for x in set(g[1:])).most_common(1)[0]
    text = m.detokenize([tok])
    assert n >= 2 and m.tokenize(text, add_special=False, parse_special=True) == [tok]
    return text


def test_neat_calibration_names_experts_and_the_cli_writes_the_same(moe, moe_files, tmp_path, capsys):
    m, path = moe("gpt-oss"), moe_files["gpt-oss"]
    tasks = arith(8, 1)  # what `neurotap neat calibrate --problems 8` draws (task seed 1)
    marker = common_marker(m, tasks)
    cal = neat.calibrate(m, tasks, problems=8, layers=(2, 3), marker=marker, max_tokens=48, progress=False)
    assert cal.neurons and all(layer == 2 for layer, _ in cal.neurons) and cal.marker == marker
    out = tmp_path / "neat.json"
    assert main(["neat", "calibrate", "--model", path, "--tasks", "arith", "--problems", "8", "--layers", "2:3",
                 "--marker", marker, "--max-tokens", "48", "--threads", str(THREADS), "--quiet", "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    assert [tuple(n) for n in d["neurons"]] == cal.neurons and d["model"]["architecture"] == "gpt-oss"
    # Each calibrated neuron names its expert and unit, as the model's layout maps its flat index.
    for rec in d["details"]["neurons"]:
        e, u = m.info.expert_of(rec["index"])
        assert (rec["expert"], rec["unit"]) == (int(e), int(u)) and e < m.info.n_expert
    assert neat.load_calibration(str(out), m).reference == cal.reference
    assert main(["generate", "Name three colors.", "--model", path, "--max-tokens", "8", "--neat", str(out),
                 "--threads", str(THREADS)]) == 0
    capsys.readouterr()


def test_neat_run_time_decisions_read_the_expert_neurons(moe):
    """With every token checked and no action, each decision's similarity and magnitude are the
    cosine and norm ratio of the watched expert neurons' activations (recomputed from the tapped
    rows); an exit threshold between the two highest similarities exits exactly at the highest,
    after the same tokens as the plain run, with the marker; a threshold above all never exits."""
    m = moe("qwen2moe")
    F = m.info.n_ff
    # Neurons of routed experts and of the shared expert, in both layers' halves.
    neurons = [(1, 3), (1, F - 1), (2, m.info.n_ff_exp * 5 + 7), (2, F - 10), (0, 40)]
    ref = [1.0, -0.5, 0.8, 0.3, -0.2]
    base = neat.NeatCalibration(neurons=neurons, reference=ref, marker="Hello", line_starts_only=False,
                                exit_similarity=2.0, ban_similarity=2.0, magnitude=-1.0)
    plain = m.sample(MSGS, n=2, max_tokens=24, seed=3, reducers=("rows",))
    watched = m.sample(MSGS, n=2, max_tokens=24, seed=3, reducers=("rows",), neat=base)
    r = np.array(ref)
    for p, s in zip(plain, watched):
        assert s.tokens == p.tokens and s.finish_reason == "length" and len(s.neat_events) == 24
        assert all(e.action_name == "continue" for e in s.neat_events)
        for e in s.neat_events[1:]:
            v = np.array([s.activations[e.token, l, i] for l, i in neurons], np.float64)
            assert e.similarity == pytest.approx(v @ r / (np.linalg.norm(v) * np.linalg.norm(r)), abs=1e-5)
            assert e.magnitude == pytest.approx(np.linalg.norm(v) / np.linalg.norm(r), rel=1e-5)
        sims = np.array([e.similarity for e in s.neat_events])
        j = int(np.argmax(sims))
        top2 = np.sort(sims)[-2:]
        assert top2[1] - top2[0] > 1e-4
        (x,) = m.sample(MSGS, n=2, max_tokens=24, seed=3, neat=neat.NeatCalibration(
            **{**base.__dict__, "exit_similarity": float(top2.mean())}))[s.index:s.index + 1]
        assert x.neat_exit_at == j and x.tokens[:j] == p.tokens[:j]
        assert x.tokens[j] == m.tokenize("Hello", add_special=False)[0]
        assert [e.action_name for e in x.neat_events] == ["continue"] * j + ["exit"]
        never = m.sample(MSGS, n=2, max_tokens=24, seed=3, neat=neat.NeatCalibration(
            **{**base.__dict__, "exit_similarity": float(sims.max()) + 1e-3}))[s.index]
        assert never.neat_exit_at == -1 and never.tokens == p.tokens


# --- NEX ----------------------------------------------------------------------------------------

def test_nex_on_moe_reads_computed_experts_and_the_cli_agrees(moe, moe_files, capsys):
    m, path = moe("qwen2moe"), moe_files["qwen2moe"]
    samples = m.sample(MSGS, n=3, max_tokens=70, seed=5, reducers=("contributions", "routing"), chunk=1)
    F, E = m.info.n_ff, m.info.n_expert
    responses = [nex_input(s) for s in samples]
    for s, (mass, rows) in zip(samples, responses):
        assert mass.shape[0] == len(rows) == 3 and rows.tolist() == [32, 32, 6]
        # A row's mass is on neurons of experts its tokens ran (or the shared expert) only.
        for r in range(len(rows)):
            for k in np.flatnonzero(mass[r]):
                layer, i = divmod(int(k), F)
                e = int(m.info.expert_of(i)[0])
                assert e == E or e in s.routing_ids[32 * r:32 * r + rows[r], layer], (r, layer, i)
    scores = nex_scores(responses)
    assert select(samples, "nex") == int(np.argmax(scores))
    assert main(["nex", "Name three colors.", "--model", path, "-n", "3", "--max-tokens", "70", "--seed", "5",
                 "--threads", str(THREADS)]) == 0
    out = capsys.readouterr().out
    assert [f"--- sample {i}: GMF {g:.3f} | 70 tokens" for i, g in enumerate(scores)] == \
        [line.split(" | phases")[0] for line in out.splitlines() if line.startswith("--- sample")]


# --- NeuReasoner --------------------------------------------------------------------------------

def always(components, action, features=(3,)):
    """A level whose detector always fires (its logistic saturated by the bias)."""
    k = len(features)
    return nr.LevelDetector(enabled=True, components=list(components), features=list(features),
                            mlp={"mean": [0.0] * k, "scale": [1.0] * k, "weights": [[[0.0]] * k], "biases": [[30.0]]},
                            threshold=0.5, action=action)


def test_neureasoner_records_expert_neuron_contributions(moe, moe_files):
    """Neuron (e, u) of the middle layer gives a_i (W_U[y] . W_down[e][:, u]) to token y's logit
    (the gate weight is not in it, see docs/moe.md), for routed and shared experts alike."""
    m = moe("qwen2moe")
    W = _dequantized(moe_files["qwen2moe"])
    L, i = m.info.n_layers // 2, m.info
    down = np.concatenate([W[f"blk.{L}.ffn_down_exps.weight"][e] for e in range(i.n_expert)]
                          + [W[f"blk.{L}.ffn_down_shexp.weight"]], axis=1)  # [n_embd, n_ff]
    g = m.generate(MSGS, max_tokens=24, temperature=0.7, seed=3, capture="float32", neureasoner=nr.record_config(m))
    assert g.n_tokens == 24
    for j in (0, 11, 23):
        ref = g.activations[j, L].astype(np.float64) * (down.T @ W["output.weight"][g.tokens[j]])
        got = g.neureasoner_contributions[j, :i.n_ff]
        assert np.count_nonzero(ref) > 0
        np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max())


def test_neureasoner_calibrates_monitors_and_corrects_on_moe(moe, moe_files, tmp_path, capsys):
    from neurotap.scoring.failures import LABELLERS, register_labeller

    m, path = moe("gpt-oss"), moe_files["gpt-oss"]

    def every_third(text, ends, answer):  # a fixed labelling: the calibration has failures to learn from
        n = len(ends)
        return {"intra": np.arange(n) % 3 == 0, "inter": np.arange(n) % 5 == 1, "instance": np.arange(n) >= n // 2}

    register_labeller("moe-e2e", every_third)
    try:
        mon = tmp_path / "mon.json"
        assert main(["neureasoner", "calibrate", "--model", path, "--tasks", "arith", "--limit", "4", "-n", "2",
                     "--max-tokens", "48", "--window", "8", "--labeller", "moe-e2e", "--threads", str(THREADS),
                     "--quiet", "--out", str(mon)]) == 0
    finally:
        LABELLERS.pop("moe-e2e")
    capsys.readouterr()
    cal = nr.load_calibration(mon, m)
    d = json.loads(mon.read_text())
    names = d["details"]["component_names"]
    assert any(cal.levels[lv].components for lv in cal.levels)
    for lv, comps in ((lv, cal.levels[lv].components) for lv in cal.levels):
        for c, name in zip(comps, names[lv]):
            if c < m.info.n_ff:  # a neuron names its expert and unit
                e, u = m.info.expert_of(c)
                assert name == {"neuron": c, "expert": int(e), "unit": int(u)}
            else:
                assert name == {"head": c - m.info.n_ff}
    # Correction on expert neurons: greedy decoding resampled at each detection draws the plain
    # greedy tokens (a rollback leaves no trace), three times.
    F = m.info.n_ff
    comps = [int(m.info.expert_neuron(3, 5)), int(m.info.expert_neuron(m.info.n_expert - 1, 0)), F + 1]
    lv = {name: always(comps, "resample") if name == "intra" else nr.LevelDetector(features=list(nr.LEVEL_FEATURES[name]))
          for name in nr.LEVELS}
    fix = nr.NeuReasonerCalibration(layer=1, window=8, levels=lv, exit_text=nr.exit_text_for(m), max_retries=3,
                                    max_actions=3, cooldown=2, model=neat.fingerprint(m))
    plain = m.generate(MSGS, max_tokens=40, temperature=0)
    g = m.generate(MSGS, max_tokens=40, temperature=0, neureasoner=fix)
    assert sum(e.rollback_to >= 0 for e in g.neureasoner_events) == 3
    assert g.tokens == plain.tokens and g.text == plain.text
    s = m.sample(MSGS, n=2, max_tokens=30, seed=2, neureasoner=fix, reducers=("counts",))
    assert all(sum(e.rollback_to >= 0 for e in x.neureasoner_events) == 3 for x in s)


# --- memory -------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["qwen2moe", "gpt-oss"])
def test_memory_estimate_covers_what_an_moe_run_records(moe, arch):
    """The pre-run estimate (runtime.memory.record_bytes_per_token, at the flat width n_expert *
    n_ff_exp + n_ff_shexp) covers each record an MoE run actually holds, part by part."""
    from neurotap.runtime.memory import record_bytes_per_token

    m = moe(arch)
    i = m.info
    T = 40
    samples = m.sample(MSGS, n=2, max_tokens=T, seed=1, ignore_eos=True, capture="float32", chunk=1,
                       reducers=("counts", "active_sets", "contributions", "routing"), hooks=["mlp.hook_router_probs"])

    def est(**kw):
        base = dict(counts=False, active_chunk=0, contribution_chunk=0, keep_top=False, rows=0, norm_inputs=False,
                    residuals=False, logprobs=0)
        return record_bytes_per_token(i, **{**base, **kw}) - record_bytes_per_token(i, **base)

    for s in samples:
        assert s.n_tokens == T and s.activations.shape == (T, i.n_layers, i.n_expert * i.n_ff_exp + i.n_ff_shexp)
        assert s.activations.nbytes / T == est(rows=1)
        assert s.active_counts.nbytes / T <= est(counts=True)
        assert s.contribution_sets.nbytes / T <= est(contribution_chunk=1)
        routing = s.routing_ids.nbytes + s.routing_weights.nbytes + (s.shexp_gate.nbytes if s.shexp_gate is not None else 0)
        assert 0 < routing / T <= est(routing=True)
        assert s.router_probs.nbytes / T == est(router_probs=True) > 0
    # The run's own estimate (what start_sampling checks) holds these parts at this width.
    from neurotap.runtime.memory import run_parts
    parts = run_parts(i, n=2, kv_cells=2 * 256, max_tokens=T, per_token_record=est(rows=1), contributions=True,
                      file_bytes=1)
    assert parts["records"] == 2 * T * i.n_layers * i.n_ff * 4
    assert parts["contribution state"] >= 2 * 2 * i.n_layers * i.n_ff * 4


# --- neurotap serve -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def moe_server(moe_files):
    pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    from test_server import start_server, stop_server

    proc, url = start_server(moe_files["qwen3moe"], "--parallel", "1")
    yield url
    stop_server(proc)


def test_serve_an_moe_file_through_the_openai_client(moe, moe_server):
    """Chat, n=2, NAD and RAD races (the neurotap extension) and streaming, each equal to the same
    run made in this process."""
    import openai
    from test_server import SAMPLING, ext

    m = moe("qwen3moe")
    client = openai.OpenAI(base_url=moe_server + "/v1", api_key="none", max_retries=0, timeout=300)
    kw = dict(model="m", messages=MSGS, temperature=0.8, top_p=0.95)
    extra = {"top_k": 40, "min_p": 0.05}
    r = client.chat.completions.create(**kw, max_tokens=16, seed=5, extra_body=extra)
    (ref,) = m.sample(MSGS, n=1, max_tokens=16, seed=5, reducers=(), tap=False, **SAMPLING)
    assert r.choices[0].message.content == ref.text and r.usage.completion_tokens == 16
    r = client.chat.completions.create(**kw, max_tokens=12, seed=9, n=2, extra_body=extra)
    refs = m.sample(MSGS, n=2, max_tokens=12, seed=9, reducers=(), tap=False, **SAMPLING)
    assert [c.message.content for c in r.choices] == [s.text for s in refs]
    for method in ("rad", "knn"):
        spec = {"n": 4, "method": method, "early_stop": 8}
        r = client.chat.completions.create(**kw, max_tokens=24, seed=3, extra_body={"nad": spec, **extra})
        best = nad.best_of_n(m, MSGS, n=4, method=method, early_stop=8, max_tokens=24, seed=3, **SAMPLING)
        e = ext(r)["nad"]
        assert e["pick"] == best.index and e["method"] == method and r.choices[0].message.content == best.text
        assert r.usage.completion_tokens == best.tokens_generated
    whole = client.chat.completions.create(**kw, max_tokens=20, seed=2, extra_body=extra)
    chunks = list(client.chat.completions.create(**kw, max_tokens=20, seed=2, extra_body=extra, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
