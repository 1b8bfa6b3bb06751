"""The C interface (cpp/capi/neurotap.h, libneurotap): its C example (examples/neat_generate.c),
built by CMake against the llama.cpp that llama-cpp-python installed (found as a system
llama.cpp), embeds NEAT in a decode loop of its own; its tokens, NEAT decisions and activated set
equal what Python's neurotap computes. The C test program (cpp/tests/capi_test.c) checks bad input,
calls out of order and two sequences sharing a batch."""
import json
import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from neurotap import neat
from neurotap.core.resources import shipped_file

NEEDS_MODEL = True  # every test here runs the real model (see conftest.py)

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["List three fruits, one per line.", "How do I boil an egg? Give the steps."]
MAX_TOKENS = 64


@pytest.fixture(scope="module")
def capi(cmake_build):
    return cmake_build("capi", ["-DNEUROTAP_BUILD_CAPI=ON", "-DNEUROTAP_BUILD_TESTS=ON"],
                       ["neat_generate_c", "neurotap_capi_test"])


def run(exe, *args):
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_WAIT_POLICY": "passive"})


def run_json(capi, model_path, cal, question, *flags):
    r = run(capi / "neat_generate_c", model_path, cal, question, "--max-tokens", MAX_TOKENS, "--threads", 2,
            "--json", *flags)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def words_of(hex_words: str) -> np.ndarray:
    return np.array([int(hex_words[i:i + 16], 16) for i in range(0, len(hex_words), 16)], dtype=np.uint64)


@pytest.fixture(scope="module")
def calibrations(tmp_path_factory):
    """The shipped calibration and two crafted ones: one that exits at the first line start, one
    that bans at every line start (the mechanics of both paths, as tests/test_neat.py checks)."""
    src = shipped_file("neat-smollm2-135m.json")
    d = json.loads(src.read_text())
    tmp = tmp_path_factory.mktemp("capi")
    out = {"shipped": src}
    for name, over in {"exit_now": dict(exit_similarity=-2.0, magnitude=-1.0),
                       "ban_all": dict(ban_similarity=-2.0, exit_similarity=2.0)}.items():
        out[name] = tmp / f"{name}.json"
        out[name].write_text(json.dumps({**d, **over}))
    return out


def python_run(model, question, cal_path):
    prompt = model.prompt_tokens([{"role": "user", "content": question}], chat_template="builtin")
    cal = neat.load_calibration(str(cal_path), model) if cal_path else None
    return prompt, model.generate(prompt, max_tokens=MAX_TOKENS, temperature=0, neat=cal)


@pytest.mark.parametrize("question", QUESTIONS)
@pytest.mark.parametrize("which", ["shipped", "exit_now", "ban_all"])
def test_c_example_decides_as_python(capi, model, model_path, calibrations, question, which):
    c = run_json(capi, model_path, calibrations[which], question)
    prompt, g = python_run(model, question, calibrations[which])
    assert c["tokens"] == list(g.tokens)
    assert c["finish"] == g.finish_reason and c["exit_at"] == g.neat_exit_at
    assert [tuple(e[:2]) for e in c["events"]] == [(e[0], e[1]) for e in g.neat_events]
    np.testing.assert_allclose([e[2:] for e in c["events"]], [e[2:] for e in g.neat_events], rtol=1e-6, atol=1e-7)
    assert g.neat_events  # NEAT decided somewhere: the comparison says something
    if which == "exit_now":
        assert g.finish_reason == "neat_exit" and c["exit_at"] == len(c["tokens"])
    if which == "ban_all":
        assert all(e[1] == 1 for e in c["events"])

    # The activated set: Python's active set of the same tokens (teacher-forced), bit for bit.
    s = model.sample(prompt, n=1, forced=[c["tokens"]], max_tokens=len(c["tokens"]), temperature=0,
                     reducers=("active_sets",))[0]
    assert s.tokens == c["tokens"]
    py = np.asarray(s.active_set(), dtype=np.uint64)
    cw = words_of(c["set_words"])
    assert cw.shape == py.shape and c["set_count"] == int(sum(bin(int(w)).count("1") for w in py))
    np.testing.assert_array_equal(cw, py)


