"""The embedded C++ example (examples/neat_generate.cpp): built by CMake against the llama.cpp of
llama-cpp-python found as a system llama.cpp (find_package(llama), no Python in the core), run on
the default model with the shipped NEAT calibration, it writes what Python's generate writes with
llama.cpp's built-in chat renderer (the C++ core has no Jinja)."""
import os
import re
import subprocess

import pytest

from neurotap import neat
from neurotap.core.resources import shipped_file

NEEDS_MODEL = True  # every test here runs the real model (see conftest.py)

QUESTION = "List three fruits, one per line."


@pytest.fixture(scope="module")
def example(cmake_build):
    return cmake_build("example", ["-DNEUROTAP_BUILD_EXAMPLES=ON"], ["neat_generate"]) / "neat_generate"


def run(example, *args):
    return subprocess.run([str(example), *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_WAIT_POLICY": "passive"})


@pytest.mark.parametrize("use_neat", [True, False])
def test_example_generates_what_python_generates(example, model, model_path, use_neat):
    cal = shipped_file("neat-smollm2-135m.json")
    r = run(example, model_path, str(cal), QUESTION, "--max-tokens", "64", "--threads", "2",
            *([] if use_neat else ["--no-neat"]))
    assert r.returncode == 0, r.stderr
    text, summary = r.stdout.rsplit("\n[", 1)
    g = model.generate(model.prompt_tokens([{"role": "user", "content": QUESTION}], chat_template="builtin"),
                       max_tokens=64, temperature=0,
                       neat=neat.load_calibration("default", model) if use_neat else None)
    assert text == g.text
    m = re.match(r"(\d+) tokens \| finish: (\w+) \| NEAT: (\d+) decisions, (\d+) bans, exit at (-?\d+)", summary)
    assert m, summary
    assert int(m[1]) == g.n_tokens and m[2] == g.finish_reason
    assert int(m[3]) == len(g.neat_events) and int(m[5]) == g.neat_exit_at
    assert int(m[4]) == sum(1 for e in g.neat_events if e.action_name == "ban")
    if use_neat:
        assert g.neat_events  # the calibration decided somewhere: the comparison says something


def test_example_refuses_bad_input(example, model_path, tmp_path):
    bad = tmp_path / "cal.json"
    bad.write_text('{"version": 1, "neurons": [[0, 1]], "reference": [')
    r = run(example, model_path, str(bad), QUESTION)
    assert r.returncode == 1 and "not a valid NEAT calibration" in r.stderr
    r = run(example, str(tmp_path / "missing.gguf"), str(shipped_file("neat-smollm2-135m.json")), QUESTION)
    assert r.returncode == 1 and "missing.gguf" in r.stderr
    assert run(example, model_path).returncode == 2  # usage
