"""NeuReasoner on the real default model: what it records, its features and detectors, its
corrections (rollbacks that leave no trace), its calibration file and its command line."""
import json
from dataclasses import replace

import numpy as np
import pytest

from neurotap import _native
from neurotap.apps.cli import main
from neurotap.methods import neureasoner as nr
from neurotap.methods.neat import fingerprint

from conftest import THREADS

NEEDS_MODEL = True

PROMPT = [{"role": "user", "content": "Tom had 59 pencils. A friend gave Tom 63 more. How many pencils does "
                                      "Tom have?\nSolve it step by step."}]


def always(components, action, features=(3,)):
    """A level whose detector always fires (its logistic saturated by the bias)."""
    k = len(features)
    return nr.LevelDetector(enabled=True, components=list(components), features=list(features),
                            mlp={"mean": [0.0] * k, "scale": [1.0] * k, "weights": [[[0.0]] * k], "biases": [[30.0]]},
                            threshold=0.5, action=action)


def calibration(model, **levels):
    lv = {name: levels.get(name, nr.LevelDetector(features=list(nr.LEVEL_FEATURES[name]))) for name in nr.LEVELS}
    return nr.NeuReasonerCalibration(layer=model.info.n_layers // 2, window=8, levels=lv, exit_text=nr.exit_text_for(model),
                                     max_retries=3, max_actions=3, cooldown=2, model=fingerprint(model))


@pytest.fixture(scope="module")
def recorded(model):
    cfg = nr.record_config(model)
    g = model.generate(PROMPT, max_tokens=48, temperature=0.7, seed=3, capture="float32", hooks=["hook_resid_post"],
                       neureasoner=cfg)
    assert g.n_tokens == 48
    return g


def test_recorded_neuron_contributions_equal_numpy(model, recorded):
    """FFN neuron i of the middle layer gives a_i (W_U[y] . W_down[:, i]) to token y's logit."""
    g, L, F = recorded, model.info.n_layers // 2, model.info.n_ff
    down = _native.read_tensor_rows(model.info.path, f"blk.{L}.ffn_down.weight", 0, model.info.n_embd)  # [E, F]
    for j in (0, 17, 47):
        u = _native.read_tensor_rows(model.info.path, "token_embd.weight", g.tokens[j], 1)[0]  # tied unembedding
        ref = g.activations[j, L].astype(np.float64) * (down.T.astype(np.float64) @ u)
        got = g.neureasoner_contributions[j, :F]
        assert np.allclose(got, ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max())


def test_recorded_head_contributions_add_up_to_the_attention_output(model, recorded):
    """Every head's z_h . W_O[:, h]^T W_U[y] sums to W_U[y] . (attention output), which is the
    residual stream's change over the layer minus the FFN's output W_down a."""
    g, L, F, E = recorded, model.info.n_layers // 2, model.info.n_ff, model.info.n_embd
    down = _native.read_tensor_rows(model.info.path, f"blk.{L}.ffn_down.weight", 0, E).astype(np.float64)
    resid = g.cache.stack("hook_resid_post")
    got, want = [], []
    for j in range(g.n_tokens):
        u = _native.read_tensor_rows(model.info.path, "token_embd.weight", g.tokens[j], 1)[0].astype(np.float64)
        attn_out = resid[j, L] - resid[j, L - 1] - down @ g.activations[j, L]
        heads = g.neureasoner_contributions[j, F:].astype(np.float64)
        assert len(heads) == model.info.n_head
        got.append(heads.sum())
        want.append(float(u @ attn_out))
    got, want = np.array(got), np.array(want)
    # llama.cpp multiplies by W_O and W_down with 8-bit-quantized activations, the reference in
    # float64: they agree to that noise (measured: correlation 0.99996, max error 3% of the spread).
    assert np.corrcoef(got, want)[0, 1] > 0.9995
    assert np.abs(got - want).max() < 0.1 * want.std()


