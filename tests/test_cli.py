"""The `neurotap` command as a user runs it."""
import re
import subprocess
import sys

NEEDS_MODEL = True  # every test here runs the real model (see conftest.py)


def run(*args):
    return subprocess.run([sys.executable, "-m", "neurotap", *args], capture_output=True, text=True, timeout=300)


def test_info_default_model():
    r = run("info", "--threads", "2")
    assert r.returncode == 0, r.stderr
    assert re.search(r"architecture\s+llama", r.stdout)
    assert re.search(r"layers\s+30\b", r.stdout) and re.search(r"n_ff\s+1536\b", r.stdout)
    assert "total neurons 46080" in r.stdout and "ffn_swiglu-0 ... ffn_swiglu-29" in r.stdout


def test_generate_prints_text_and_figures():
    # llama.cpp's built-in renderer: SmolLM2's own Jinja template (the default) adds a system prompt
    # under which this tiny model answers this question in French.
    r = run("generate", "What is the capital of France?", "-n", "24", "--threads", "2", "--chat-template", "builtin")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    figures = r.stdout.strip().splitlines()[-1]
    assert re.match(r"\[\d+ tokens \| [\d.]+ tok/s decode \| .* active neurons/token \d+ of 46080", figures), figures


def test_errors_are_reported_not_raised():
    r = run("info", "no-such-model")
    assert r.returncode == 2 and "unknown model name" in r.stderr and "Traceback" not in r.stderr
    r = run("generate", "hi", "-n", "0")
    assert r.returncode == 2 and "max_tokens" in r.stderr


def test_sample_prints_every_answer_with_figures():
    r = run("sample", "What is 2+2?", "-n", "3", "--max-tokens", "12", "--threads", "2")
    assert r.returncode == 0, r.stderr
    heads = re.findall(r"^--- sample (\d+): (\d+) tokens, (\d+) of 46080 neurons active", r.stdout, re.M)
    assert [h[0] for h in heads] == ["0", "1", "2"]
    assert all(0 < int(h[1]) <= 12 and 0 < int(h[2]) <= 46080 for h in heads)
    assert re.search(r"\[3 samples \| \d+ tokens in [\d.]+ s \([\d.]+ tok/s aggregate\)", r.stdout)


def test_version_names_neurotap_and_llama_cpp_python():
    from pathlib import Path

    # Both versions as pyproject.toml writes them (the one place each is set).
    toml = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"', toml, re.M).group(1)
    llama = re.search(r'"llama-cpp-python==([^"]+)"', toml).group(1)
    r = run("--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"neurotap {version} (llama-cpp-python {llama})"


def test_eval_exits_nonzero_when_every_task_fails(tmp_path):
    # n_ctx 256 holds no prompt plus 256 new tokens: every task fails with a context error.
    out = tmp_path / "r.json"
    r = run("eval", "--tasks", "arith", "--limit", "2", "-n", "2", "--max-tokens", "256", "--ctx", "256",
            "--methods", "avg", "--threads", "2", "--quiet", "--out", str(out))
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "every task failed (2 of 2)" in r.stderr
    assert len(re.findall(r"^\[task \S+ failed: ContextError", r.stdout, re.M)) == 2
    assert out.is_file()  # the report of the failures is still written


def test_eval_on_gemma_answers(tmp_path):
    import json

    out = tmp_path / "g.json"
    r = run("eval", "-m", "gemma3-270m", "--tasks", "arith", "--limit", "2", "-n", "2", "--max-tokens", "24",
            "--methods", "avg,majority,minact", "--threads", "2", "--quiet", "--out", str(out))
    assert r.returncode == 0, (r.stdout, r.stderr)
    rep = json.loads(out.read_text())
    assert rep["failed_tasks"] == [] and rep["config"]["n_tasks"] == 2
    assert rep["model"]["architecture"] == "gemma3"
    for task in rep["tasks"]:
        assert "error" not in task and len(task["samples"]) == 2
        assert all(s["tokens"] > 0 and s["text"].strip() for s in task["samples"])


def test_info_on_gemma_names_the_registry_template():
    r = run("info", "gemma3-270m", "--threads", "2")
    assert r.returncode == 0, r.stderr
    assert re.search(r"architecture\s+gemma3", r.stdout) and "ffn_geglu-0" in r.stdout
    assert re.search(r"chat template\s+no \(the registry supplies one\)", r.stdout)
