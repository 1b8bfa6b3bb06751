import os

import pytest

import neurotap

# Tests that need the real model carry the `model` marker: `pytest -m "not model"` runs the pure
# ones (scoring, selectors, NEX, the layer check) in seconds. A test is marked when it uses the
# model fixtures or its module sets NEEDS_MODEL = True (tests that load models themselves).
MODEL_FIXTURES = {"model", "model_path", "gemma"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())) or getattr(item.module, "NEEDS_MODEL", False):
            item.add_marker(pytest.mark.model)


# Small, fixed resources: these machines have 2 cores; tests share one loaded model.
THREADS = int(os.environ.get("NEUROTAP_TEST_THREADS", "2"))


@pytest.fixture(scope="session")
def model_path() -> str:
    return str(neurotap.resolve("smollm2-135m"))


@pytest.fixture(scope="session")
def model() -> "neurotap.Model":
    return neurotap.load("smollm2-135m", n_ctx=1024, n_threads=THREADS)


@pytest.fixture(scope="session")
def gemma() -> "neurotap.Model":
    """The second shipped model (gemma3 architecture, GeGLU, no chat template in its file). The
    `test` extra installs it: its tests run, never skip (a missing package fails them)."""
    return neurotap.load("gemma3-270m", n_ctx=512, n_threads=THREADS)


CHAT = [{"role": "user", "content": "Name three colors."}]


@pytest.fixture(scope="session")
def cmake_build():
    """build(name, options, targets): configures build/<name> with CMake against the llama.cpp of
    llama-cpp-python, found as a system llama.cpp (find_package(llama), no Python in the core),
    builds the targets and returns the build directory. Skips where cmake is missing."""
    import shutil
    import subprocess
    import sysconfig
    from pathlib import Path

    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    root = Path(__file__).resolve().parents[1]

    def build(name, options, targets):
        out_dir = root / "build" / name
        gen = ["-G", "Ninja"] if shutil.which("ninja") else []
        cfg = subprocess.run(["cmake", "-S", str(root), "-B", str(out_dir), *gen, "-DCMAKE_BUILD_TYPE=Release",
                              "-DNEUROTAP_BUILD_PYTHON=OFF", "-DNEUROTAP_SYSTEM_LLAMA=ON", *options,
                              f"-DCMAKE_PREFIX_PATH={sysconfig.get_paths()['purelib']}"], capture_output=True, text=True)
        assert cfg.returncode == 0, cfg.stdout + cfg.stderr
        made = subprocess.run(["cmake", "--build", str(out_dir), "--target", *targets, "--parallel",
                               os.environ.get("JOBS", "2")], capture_output=True, text=True)
        assert made.returncode == 0, made.stdout + made.stderr
        return out_dir

    return build
