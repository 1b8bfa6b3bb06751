#!/usr/bin/env bash
# The test command: sets up .venv if needed, installs neurotap with its test extras (this
# builds llama-cpp-python from source the first time, about 5-10 minutes on 2 cores), runs the
# Python tests on the real default model, then the native tests under ASan + UBSan.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
# llama.cpp's AMX matmul (compiled in by -march=native on CPUs with AMX-INT8, e.g. Sapphire
# Rapids) segfaults in the first decode (ggml-org/llama.cpp#20824): build llama.cpp without it.
if grep -qw amx_int8 /proc/cpuinfo 2>/dev/null; then
    export CMAKE_ARGS="${CMAKE_ARGS:-} -DCMAKE_C_FLAGS=-mno-amx-int8 -DCMAKE_CXX_FLAGS=-mno-amx-int8"
fi
.venv/bin/python -m pip install --quiet ".[test]"
if [ -n "${CMAKE_ARGS:-}" ] && grep -qw amx_int8 /proc/cpuinfo 2>/dev/null; then
    # A llama-cpp-python wheel from pip's cache may have been built with AMX before: rebuild it.
    LIB="$(.venv/bin/python -c 'import importlib.util, os; print(os.path.join(os.path.dirname(importlib.util.find_spec("llama_cpp").origin), "lib"))')"
    if grep -qs ggml_backend_amx_mul_mat "$LIB"/libggml-cpu.so*; then
        .venv/bin/python -m pip install --quiet --no-cache-dir --force-reinstall --no-deps "$(.venv/bin/python -c 'import importlib.metadata as m; print("llama-cpp-python==" + m.version("llama-cpp-python"))')"
    fi
fi
.venv/bin/python -m pytest -q tests
PYTHON="$PY" bash tests/wheel_check.sh  # the wheel as users get it: built, repaired, installed without a compiler
PYTHON="$PWD/.venv/bin/python" bash cpp/tests/run_sanitized.sh
