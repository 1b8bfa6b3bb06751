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
.venv/bin/python -m pip install --quiet ".[test]"
.venv/bin/python -m pytest -q tests
PYTHON="$PWD/.venv/bin/python" bash cpp/tests/run_sanitized.sh
