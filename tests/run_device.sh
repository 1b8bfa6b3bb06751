#!/usr/bin/env bash
# The device suite, one command: the tap on a non-host llama.cpp backend (Vulkan), verified on
# Mesa's CPU Vulkan driver (lavapipe) where no GPU is present.
#   1. installs the Vulkan loader and headers, glslc, SPIR-V headers and Mesa's drivers with apt
#      where missing;
#   2. builds the pinned llama-cpp-python with GGML_VULKAN into .venv-vulkan (the wheel is kept in
#      build/llama-vulkan-wheel, so later runs skip the 30-60 minute build on 2 cores), and
#      neurotap against it;
#   3. makes lavapipe visible to llama.cpp and runs the device tests (pytest -m device).
# A machine with a real Vulkan GPU: NEUROTAP_VK_DRIVER=system keeps the system's drivers instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-vulkan
WHEELS=build/llama-vulkan-wheel
T0=$(date +%s)
stage() { echo "== [$(( $(date +%s) - T0 )) s] $*"; }

# 1. System packages (Debian/Ubuntu names).
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
missing=0
command -v glslc >/dev/null || missing=1
command -v vulkaninfo >/dev/null || missing=1
[ -f /usr/include/vulkan/vulkan.h ] || missing=1
[ -d /usr/share/cmake/SPIRV-Headers ] || [ -d /usr/lib/x86_64-linux-gnu/cmake/SPIRV-Headers ] || missing=1
ls /usr/share/vulkan/icd.d/lvp_icd.*.json >/dev/null 2>&1 || missing=1
if [ "$missing" = 1 ]; then
    stage "installing libvulkan-dev glslc mesa-vulkan-drivers spirv-headers vulkan-tools"
    command -v apt-get >/dev/null || { echo "run_device.sh: no apt-get here; install the Vulkan headers and loader, glslc, SPIR-V headers and Mesa's Vulkan drivers (lavapipe) yourself" >&2; exit 1; }
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q libvulkan-dev glslc mesa-vulkan-drivers spirv-headers vulkan-tools
fi

# 2. The device: lavapipe, the only one llama.cpp sees. ggml-vulkan skips CPU-type Vulkan
# devices unless GGML_VK_VISIBLE_DEVICES names them.
if [ "${NEUROTAP_VK_DRIVER:-lavapipe}" = lavapipe ]; then
    ICD=$(ls /usr/share/vulkan/icd.d/lvp_icd.*.json | head -1)
    export VK_ICD_FILENAMES="$ICD" VK_DRIVER_FILES="$ICD" GGML_VK_VISIBLE_DEVICES=0
fi
vulkaninfo --summary 2>/dev/null | grep -E 'deviceName|driverName' || { echo "run_device.sh: vulkaninfo finds no Vulkan device" >&2; exit 1; }

# 3. The Vulkan build of the pinned llama-cpp-python, built once and kept.
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIN=$("$VENV/bin/python" -c 'import sys; sys.path.insert(0, "build_backend"); from llama_pin import llama_requirement; print(llama_requirement())')
LLAMA_CMAKE_ARGS="-DGGML_VULKAN=on"
# llama.cpp's AMX matmul segfaults (ggml-org/llama.cpp#20824): as tests/run.sh, build without it.
if grep -qw amx_int8 /proc/cpuinfo 2>/dev/null; then
    LLAMA_CMAKE_ARGS="$LLAMA_CMAKE_ARGS -DCMAKE_C_FLAGS=-mno-amx-int8 -DCMAKE_CXX_FLAGS=-mno-amx-int8"
