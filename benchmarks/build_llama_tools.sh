#!/usr/bin/env bash
# Builds llama.cpp's own tools (llama-batched-bench, llama-server, ...) from the source vendored
# in the llama-cpp-python sdist of the pinned version, for side-by-side measurement only, with
# the same CPU flags as the llama-cpp-python build neurotap runs on. Nothing of it is committed:
# the sdist and the build live under build/llama.cpp/ (one configuration shared by every tool,
# so ggml and libllama are compiled once).
#   bash benchmarks/build_llama_tools.sh llama-server [llama-batched-bench ...]
#       -> prints the path of each binary, one a line, in the order asked
set -euo pipefail
[[ $# -ge 1 ]] || { echo "usage: $0 TARGET [TARGET ...] (llama-batched-bench, llama-server, ...)" >&2; exit 2; }
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
DEST="$ROOT/build/llama.cpp"
VER="$("$PY" -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))')"
SRC="$DEST/llama_cpp_python-$VER/vendor/llama.cpp"
mkdir -p "$DEST"
if [[ ! -d "$SRC" ]]; then
    # --no-build-isolation: reading the sdist's metadata needs only scikit-build-core, present here.
    "$PY" -m pip download --quiet --no-deps --no-binary llama-cpp-python --no-build-isolation \
        "llama-cpp-python==$VER" -d "$DEST" >&2
    tar -xzf "$DEST/llama_cpp_python-$VER.tar.gz" -C "$DEST"
fi
# The same CPU flags as the llama-cpp-python build: GGML_NATIVE (on by default), and on CPUs with
# AMX-INT8 without it, as tests/run.sh builds llama-cpp-python there (llama.cpp's AMX matmul
# segfaults: ggml-org/llama.cpp#20824).
FLAGS=()
if grep -qw amx_int8 /proc/cpuinfo 2>/dev/null; then
    FLAGS=(-DCMAKE_C_FLAGS=-mno-amx-int8 -DCMAKE_CXX_FLAGS=-mno-amx-int8)
fi
# The server without its web UI (no npm, no download) and without HTTPS.
cmake -S "$SRC" -B "$DEST/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DBUILD_SHARED_LIBS=OFF "${FLAGS[@]}" >&2
cmake --build "$DEST/build" --parallel "${JOBS:-2}" $(printf -- '--target %s ' "$@") >&2  # incremental
for t in "$@"; do echo "$DEST/build/bin/$t"; done
