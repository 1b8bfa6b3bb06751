import os

import pytest

import neurotap

# Small, fixed resources: these machines have 2 cores; tests share one loaded model.
THREADS = int(os.environ.get("NEUROTAP_TEST_THREADS", "2"))


@pytest.fixture(scope="session")
def model_path() -> str:
    return str(neurotap.resolve("smollm2-135m"))


@pytest.fixture(scope="session")
def model() -> "neurotap.Model":
    return neurotap.load("smollm2-135m", n_ctx=1024, n_threads=THREADS)


CHAT = [{"role": "user", "content": "Name three colors."}]