def test_spectral_features_equal_numpy_fft(recorded):
    signal = recorded.neureasoner_contributions[:, :40].sum(axis=1).astype(np.float32)
    W = 16
    f = _native.spectral_features(signal, W)
    assert np.isnan(f[: W - 1]).all()
    for t in range(W - 1, len(signal)):
        x = signal[t - W + 1: t + 1].astype(np.float64)
        x = x - x.mean()
        P = np.abs(np.fft.rfft(x))[1:] ** 2
        p = P / P.sum()
        ref = [P[W // 4:].sum() / P.sum(), P[: W // 8].sum() / P.sum(), P.max() / P.sum(),
               -(p[p > 0] * np.log(p[p > 0])).sum() / np.log(W // 2), (np.diff(x) ** 2).sum() / (x ** 2).sum()]
        assert np.allclose(f[t], ref, rtol=1e-4, atol=1e-6)


def test_native_detector_equals_scikit_learn():
    from sklearn.neural_network import MLPClassifier
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 3)) * [1, 5, 0.1] + [0, 2, 1]
    y = X[:, 0] + X[:, 1] / 5 > 0.4
    sc = StandardScaler().fit(X)
    clf = MLPClassifier(hidden_layer_sizes=(8, 4), max_iter=2000, random_state=0).fit(sc.transform(X), y)
    mlp = {"mean": sc.mean_.tolist(), "scale": sc.scale_.tolist(), "weights": [w.tolist() for w in clf.coefs_],
           "biases": [b.tolist() for b in clf.intercepts_]}
    got = nr.native_mlp(mlp).probability(X.astype(np.float32))
    want = clf.predict_proba(sc.transform(X.astype(np.float32)))[:, 1]
    assert np.allclose(got, want, atol=1e-5)


def test_a_rollback_leaves_no_trace(model):
    """Greedy decoding resampled at every detection draws the plain greedy tokens; a sampled run's
    continuation after a rollback is the fresh run from the kept tokens with the recorded seed."""
    F = model.info.n_ff
    cal = calibration(model, intra=always([5, F + 2], "resample"))
    plain = model.generate(PROMPT, max_tokens=60, temperature=0)
    g = model.generate(PROMPT, max_tokens=60, temperature=0, neureasoner=cal)
    assert sum(e.rollback_to >= 0 for e in g.neureasoner_events) == 3
    assert g.tokens == plain.tokens and g.text == plain.text

    s = model.generate(PROMPT, max_tokens=60, temperature=0.8, seed=11, neureasoner=cal)
    rollbacks = [e for e in s.neureasoner_events if e.rollback_to >= 0]
    assert len(rollbacks) == 3 and all(e.level == 0 and e.action_name == "resample" for e in rollbacks)
    _, _, _, _, kept, seed = rollbacks[-1]
    fresh = model.generate(PROMPT, prefix=s.tokens[:kept], max_tokens=60, temperature=0.8, seed=seed)
    assert fresh.tokens == s.tokens
    assert fresh.text == s.text


def test_a_detect_only_level_does_not_mask_an_acting_one(model):
    cal = calibration(model, instance=always([11], "none"), intra=always([5], "resample"))
    g = model.generate(PROMPT, max_tokens=60, temperature=0, neureasoner=cal)
    assert sum(e.rollback_to >= 0 and e.level == 0 for e in g.neureasoner_events) == 3
    assert any(e.level_name == "instance" and e.action_name == "none" for e in g.neureasoner_events)  # recorded, nothing done
    assert g.finish_reason == "length"


def test_exit_ends_the_reasoning_with_the_answer_line(model):
    cal = calibration(model, instance=always([11], "exit"))
    g = model.generate(PROMPT, max_tokens=120, temperature=0, neureasoner=cal)
    assert g.finish_reason == "neureasoner_exit"
    assert g.neureasoner_exit_at == cal.window
    assert nr.FINISHED_THINKING + "\nAnswer:" in g.text and "\n" not in g.text.split("Answer:")[-1]


def test_redirect_inserts_its_phrase_at_the_step_start(model):
    cal = calibration(model, inter=always([4], "redirect"))
    g = model.generate(PROMPT, max_tokens=80, temperature=0, neureasoner=cal)
    assert nr.REDIRECT_TEXT.strip() in g.text
    back = [e for e in g.neureasoner_events if e.rollback_to >= 0]
    assert back and all(e.level_name == "inter" and e.action_name == "redirect" for e in back)


def test_sampling_runs_correct_every_sample_on_its_own(model):
    cal = calibration(model, intra=always([5], "resample"))
    samples = model.sample(PROMPT, n=3, max_tokens=40, seed=2, neureasoner=cal, reducers=("counts",))
    for s in samples:
        assert sum(e.rollback_to >= 0 for e in s.neureasoner_events) == 3
        assert s.active_counts.shape == (s.n_tokens, model.info.n_layers)
        assert s.neureasoner_probs.shape == (s.n_tokens, 3)


def test_runs_that_cannot_follow_a_rollback_are_refused(model):
    cal = calibration(model, intra=always([5], "resample"))
    with pytest.raises(ValueError, match="chunked set records"):
        model.sample(PROMPT, n=2, max_tokens=8, neureasoner=cal, reducers=("contributions",))
    with pytest.raises(ValueError, match="need tap=True"):
        model.generate(PROMPT, max_tokens=8, neureasoner=cal, tap=False)
    # Detection only (no action) records alongside anything.
    quiet = cal.with_actions(intra="none")
    s = model.sample(PROMPT, n=2, max_tokens=40, neureasoner=quiet, reducers=("contributions",))
    assert all(e.action == 0 for x in s for e in x.neureasoner_events) and s[0].contribution_sets is not None


def test_calibration_files_are_checked(model, tmp_path):
    cal = calibration(model, intra=always([5], "resample"))
    path = tmp_path / "mon.json"
    nr.save_calibration(cal, path)
    back = nr.load_calibration(path, model)
    assert back.levels["intra"].components == [5] and back.model["sha256"] == fingerprint(model)["sha256"]
    d = json.loads(path.read_text())
    d["model"]["sha256"] = "0" * 64
    (tmp_path / "other.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="calibrated for another model"):
        nr.load_calibration(tmp_path / "other.json", model)
    (tmp_path / "cut.json").write_text(path.read_text()[:100])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        nr.load_calibration(tmp_path / "cut.json", model)
    d = json.loads(path.read_text())
    d["version"] = 99
    (tmp_path / "v.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="version"):
        nr.load_calibration(tmp_path / "v.json", model)
    d = json.loads(path.read_text())
    d["levels"]["intra"]["components"] = [model.info.n_ff + model.info.n_head]
    (tmp_path / "c.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="outside this model"):
        nr.load_calibration(tmp_path / "c.json", model)
    with pytest.raises(FileNotFoundError):
        nr.load_calibration(tmp_path / "missing.json", model)
    with pytest.raises(ValueError, match="unknown action"):
        cal.with_actions(intra="explode")
    with pytest.raises(TypeError, match="load_calibration"):
        model.generate(PROMPT, max_tokens=4, neureasoner=str(path))


def test_calibrate_detect_and_eval_from_the_command_line(model_path, tmp_path, capsys):
    mon = tmp_path / "mon.json"
    assert main(["neureasoner", "calibrate", "--model", model_path, "--tasks", "arith", "--limit", "6", "-n", "3",
                 "--max-tokens", "96", "--window", "16", "--threads", str(THREADS), "--quiet", "--out", str(mon)]) == 0
    out = capsys.readouterr().out
    assert "| level |" in out and "written to" in out
    cal = json.loads(mon.read_text())
    assert cal["details"]["traces"] == 18 and set(cal["levels"]) == {"intra", "inter", "instance"}
    assert main(["generate", "What is 12 + 35? Solve it step by step.", "--model", model_path, "--max-tokens", "48",
                 "--temperature", "0.7", "--neureasoner", str(mon), "--neureasoner-actions", "intra=none",
                 "--threads", str(THREADS)]) == 0
    assert "[NeuReasoner:" in capsys.readouterr().out
    rep = tmp_path / "r.json"
    assert main(["eval", "--tasks", "arith", "--limit", "2", "-n", "2", "--max-tokens", "48", "--model", model_path,
                 "--methods", "avg,majority", "--template", "reasoning", "--neureasoner", str(mon),
                 "--threads", str(THREADS), "--quiet", "--out", str(rep)]) == 0
    report = json.loads(rep.read_text())
    assert {"avg+neureasoner", "majority+neureasoner"} <= set(report["methods"])
    assert report["neureasoner_run"]["samples"] == 4
    assert main(["eval", "--tasks", "arith", "--limit", "1", "--model", model_path, "--neureasoner-actions",
                 "intra=none", "--out", str(tmp_path / "x.json")]) == 2
