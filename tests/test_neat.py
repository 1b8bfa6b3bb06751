"""NEAT on the real default model: the attribution score, the calibration file, run-time decisions."""
import json
import shutil

import numpy as np
import pytest

from neurotap import nad, neat
from neurotap.core.resources import shipped_file
from neurotap.scoring.tasks import arith

NEEDS_MODEL = True  # every test here runs the real model (see conftest.py)

gguf = pytest.importorskip("gguf")

PROMPT = [{"role": "user", "content": "List three fruits, one per line."}]
SHIPPED = "default"


@pytest.fixture(scope="module")
def scorer(model):
    return neat.Scorer(model)


@pytest.fixture(scope="module")
def trace(model):
    g = model.generate(PROMPT, temperature=0, max_tokens=40)
    assert g.finish_reason == "eos"
    end = g.eog_token
    tr = model.trace(PROMPT, list(g.tokens) + [end], capture="float32", hooks=["hook_resid_post"])
    return g, tr, end


def test_final_norm_and_unembedding_reproduce_the_model(model, scorer, trace):
    """From the captured last-layer residual, RMSNorm + unembedding give the model's own greedy
    choices (where the top two logits are clearly apart)."""
    g, tr, end = trace
    L = model.info.n_layers
    toks = list(g.tokens) + [end]
    agree = checked = 0
    for j in range(len(toks)):
        y = scorer.norm(tr.residuals[j, L - 1]).astype(np.float32)
        logits = scorer.W_U @ y
        top2 = np.sort(logits)[-2:]
        if top2[1] - top2[0] > 0.5:
            checked += 1
            agree += int(np.argmax(logits)) == toks[j]
    assert checked >= 10 and agree == checked


def test_attribution_equals_numpy_recomputation(model, scorer, trace, model_path):
    """The exact score of a few neurons against an independent float64 recomputation from weights
    dequantized by the gguf package: final RMSNorm with output_norm.weight, full-vocabulary softmax."""
    _, tr, end = trace
    L = model.info.n_layers
    r = gguf.GGUFReader(model_path)
    t = {x.name: x for x in r.tensors}

    def deq(name):
        return gguf.quants.dequantize(t[name].data, t[name].tensor_type).astype(np.float64)

    W_U = deq("output.weight" if "output.weight" in t else "token_embd.weight")
    g_out = deq("output_norm.weight").ravel()
    eps = float(r.fields["llama.attention.layer_norm_rms_epsilon"].parts[-1][0])
    h = tr.residuals[-1, L - 1].astype(np.float64)

    def logp(x):
        y = x / np.sqrt(np.mean(x * x) + eps) * g_out
        z = W_U @ y
        return z[end] - (z.max() + np.log(np.exp(z - z.max()).sum()))

    for layer in (L - 1, L - 5):
        down = deq(f"blk.{layer}.ffn_down.weight")  # [n_embd, n_ff]
        a_row = tr.activations[-1, layer].astype(np.float64)
        neurons = [int(i) for i in np.argsort(-np.abs(a_row))[:3]]
        cols = down[:, neurons].T
        got = scorer.attribution(h, a_row[neurons], cols, end)
        ref = [logp(h + a_row[i] * down[:, i]) - logp(h) for i in neurons]
        np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-4)
        assert np.abs(ref).max() > 1e-3  # the check is not vacuous


def test_first_order_gradient_matches_finite_differences(model, scorer, trace):
    """The estimate that ranks all neurons is the gradient of log p(marker) at the residual."""
    _, tr, end = trace
    L = model.info.n_layers
    h = tr.residuals[-1, L - 1].astype(np.float64)
    gh = scorer.grad(h, end)
    # The difference is taken in float64 throughout: Scorer.logp's float32 logits round each
    # log p by ~1e-6, a few percent of the ~2.5e-5 difference, and how they round depends on the
    # CPU's summation order (AVX2 vs AVX-512). In float64 the difference is exact to ~1e-12, so
    # what remains is the gradient's own float32 softmax (~1e-6 relative) and the O(|d|^2)
    # truncation of a central difference (|d| = 1e-3 |h|): 1e-3 relative is loose for both.
    W = scorer.W_U.astype(np.float64)

    def logp64(x):
        logits = W @ scorer.norm(x)
        m = logits.max()
        return logits[end] - (m + np.log(np.exp(logits - m).sum()))

    rng = np.random.default_rng(0)
    for _ in range(3):
        d = rng.standard_normal(h.size)
        d *= 1e-3 * np.linalg.norm(h) / np.linalg.norm(d)
        fd = (logp64(h + d) - logp64(h - d)) / 2
        assert fd == pytest.approx(gh @ d, rel=1e-3)


def _crafted(model, **kw):
    """A calibration that always bans (or always exits), to check the run-time mechanics."""
    cal = neat.load_calibration(SHIPPED, model)
    for k, v in kw.items():
        setattr(cal, k, v)
    return cal