def test_prompt_last_token_apart(capi, model, model_path, calibrations):
    """An application that decodes all but the prompt's last token, then the last alone with its
    output (Python decodes it with the rest, in one batch here, output on the last row only: the
    example's default): the decisions and tokens are Python's, and the activated set matches to
    the last bits of the prompt's batched decode."""
    question = QUESTIONS[1]
    c = run_json(capi, model_path, calibrations["shipped"], question, "--prompt-last-apart")
    together = run_json(capi, model_path, calibrations["shipped"], question)
    _, g = python_run(model, question, calibrations["shipped"])
    assert c["tokens"] == list(g.tokens) == together["tokens"]
    assert [tuple(e[:2]) for e in c["events"]] == [(e[0], e[1]) for e in g.neat_events]
    a, b = words_of(c["set_words"]), words_of(together["set_words"])
    inter = sum(bin(int(x & y)).count("1") for x, y in zip(a, b))
    union = sum(bin(int(x | y)).count("1") for x, y in zip(a, b))
    assert inter / union > 0.999


def test_c_example_without_neat(capi, model, model_path):
    c = run_json(capi, model_path, shipped_file("neat-smollm2-135m.json"), QUESTIONS[0], "--no-neat")
    _, g = python_run(model, QUESTIONS[0], None)
    assert c["tokens"] == list(g.tokens) and c["events"] == [] and c["exit_at"] == -1


def test_c_program_checks(capi, model_path, tmp_path):
    """Bad input returns error codes with messages (never a crash); calls out of order are refused;
    two sequences in one batch get the rows each would get in a batch of its own."""
    r = subprocess.run([str(capi / "neurotap_capi_test"), model_path, str(shipped_file("neat-smollm2-135m.json"))],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_WAIT_POLICY": "passive", "TMPDIR": str(tmp_path)})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "capi_test: ok" in r.stdout
    m = re.search(r"two sequences, (\d+) and (\d+) NEAT decisions, Jaccard ([\d.]+)", r.stdout)
    assert m and int(m[1]) > 0 and 0.5 < float(m[3]) < 1.0


def test_c_example_refuses_bad_input(capi, model_path, tmp_path):
    exe = capi / "neat_generate_c"
    r = run(exe, model_path, tmp_path / "missing.json", "hi")
    assert r.returncode == 1 and "missing.json" in r.stderr and "NEUROTAP_ERR_FILE" in r.stderr
    d = json.loads(shipped_file("neat-smollm2-135m.json").read_text())
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**d, "model": {**d["model"], "n_ff": 2048, "file": "other.gguf"}}))
    r = run(exe, model_path, other, "hi")
    assert r.returncode == 1 and "other.gguf" in r.stderr and "NEUROTAP_ERR_MODEL" in r.stderr
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": 1, "neurons": [[0, 1]], "reference": [')
    r = run(exe, model_path, bad, "hi")
    assert r.returncode == 1 and "not a valid NEAT calibration" in r.stderr
    assert run(exe, model_path).returncode == 2  # usage


def test_library_exports_the_c_interface_only(capi):
    if shutil.which("nm") is None:
        pytest.skip("nm is not installed")
    lib = next(capi.glob("libneurotap.so*"))
    out = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True, check=True).stdout
    names = [line.split()[-1] for line in out.splitlines() if line.strip()]
    assert "neurotap_neat_decide" in names and "neurotap_sets_jaccard" in names
    assert [n for n in names if not n.startswith("neurotap_")] == []
    # The header is C: a C compiler takes it alone (with llama.h, which is C11), pedantic.
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc:
        include = Path(sysconfig.get_paths()["purelib"]) / "include"
        r = subprocess.run([cc, "-std=c11", "-pedantic", "-Werror", "-Wall", "-fsyntax-only", "-x", "c",
                            f"-I{include}", f"-I{ROOT / 'cpp' / 'capi'}", "-"], input='#include "neurotap.h"\n',
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