fi
# ggml-vulkan at the pinned llama.cpp uses VK_EXT_layer_settings (Vulkan headers 1.3.272 or newer);
# Debian 12 has 1.3.239. Then the headers alone come from Debian 13's libvulkan-dev, downloaded
# with a private apt configuration (the system's own is left alone) and unpacked under build/.
if ! grep -qs LayerSettingsCreateInfoEXT /usr/include/vulkan/vulkan_structs.hpp; then
    H="$PWD/build/vulkan-headers"
    if ! grep -qs LayerSettingsCreateInfoEXT "$H/root/usr/include/vulkan/vulkan_structs.hpp"; then
        stage "fetching Vulkan headers newer than the system's (Debian 13's libvulkan-dev, unpacked under $H)"
        command -v dpkg-deb >/dev/null || { echo "run_device.sh: the system's Vulkan headers are too old (need 1.3.272+ for VK_EXT_layer_settings); install newer ones" >&2; exit 1; }
        MIRROR=$(apt-get indextargets --format '$(REPO_URI)' 'Created-By: Packages' | grep -v security | head -1)
        rm -rf "$H" && mkdir -p "$H/lists/partial" "$H/cache/archives/partial"
        echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR trixie main" > "$H/sources.list"
        APT=(-o Dir::Etc::SourceList="$H/sources.list" -o Dir::Etc::SourceParts=/nonexistent
             -o Dir::State::Lists="$H/lists" -o Dir::Cache="$H/cache" -o Debug::NoLocking=1)
        apt-get "${APT[@]}" update -q
        (cd "$H" && apt-get "${APT[@]}" download libvulkan-dev)
        dpkg-deb -x "$H"/libvulkan-dev_*.deb "$H/root"
        rm -rf "$H/lists" "$H/cache"
    fi
    LLAMA_CMAKE_ARGS="$LLAMA_CMAKE_ARGS -DVulkan_INCLUDE_DIR=$H/root/usr/include"
fi
KEY="$PIN $LLAMA_CMAKE_ARGS"
if [ "$(cat "$WHEELS/key" 2>/dev/null)" != "$KEY" ] || ! ls "$WHEELS"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    stage "building $PIN with $LLAMA_CMAKE_ARGS (compiles llama.cpp and its Vulkan shaders: long)"
    rm -rf "$WHEELS" && mkdir -p "$WHEELS"
    # --no-cache-dir: pip's wheel cache is keyed by the sdist, not CMAKE_ARGS (it would hand back a CPU build).
    CMAKE_ARGS="$LLAMA_CMAKE_ARGS" nice -n 19 "$VENV/bin/python" -m pip wheel -q --no-deps --no-cache-dir \
        --no-binary llama-cpp-python "$PIN" -w "$WHEELS"
    echo "$KEY" > "$WHEELS/key"
fi
has_vulkan() {
    "$VENV/bin/python" - <<'EOF'
import importlib.util, pathlib, sys
spec = importlib.util.find_spec("llama_cpp")
sys.exit(0 if spec and list((pathlib.Path(spec.origin).parent / "lib").glob("libggml-vulkan.so*")) else 1)
EOF
}
if ! has_vulkan; then
    stage "installing the Vulkan llama-cpp-python into $VENV"
    "$VENV/bin/python" -m pip install -q --force-reinstall --no-deps "$WHEELS"/llama_cpp_python-*.whl
fi

# 4. neurotap against it: its build and test requirements first (llama-cpp-python is already
# satisfied), then neurotap without build isolation, so it compiles against this venv's llama.cpp
# in a build folder of its own (not the CPU build's).
stage "installing neurotap into $VENV"
DEPS=$("$VENV/bin/python" - <<'EOF'
import tomllib
p = tomllib.load(open("pyproject.toml", "rb"))
print("\n".join(p["build-system"]["requires"] + p["project"]["dependencies"] + p["project"]["optional-dependencies"]["test"]))
EOF
)
mapfile -t DEPS_ARR <<< "$DEPS"
"$VENV/bin/python" -m pip install -q "${DEPS_ARR[@]}"
has_vulkan || { echo "run_device.sh: installing the requirements replaced the Vulkan llama-cpp-python" >&2; exit 1; }
env -u CMAKE_ARGS "$VENV/bin/python" -m pip install -q --no-build-isolation --no-deps \
    --config-settings=build-dir="build/vulkan-{wheel_tag}" .

# 5. The device tests.
"$VENV/bin/python" -c 'import neurotap; d = [x for x in neurotap.devices() if x["type"] in ("gpu", "igpu")]; print("devices:", neurotap.devices()); raise SystemExit(0 if d else "llama.cpp sees no GPU device: check the Vulkan driver")'
stage "running the device tests"
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive}  # llama.cpp's CPU threads and lavapipe's share the cores
"$VENV/bin/python" -m pytest -q -m device tests/test_device.py "$@"
stage "done"
