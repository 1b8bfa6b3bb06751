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
