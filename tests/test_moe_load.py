"""Files llama.cpp would crash on are refused at load, before llama.cpp reads them, with a
ModelError naming the problem: an OLMoE file with grouped-query attention (llama.cpp's OLMoE graph
normalizes K with an n_embd-wide weight and aborts on GGML_ASSERT(ggml_can_repeat)), and F64
weights (no F64 matmul or binary op on the CPU: abort or segfault in the first decode). Each
load runs in a subprocess, so a regression kills that child, not pytest; the child's exit code
and stderr are checked."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import neurotap

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import make_shapes  # noqa: E402

NEEDS_MODEL = True  # the files carry the default model's tokenizer (see conftest.py)
pytest.importorskip("gguf")

CHILD = """
import sys, neurotap
try:
    m = neurotap.load(sys.argv[1], n_ctx=256, n_threads=2)
except neurotap.ModelError as e:
    print("REFUSED:", e)
    sys.exit(3)
print("TOKENS:", m.sample("Hello", n=2, max_tokens=3, seed=1)[0].tokens)
"""


def load_in_child(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("kw, match", [
    (dict(arch="olmoe", tamper={"kv_heads": 2}),
     r"olmoe file .* has 2 key/value heads of size 16 for 4 query heads and n_embd 64; .*head_count_kv == head_count"),
    (dict(arch="olmoe", head_dim=8),
     r"olmoe file .* has 4 key/value heads of size 8 for 4 query heads and n_embd 64"),
    (dict(arch="qwen3moe", tamper={"f64": "output_norm.weight"}), r"tensor 'output_norm\.weight' of .* is F64"),
    (dict(arch="qwen3moe", tamper={"f64": "blk.1.ffn_gate_inp.weight"}),
     r"tensor 'blk\.1\.ffn_gate_inp\.weight' of .* is F64, which llama\.cpp cannot compute with"),
])
def test_crashing_files_are_refused_at_load(tmp_path, kw, match):
    path = make_shapes.write_moe(tmp_path / "bad.gguf", **kw)
    r = load_in_child(path)
    assert r.returncode == 3, f"exit {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    with pytest.raises(neurotap.ModelError, match=match):  # and in this process, with the same message
        neurotap.load(str(path), n_ctx=256)


@pytest.mark.parametrize("kw", [dict(arch="olmoe"), dict(arch="qwen3moe", tamper={"f64": "token_embd.weight"})])
def test_what_llama_cpp_runs_still_loads(tmp_path, kw):
    """The checks refuse exactly the crashing cases: OLMoE with as many K/V heads as query heads,
    and an F64 token embedding (read by row lookups only, beside an output matrix), decode."""
    r = load_in_child(make_shapes.write_moe(tmp_path / "ok.gguf", **kw))
    assert r.returncode == 0 and "TOKENS:" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]
