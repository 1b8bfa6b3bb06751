"""The lm-evaluation-harness backend, offline: `python -m neurotap.apps.lmeval --model neurotap`
on small local YAML tasks (tests/data/lmeval, local JSON data, nothing downloaded). NAD and plain
sampling side by side in lm-eval's own report; each answer is checked against the same run made
here, and multiple-choice log-likelihoods against llama-cpp-python's logits."""
import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import THREADS
from neurotap import nad

NEEDS_MODEL = True  # every test here runs the real model (see conftest.py)
pytest.importorskip("lm_eval")
from neurotap.apps.lmeval import NeurotapLM, request_seed  # noqa: E402  (needs lm_eval)

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["neurotap_arith_plain", "neurotap_arith_nad", "neurotap_choice"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("lmeval")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(out / "hf"),
           "OMP_WAIT_POLICY": "passive"}
    r = subprocess.run([sys.executable, "-m", "neurotap.apps.lmeval", "--model", "neurotap", "--model_args",
                        f"model=smollm2-135m,threads={THREADS},n_ctx=1024", "--tasks", *TASKS, "--include_path",
                        "tests/data/lmeval", "--output_path", str(out), "--log_samples"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (results,) = glob.glob(str(out / "smollm2-135m" / "results_*.json"))

    def samples(task):
        (f,) = glob.glob(str(out / "smollm2-135m" / f"samples_{task}_*.jsonl"))
        return [json.loads(line) for line in open(f)]

    return r.stdout, json.load(open(results))["results"], samples


def test_report_compares_nad_with_plain_sampling(report):
    table, results, _ = report
    for task in TASKS:
        assert task in table  # lm-eval's own table
    assert {"exact_match,first", "exact_match,majority"} <= set(results["neurotap_arith_plain"])
    assert "exact_match,pick" in results["neurotap_arith_nad"]
    assert results["neurotap_arith_nad"]["sample_len"] == results["neurotap_arith_plain"]["sample_len"] == 6
    assert 0.0 <= results["neurotap_choice"]["acc,none"] <= 1.0


def _args(s):
    a = s["arguments"]["gen_args_0"]
    return a["arg_0"], a["arg_1"]


def test_nad_answers_are_the_picks(report, model):
    for s in report[2]("neurotap_arith_nad"):
        context, gk = _args(s)
        best = nad.best_of_n(model, model.tokenize(context), n=gk["nad_n"], method=gk["method"],
                             early_stop=gk["early_stop"], max_tokens=gk["max_gen_toks"], seed=request_seed(0, context),
                             stop=gk["until"], temperature=gk["temperature"], top_p=0.95, top_k=40, min_p=0.0)
        assert s["resps"] == [[best.text]]


def test_repeats_are_one_parallel_run(report, model):
    for s in report[2]("neurotap_arith_plain"):
        context, gk = _args(s)
        ref = model.sample(model.tokenize(context), n=4, max_tokens=gk["max_gen_toks"], seed=request_seed(0, context),
                           stop=gk["until"], temperature=gk["temperature"], top_p=0.95, top_k=40, min_p=0.0,
                           reducers=(), tap=False)
        assert s["resps"] == [[x.text for x in ref]]  # repeat i got sample i of one n = 4 run


def test_loglikelihood_equals_llama_cpp_python(report, model_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path, n_ctx=256, n_threads=THREADS, verbose=False, logits_all=True, flash_attn=True)
    checked = 0
    for s in report[2]("neurotap_choice"):
        for i, (ll, greedy) in enumerate(s["filtered_resps"]):
            a = s["arguments"][f"gen_args_{i}"]
            ctx = llm.tokenize(a["arg_0"].encode(), add_bos=False, special=True)
            cont = llm.tokenize((a["arg_0"] + a["arg_1"]).encode(), add_bos=False, special=True)[len(ctx):]
            llm.reset()
            llm.eval(ctx + cont)
            logits = np.asarray(llm.scores[len(ctx) - 1:len(ctx) + len(cont) - 1], np.float64)
            logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) \
                - logits.max(1, keepdims=True)
            ref = float(sum(logp[j, t] for j, t in enumerate(cont)))
            assert float(ll) == pytest.approx(ref, abs=2e-3 * len(cont)), a
            assert (greedy == "True") == all(int(np.argmax(logits[j])) == t for j, t in enumerate(cont))
            checked += 1
    assert checked == 11


def test_model_args_and_rolling_loglikelihood(model_path, model):
    lm = NeurotapLM.create_from_arg_string(f"model={model_path},nad_n=4,method=knn,early_stop=8,threads={THREADS},"
                                           "n_ctx=256", {"batch_size": 1, "device": None})
    assert lm.defaults["nad_n"] == 4 and lm.defaults["early_stop"] == 8

    class Req:
        def __init__(self, *args):
            self.args = args

    text = "The sky is blue."
    (total,) = lm.loglikelihood_rolling([Req(text)], disable_tqdm=True)
    toks = model.tokenize(text, add_special=False)
    assert lm.prefix_token == 1 and np.isfinite(total) and total < 0  # SmolLM2's bos id
    # One window: the text's log-likelihood after the prefix token, token by token.
    lp = [lm._score([lm.prefix_token] + toks[:j], [toks[j]])[0] for j in range(len(toks))]
    assert total == pytest.approx(sum(lp), abs=1e-3)
