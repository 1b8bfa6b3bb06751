"""Generation through the tap equals llama.cpp's own, and its neuron record is well formed."""
import numpy as np
import pytest

import neurotap
from conftest import CHAT, THREADS

NEEDS_MODEL = True  # every test here runs the real model (see conftest.py)

PROMPT = "The three primary colors are"


@pytest.fixture(scope="module")
def llm(model_path):
    # Flash attention on, as in neurotap's default: the two attention paths differ in the last
    # bits, enough to flip a near-tie in greedy decoding.
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path, n_ctx=512, n_threads=THREADS, verbose=False, flash_attn=True)


def _llama_cpp_greedy(llm, ids, n):
    out = []
    for tok in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
        if llm.token_eos() == tok or len(out) == n:
            break
        out.append(tok)
    return out


@pytest.mark.parametrize("prompt", [PROMPT, CHAT])
def test_greedy_tokens_equal_llama_cpp_python(model, llm, prompt):
    ids = model.prompt_tokens(prompt)
    ref = _llama_cpp_greedy(llm, ids, 32)
    g = model.generate(prompt, max_tokens=32, temperature=0)
    assert g.prompt_tokens == ids
    assert g.tokens == ref[: len(g.tokens)] and len(g.tokens) == len(ref)
    assert g.text == llm.detokenize(ref).decode("utf-8", errors="replace")


def test_greedy_tokens_equal_llama_cpp_python_without_flash_attention(model_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    plain = llama_cpp.Llama(model_path, n_ctx=256, n_threads=THREADS, verbose=False, flash_attn=False)
    m = neurotap.load(model_path, n_ctx=256, n_threads=THREADS, flash_attn=False)
    ids = m.prompt_tokens(PROMPT)
    assert m.generate(PROMPT, max_tokens=32, temperature=0).tokens == _llama_cpp_greedy(plain, ids, 32)


def test_plain_prompt_tokenizes_like_llama_cpp_python(model, llm):
    assert model.tokenize(PROMPT) == llm.tokenize(PROMPT.encode(), add_bos=True, special=True)


def test_tap_on_and_off_give_the_same_tokens(model):
    on = model.generate(CHAT, max_tokens=40, temperature=0, capture="float16")
    off = model.generate(CHAT, max_tokens=40, temperature=0, tap=False)
    assert on.tokens == off.tokens and on.text == off.text
    assert off.active_counts is None
    assert on.active_counts.shape == (on.n_tokens, model.info.n_layers)


def test_tapping_a_llama_cpp_model_shares_it(model, llm):
    tapped = neurotap.tap(llm, n_ctx=512)
    assert tapped.info.path == llm.model_path and tapped.info.n_layers == model.info.n_layers
    a = tapped.generate(CHAT, max_tokens=20, temperature=0, capture="float32")
    b = model.generate(CHAT, max_tokens=20, temperature=0, capture="float32")
    assert a.tokens == b.tokens
    np.testing.assert_allclose(a.activations, b.activations, rtol=1e-4, atol=1e-4)
    # the Llama still works beside the tap
    assert llm.create_completion(PROMPT, max_tokens=4, temperature=0)["choices"][0]["text"]


def test_same_seed_same_sample_different_seed_differs(model):
    kw = dict(max_tokens=24, temperature=1.0, top_k=0, top_p=1.0)
    a = model.generate(CHAT, seed=7, **kw)
    b = model.generate(CHAT, seed=7, **kw)
    assert a.tokens == b.tokens
    others = [model.generate(CHAT, seed=s, **kw).tokens for s in (8, 9, 10)]
    assert any(o != a.tokens for o in others)


def test_stop_string_ends_generation(model):
    full = model.generate(PROMPT, max_tokens=30, temperature=0)
    assert len(full.text) > 6
    stop = full.text[3:6]
    g = model.generate(PROMPT, max_tokens=30, temperature=0, stop=[stop])
    assert g.finish_reason == "stop"
    assert stop not in g.text and full.text.startswith(g.text)
    assert g.n_tokens < full.n_tokens


def test_finish_reasons_and_record_shapes(model):
    g = model.generate(CHAT, max_tokens=3, temperature=0)
    assert g.finish_reason == "length" and g.n_tokens == 3
    assert g.active_counts.dtype == np.int32 and g.activations is None
    assert (g.active_counts > 0).all() and (g.active_counts <= model.info.n_ff).all()
    long = model.generate(CHAT, max_tokens=200, temperature=0)
    assert long.finish_reason == "eos" and long.n_tokens < 200
    assert long.tokens_per_second > 0 and 0 < long.mean_active_per_token < model.info.total_neurons


def test_generations_do_not_leak_state(model):
    a = model.generate(PROMPT, max_tokens=10, temperature=0)
    model.generate(CHAT, max_tokens=10, temperature=0)
    b = model.generate(PROMPT, max_tokens=10, temperature=0)
    assert a.tokens == b.tokens


def test_gemma3_geglu_is_tapped(gemma):
    m = gemma
    assert m.info.architecture == "gemma3" and m.info.tapped_tensors[0] == "ffn_geglu-0"
    g = m.generate("The capital of France is", max_tokens=8, temperature=0, capture="float32")
    assert g.activations.shape == (g.n_tokens, m.info.n_layers, m.info.n_ff)
    np.testing.assert_array_equal(g.active_counts, (g.activations > 0).sum(-1))
    assert g.tokens == m.generate("The capital of France is", max_tokens=8, temperature=0, tap=False).tokens


def test_trace_reproduces_the_rows_of_a_generation(model):
    g = model.generate(CHAT, max_tokens=12, temperature=0, capture="float32")
    t = model.trace(CHAT, g.tokens)
    assert t.tokens == g.tokens and t.finish_reason == "length"
    np.testing.assert_array_equal(t.activations, g.activations)
    # an end-of-generation token can be traced too (its row is the one that decided to stop)
    eos = model.generate(CHAT, max_tokens=200, temperature=0)
    assert eos.finish_reason == "eos"
    eog_id = model.tokenize("<|im_end|>", add_special=False)[0]
    tt = model.trace(CHAT, eos.tokens + [eog_id])
    assert tt.n_tokens == eos.n_tokens + 1 and tt.activations.shape[0] == tt.n_tokens
