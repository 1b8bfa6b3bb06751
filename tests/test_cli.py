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
