"""Bad input gets a clear Python exception naming the problem, never a crash."""

import pytest

import neurotap
from neurotap.runtime import registry

NEEDS_MODEL = True  # every test here runs the real model (see conftest.py)

gguf = pytest.importorskip("gguf")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        neurotap.load(str(tmp_path / "nope.gguf"))


def test_not_a_gguf_file(tmp_path):
    p = tmp_path / "notes.gguf"
    p.write_text("this is not a model\n" * 10)
    with pytest.raises(neurotap.ModelError, match="not a GGUF file"):
        neurotap.load(str(p))


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_gguf(tmp_path, model_path, keep):
    p = tmp_path / "truncated.gguf"
    with open(model_path, "rb") as src, open(p, "wb") as dst:
        size = src.seek(0, 2)
        src.seek(0)
        dst.write(src.read(int(size * keep)))
    with pytest.raises(neurotap.ModelError, match="truncated"):
        neurotap.load(str(p))


def test_truncated_header(tmp_path, model_path):
    p = tmp_path / "header.gguf"
    with open(model_path, "rb") as src:
        p.write_bytes(src.read(300))
    with pytest.raises(neurotap.ModelError, match="corrupt or truncated"):
        neurotap.load(str(p))


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model name 'gpt-17'.*smollm2-135m"):
        neurotap.load("gpt-17")


def test_unsupported_architecture(tmp_path):
    p = tmp_path / "bert.gguf"
    w = gguf.GGUFWriter(str(p), "bert")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(neurotap.ModelError, match="unsupported architecture 'bert'"):
        neurotap.load(str(p))


def test_model_package_missing_prints_pip_command(monkeypatch):
    models = dict(registry.known_models())
    models["ghost"] = {"description": "x", "package": "ghost-weights==1.0", "module": "ghost_weights_pkg",
                       "file": "ghost.gguf"}
    monkeypatch.setattr(registry, "known_models", lambda: models)
    with pytest.raises(neurotap.ModelNotInstalledError, match="pip install ghost-weights==1.0"):
        neurotap.load("ghost")


def test_prompt_longer_than_context(model):
    long = "word " * (model.n_ctx + 10)
    with pytest.raises(neurotap.ContextError, match="exceeds the context"):
        model.generate(long, max_tokens=4)


def test_prompt_plus_max_tokens_beyond_context(model):
    with pytest.raises(neurotap.ContextError, match="new tokens fit"):
        model.generate("Hello", max_tokens=model.n_ctx)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_max_tokens_must_be_positive(model, bad):
    with pytest.raises(ValueError, match="max_tokens"):
        model.generate("Hello", max_tokens=bad)


@pytest.mark.parametrize("kw,msg", [
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=0.7, top_p=0.0), "top_p"),
    (dict(temperature=0.7, top_p=1.5), "top_p"),
    (dict(temperature=0.7, top_k=-1), "top_k"),
    (dict(capture="int8"), "capture"),
    (dict(seed=-1), "seed"),
])
def test_impossible_sampling_parameters(model, kw, msg):
    with pytest.raises(ValueError, match=msg):
        model.generate("Hello", max_tokens=2, **kw)


def test_bad_prompts(model):
    with pytest.raises(ValueError, match="empty"):
        model.generate("", max_tokens=2)
    with pytest.raises(ValueError, match="out of range"):
        model.generate([model.info.n_vocab + 5], max_tokens=2)
    with pytest.raises(ValueError, match="role"):
        model.generate([{"content": "hi"}], max_tokens=2)


def test_model_still_works_after_errors(model):
    assert model.generate("Hello", max_tokens=3, temperature=0).n_tokens == 3


def test_impossible_context_size():
    with pytest.raises(ValueError, match="n_ctx"):
        neurotap.load("smollm2-135m", n_ctx=0)


def test_tensor_read_is_bounds_checked(model_path):
    from neurotap import _native

    rows = _native.read_tensor_rows(model_path, "blk.0.ffn_down.weight", 0, 2)
    assert rows.shape == (2, 1536)
    with pytest.raises(ValueError, match="out of range"):
        _native.read_tensor_rows(model_path, "blk.0.ffn_down.weight", 575, 5)
    with pytest.raises(neurotap.ModelError, match="not found"):
        _native.read_tensor_rows(model_path, "blk.99.ffn_down.weight", 0, 1)


def test_bad_device_settings(model_path):
    """llama.cpp itself clamps n_gpu_layers and quietly runs on the CPU where it has no GPU: both
    are refused by name (tests/test_device.py checks the same on a GPU build)."""
    with pytest.raises(ValueError, match="n_gpu_layers=32 but the model has 30 layers: give at most 31"):
        neurotap.load(model_path, n_gpu_layers=32)
    with pytest.raises(ValueError, match="n_gpu_layers must be -1"):
        neurotap.load(model_path, n_gpu_layers=-2)
    names = [d["name"] for d in neurotap.devices()]
    assert "CPU" in names
    with pytest.raises(neurotap.ModelError, match="no GPU device named 'NoSuchGPU0'.*CPU"):
        neurotap.load(model_path, n_gpu_layers=-1, device="NoSuchGPU0")
    with pytest.raises(neurotap.ModelError, match="no GPU device named 'CPU'"):
        neurotap.load(model_path, n_gpu_layers=-1, device="CPU")
    if not any(d["type"] in ("gpu", "igpu") for d in neurotap.devices()):
        with pytest.raises(neurotap.ModelError, match="asks for a GPU, but this llama.cpp build sees none"):
            neurotap.load(model_path, n_gpu_layers=1)
