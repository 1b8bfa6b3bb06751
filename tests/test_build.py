"""The package links the llama.cpp that llama-cpp-python installed, exactly one copy of it."""
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_MAPS_SCRIPT = r"""
import re, sys
{imports}
m = neurotap.load("smollm2-135m", n_ctx=256, n_threads=2)
llm = llama_cpp.Llama(str(m.info.path), n_ctx=256, n_threads=2, verbose=False)
neurotap.tap(llm).generate("Hi", max_tokens=2, temperature=0)
libs = {}
for line in open("/proc/self/maps"):
    parts = line.split()
    if len(parts) >= 6:
        mo = re.search(r"/(lib(?:llama|ggml|ggml-base|ggml-cpu))\.so[.0-9]*$", parts[5])
        if mo:
            libs.setdefault(mo.group(1), set()).add(parts[5])
import os, json
print(json.dumps({k: sorted(os.path.realpath(p) for p in v) for k, v in libs.items()}))
print(json.dumps(os.path.dirname(llama_cpp.__file__)))
"""


# Either import order: llama_cpp opens libllama.so by path, the module needs libllama.so.0 (two
# files in llama-cpp-python's package); neurotap first once mapped both.
@pytest.mark.parametrize("imports", ["import llama_cpp\nimport neurotap", "import neurotap\nimport llama_cpp"],
                         ids=["llama_cpp-first", "neurotap-first"])
@pytest.mark.model
def test_one_copy_of_llama_cpp_in_the_process(imports):
    out = subprocess.run([sys.executable, "-c", _MAPS_SCRIPT.replace("{imports}", imports)],
                         capture_output=True, text=True, check=True)
    import json

    lines = out.stdout.strip().splitlines()
    libs, pkg_dir = json.loads(lines[-2]), json.loads(lines[-1])
    for lib in ("libllama", "libggml", "libggml-base", "libggml-cpu"):
        assert lib in libs, f"{lib} not mapped: {libs}"
        assert len(libs[lib]) == 1, f"{lib} is loaded from several files: {libs[lib]}"
        assert libs[lib][0].startswith(str(Path(pkg_dir).resolve() / "lib")), libs[lib]


def test_llama_cpp_version_pinned_once():
    text = (ROOT / "pyproject.toml").read_text()
    pins = re.findall(r"llama[-_]cpp[-_]python\s*==\s*([0-9.]+)", text)
    assert len(pins) == 1, f"llama-cpp-python must be pinned exactly once in pyproject.toml: {pins}"
    sys.path.insert(0, str(ROOT / "build_backend"))
    try:
        import llama_pin
    finally:
        sys.path.pop(0)
    assert llama_pin.llama_requirement(ROOT / "pyproject.toml") == f"llama-cpp-python=={pins[0]}"
    assert importlib.metadata.version("llama-cpp-python") == pins[0]