def test_generation_identical_until_first_intervention(model):
    base = model.generate(PROMPT, temperature=0.8, seed=3, max_tokens=48)
    ban_all = _crafted(model, ban_similarity=-2.0, exit_similarity=2.0)
    g = model.generate(PROMPT, temperature=0.8, seed=3, max_tokens=48, neat=ban_all)
    ev = g.neat_events
    assert ev and all(e.action == 1 and e.action_name == "ban" for e in ev)
    assert all(tuple(e) == (e.token, e.action, e.similarity, e.magnitude) for e in ev)  # also read as tuples
    first = ev[0].token
    assert g.tokens[:first] == base.tokens[:first]

    exit_now = _crafted(model, exit_similarity=-2.0, magnitude=-1.0)
    g = model.generate(PROMPT, temperature=0.8, seed=3, max_tokens=48, neat=exit_now)
    assert g.finish_reason == "neat_exit"
    assert g.neat_exit_at == g.neat_events[0].token == len(g.tokens)
    assert g.neat_events[0].action_name == "exit"
    assert g.tokens == base.tokens[:len(g.tokens)]
    assert base.text[:len(g.text)] == g.text and "\n" in g.text  # it exited at a line start


def test_neat_per_sample(model):
    exit_now = _crafted(model, exit_similarity=-2.0, magnitude=-1.0)
    plain = model.sample(PROMPT, n=3, max_tokens=48, seed=2)
    run = model.sample(PROMPT, n=3, max_tokens=48, seed=2, neat=exit_now)
    for p, s in zip(plain, run):
        if s.finish_reason == "neat_exit":
            assert s.neat_exit_at == len(s.tokens) and p.tokens[:len(s.tokens)] == s.tokens
        else:  # no line start before the end
            assert s.tokens == p.tokens and not s.neat_events
    assert any(s.finish_reason == "neat_exit" for s in run)


def test_ban_only_whole_word_tokens(model):
    toks = neat.ban_tokens(model, neat.REFLECTION_WORDS)
    assert toks
    words = {w for w in neat.REFLECTION_WORDS} | {" " + w for w in neat.REFLECTION_WORDS}
    for t in toks:
        assert model.detokenize([t]) in words
    # A word that is several tokens is not banned at all (its first piece starts other words too).
    multi = "Alternativelyy"
    assert len(model.tokenize(multi, add_special=False)) > 1
    assert neat.ban_tokens(model, [multi]) == [] or all(model.detokenize([t]).strip() == multi for t in neat.ban_tokens(model, [multi]))


def test_calibration_file_errors(model, tmp_path):
    src = shipped_file("neat-smollm2-135m.json")
    d = json.loads(src.read_text())
    other = tmp_path / "other.json"
    d2 = dict(d, model=dict(d["model"], sha256="0" * 64, file="other.gguf"))
    other.write_text(json.dumps(d2))
    with pytest.raises(ValueError, match="calibrated for another model"):
        neat.load_calibration(str(other), model)
    # The runtime takes resolved calibrations only: a path is refused with the call that resolves it.
    with pytest.raises(TypeError, match=r"neurotap.neat.load_calibration"):
        model.generate(PROMPT, max_tokens=4, neat=str(src))
    trunc = tmp_path / "trunc.json"
    trunc.write_text(src.read_text()[:200])
    with pytest.raises(ValueError, match="trunc.json.*corrupt or truncated"):
        neat.load_calibration(str(trunc), model)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(dict(d, reference=[1.0])))
    with pytest.raises(ValueError, match="bad.json.*equal length"):
        neat.load_calibration(str(bad), model)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        neat.load_calibration(str(tmp_path / "nope.json"), model)
    shutil.copy(src, tmp_path / "ok.json")
    assert neat.load_calibration(str(tmp_path / "ok.json"), model).neurons == [tuple(n) for n in d["neurons"]]


def test_calibration_without_usable_traces(model):
    tasks = arith(3, 5)
    with pytest.raises(ValueError, match="none of the 3 calibration problems"):
        neat.calibrate(model, tasks, problems=3, max_tokens=2, progress=False)


def test_calibrate_small(model, tmp_path):
    """A small real calibration: neurons in the upper third, a reference, a file that loads back."""
    cal = neat.calibrate(model, arith(6, 11), problems=6, candidates=100, progress=False, min_vote=0.5, min_com=0.5)
    L = model.info.n_layers
    assert all(L - L // 3 <= a < L for a, _ in cal.neurons)
    assert cal.marker == "<|im_end|>"  # the end of turn SmolLM2 ends its answers with (GGUF's eot says otherwise)
    assert cal.details["traces"] >= 2 and len(cal.reference) == len(cal.neurons)
    path = tmp_path / "c.json"
    neat.save_calibration(cal, path)
    assert neat.load_calibration(str(path), model).reference == cal.reference


def test_neat_with_nad_early_stopping(model):
    """NAD picks the sample after 8 tokens; NEAT ends the winner's tail at its next line start."""
    exit_now = _crafted(model, exit_similarity=-2.0, magnitude=-1.0)
    plain = nad.best_of_n(model, PROMPT, n=4, method="knn", early_stop=8, max_tokens=48, seed=5)
    both = nad.best_of_n(model, PROMPT, n=4, method="knn", early_stop=8, max_tokens=48, seed=5, neat=exit_now)
    # The samples that reach a line start within the 8 tokens end there; the pick ends at its first one.
    assert any(c.finish_reason == "neat_exit" for c in both.candidates)
    s = both.sample
    assert s.finish_reason == "neat_exit" and s.text.endswith("\n")
    assert both.tokens_generated < plain.tokens_generated
    if both.index == plain.index:
        assert s.tokens == plain.sample.tokens[:len(s.tokens)]
