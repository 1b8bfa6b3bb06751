#!/usr/bin/env bash
# Builds llama.cpp's own `llama-batched-bench` from the source vendored in the
# llama-cpp-python sdist of the pinned version, for side-by-side measurement only. Nothing of
# it is committed: the sdist and the build live under build/llama-batched-bench/.
#   bash benchmarks/build_batched_bench.sh      -> prints the path of the binary
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
DEST="$ROOT/build/llama-batched-bench"
VER="$("$PY" -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))')"
SRC="$DEST/llama_cpp_python-$VER/vendor/llama.cpp"
BIN="$DEST/build/bin/llama-batched-bench"
mkdir -p "$DEST"
if [[ ! -d "$SRC" ]]; then
    # --no-build-isolation: reading the sdist's metadata needs only scikit-build-core, present here.
    "$PY" -m pip download --quiet --no-deps --no-binary llama-cpp-python --no-build-isolation \
        "llama-cpp-python==$VER" -d "$DEST" >&2
    tar -xzf "$DEST/llama_cpp_python-$VER.tar.gz" -C "$DEST"
fi
if [[ ! -x "$BIN" ]]; then
    # The same CPU flags as the llama-cpp-python build (GGML_NATIVE on by default).
    cmake -S "$SRC" -B "$DEST/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF >&2
    cmake --build "$DEST/build" --target llama-batched-bench --parallel "${JOBS:-2}" >&2
fi
echo "$BIN"
