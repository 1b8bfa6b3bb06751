"""Chat prompts rendered with Jinja from the GGUF's template equal llama-cpp-python's
create_chat_completion prompts token for token; chat_template_kwargs reach the template; the
built-in renderer stays selectable; the GGUF metadata reader refuses malformed files cleanly."""
import struct
import subprocess
import sys

import pytest

import neurotap
from conftest import THREADS
from neurotap.apps.cli import main
from neurotap.runtime.chat import ChatTemplate, GGUFMetadataError, read_metadata

NEEDS_MODEL = True  # most tests here run the real model (see conftest.py)

MESSAGES = {
    "user": [{"role": "user", "content": "Name three colors."}],
    "system+user": [{"role": "system", "content": "You answer in one word."},
                    {"role": "user", "content": "What is the capital of France?"}],
    "multi-turn": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
                   {"role": "assistant", "content": "Hello! How can I help?"},
                   {"role": "user", "content": "What is 2 + 2? Ünïcödé ✓"}],
}

# A Qwen3-style template: thinking unless enable_thinking is false; writes bos_token so its text
# must be parsed back into the special token.
THINKING_TEMPLATE = (
    "{{ bos_token }}{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{%- else %}{{ '<think>\\n' }}{%- endif %}{%- endif %}")


def make_thinking_gguf(src: str, out) -> str:
    """A copy of the default model whose GGUF chat template is THINKING_TEMPLATE (gguf's own tool)."""
    tmpl = out.parent / "thinking.jinja"
    tmpl.write_text(THINKING_TEMPLATE)
    r = subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", src, str(out),
                        "--chat-template-file", str(tmpl), "--force"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return str(out)


@pytest.fixture(scope="module")
def thinking_path(model_path, tmp_path_factory):
    return make_thinking_gguf(model_path, tmp_path_factory.mktemp("thinking") / "smollm2-thinking.gguf")


class Captured(Exception):
    pass


def llama_cpp_prompt(llm, messages, template_kwargs=None):
    """The prompt tokens llama-cpp-python's create_chat_completion would decode: its completion
    call is intercepted. template_kwargs are passed as llama_cpp.server passes chat_template_kwargs."""
    seen = {}

    def intercept(*args, **kwargs):
        seen["prompt"] = kwargs["prompt"]
        raise Captured

    llm.create_completion = intercept
    handler = llm._chat_handlers[llm.chat_format]
    llm.chat_handler = (lambda *a, **k: handler(*a, **{**template_kwargs, **k})) if template_kwargs else None
    with pytest.raises(Captured):
        llm.create_chat_completion(messages=messages, max_tokens=1)
    return list(seen["prompt"])


def llama(path):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(path, n_ctx=256, n_threads=THREADS, verbose=False)


@pytest.fixture(scope="module")
def llm(model_path):
    return llama(model_path)


@pytest.mark.parametrize("name", MESSAGES)
def test_jinja_prompt_equals_llama_cpp_python(model, llm, name):
    assert model.chat_template == "jinja"  # the default
    assert llm.chat_format == "chat_template.default"  # llama-cpp-python renders the GGUF's Jinja template too
    ours = model.prompt_tokens(MESSAGES[name])
    assert ours == llama_cpp_prompt(llm, MESSAGES[name])
    (start,) = model.tokenize("<|im_start|>", add_special=False)  # special tokens parsed, not spelled out
    assert ours[0] == start and ours.count(start) == model.apply_chat_template(MESSAGES[name]).count("<|im_start|>")


def test_builtin_renderer_stays_selectable(model, model_path):
    msgs = MESSAGES["user"]
    jinja = model.apply_chat_template(msgs)
    builtin = model.apply_chat_template(msgs, chat_template="builtin")
    assert builtin == model._native.apply_chat_template([("user", "Name three colors.")], True)
    # SmolLM2's template adds a default system prompt that llama.cpp's built-in chatml does not.
    assert "You are a helpful AI assistant named SmolLM" in jinja and "SmolLM" not in builtin
    m = neurotap.load(model_path, n_ctx=256, n_threads=THREADS, chat_template="builtin")
    assert m.chat_template == "builtin"
    assert m.prompt_tokens(msgs) == model.tokenize(builtin, add_special=False)
    assert m.generate(msgs, max_tokens=4, temperature=0).prompt_tokens == m.prompt_tokens(msgs)
    assert model.generate(msgs, max_tokens=4, temperature=0).prompt_tokens == model.prompt_tokens(msgs)
    with pytest.raises(ValueError, match="chat_template must be one of"):
        neurotap.load(model_path, n_ctx=256, chat_template="chatml")
    with pytest.raises(ValueError, match="need the Jinja renderer"):
        model.apply_chat_template(msgs, chat_template="builtin", chat_template_kwargs={"x": 1})
    with pytest.raises(ValueError, match="'role' and 'content'"):
        model.apply_chat_template([{"content": "no role"}])


def test_chat_template_kwargs_reach_the_template(thinking_path):
    m = neurotap.load(thinking_path, n_ctx=256, n_threads=THREADS)
    ref = llama(thinking_path)
    msgs = MESSAGES["system+user"]
    on = m.apply_chat_template(msgs)
    off = m.apply_chat_template(msgs, chat_template_kwargs={"enable_thinking": False})
    assert on.startswith("<|im_start|><|im_start|>system") and on.endswith("assistant\n<think>\n")
    assert off.endswith("assistant\n<think>\n\n</think>\n\n")
    for kwargs in ({}, {"enable_thinking": False}, {"enable_thinking": True}):
        assert m.prompt_tokens(msgs, chat_template_kwargs=kwargs) == llama_cpp_prompt(ref, msgs, kwargs), kwargs
    # Model-wide kwargs (neurotap.load(..., chat_template_kwargs=)), overridden per call.
    m.chat_template_kwargs = {"enable_thinking": False}
    assert m.apply_chat_template(msgs) == off
    assert m.apply_chat_template(msgs, chat_template_kwargs={"enable_thinking": True}) == on
    with pytest.raises(ValueError, match="may not set messages"):
        m.apply_chat_template(msgs, chat_template_kwargs={"messages": []})


@pytest.mark.parametrize("mode", ["jinja", "builtin"])
def test_cli_chat_template_flag(model, model_path, capsys, mode):
    assert main(["generate", "Hi", "-m", model_path, "-n", "1", "--threads", str(THREADS), "--ctx", "256",
                 "--chat-template", mode]) == 0
    n = len(model.prompt_tokens([{"role": "user", "content": "Hi"}], chat_template=mode))
    assert f"prompt {n} tok" in capsys.readouterr().out


def test_metadata_reader_reads_what_llama_cpp_reads(model, llm, model_path):
    meta = read_metadata(model_path, ["tokenizer.chat_template", "tokenizer.ggml.eos_token_id", "general.architecture"])
    assert meta["tokenizer.chat_template"] == llm.metadata["tokenizer.chat_template"]
    assert meta["general.architecture"] == "llama"
    tmpl = model._jinja_template()
    assert tmpl.bos_token == llm._model.token_get_text(llm.token_bos())
    assert tmpl.eos_token == llm._model.token_get_text(llm.token_eos())


def _gguf(kv):
    """A GGUF v3 header with no tensors and the given (key, type, packed value) entries."""
    out = b"GGUF" + struct.pack("<IQQ", 3, 0, len(kv))
    for key, vtype, packed in kv:
        k = key.encode()
        out += struct.pack("<Q", len(k)) + k + struct.pack("<I", vtype) + packed
    return out


def _s(text):
    b = text.encode()
    return struct.pack("<Q", len(b)) + b


def test_metadata_reader_refuses_malformed_files(tmp_path):
    strings = struct.pack("<IQ", 8, 2) + _s("a") + _s("bc")
    good = _gguf([("general.architecture", 8, _s("llama")), ("tokenizer.ggml.tokens", 9, strings),
                  ("tokenizer.ggml.scores", 9, struct.pack("<IQ", 6, 2) + struct.pack("<2f", 0.5, 1.5)),
                  ("tokenizer.ggml.bos_token_id", 4, struct.pack("<I", 7)),
                  ("tokenizer.chat_template", 8, _s("{{ messages[0]['content'] }}"))])
    p = tmp_path / "m.gguf"
    p.write_bytes(good)
    keys = ["tokenizer.chat_template", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.tokens"]
    assert read_metadata(str(p), keys) == {"tokenizer.chat_template": "{{ messages[0]['content'] }}",
                                           "tokenizer.ggml.bos_token_id": 7}  # arrays are skipped
    for cut in range(len(good) - 1):  # every truncation fails cleanly
        p.write_bytes(good[:cut])
        with pytest.raises(GGUFMetadataError):
            read_metadata(str(p), keys + ["missing"])
    bad = {
        "magic": b"GGUX" + good[4:],
        "version": good[:4] + struct.pack("<I", 9) + good[8:],
        "key count": good[:16] + struct.pack("<Q", 2**40) + good[24:],
        "string length": _gguf([("k", 8, struct.pack("<Q", 2**62) + b"x" * 8)]),
        "array length": _gguf([("k", 9, struct.pack("<IQ", 8, 2**60) + b"\0" * 32)]),
        "value type": _gguf([("k", 99, b"\0" * 16)]),
        "utf-8": _gguf([("tokenizer.chat_template", 8, struct.pack("<Q", 2) + b"\xff\xfe")]),
    }
    for what, data in bad.items():
        p.write_bytes(data)
        with pytest.raises(GGUFMetadataError):
            read_metadata(str(p), ["tokenizer.chat_template", "k"])
    # Big-endian files (gguf's convert-endian tool) are read too.
    p.write_bytes(b"GGUF" + struct.pack(">IQQ", 3, 0, 1) + struct.pack(">Q", 1) + b"k" + struct.pack(">I", 4)
                  + struct.pack(">I", 5))
    assert read_metadata(str(p), ["k"]) == {"k": 5}


def test_template_errors_are_value_errors():
    with pytest.raises(ValueError, match="does not compile"):
        ChatTemplate("{% for %}")
    t = ChatTemplate("{{ raise_exception('only user turns') }}")
    with pytest.raises(ValueError, match="only user turns"):
        t.render([{"role": "user", "content": "x"}])
    t = ChatTemplate("{{ messages | tojson }}{% generation %}G{% endgeneration %}{{ strftime_now('%Y')|length }}")
    assert t.render([{"role": "user", "content": "é"}]) == '[{"role": "user", "content": "é"}]G4'


def test_rank_models_loads_its_variants_with_the_chosen_renderer(model_path, tmp_path, monkeypatch):
    """rank-models loads each variant itself: --chat-template reaches those loads, and only them."""
    from neurotap.apps import rank
    from neurotap.runtime import model as runtime_model

    seen = []
    real_load = rank.load

    def recording_load(path, **kw):
        m = real_load(path, **kw)
        seen.append(m.chat_template)
        return m

    monkeypatch.setattr(rank, "load", recording_load)
    args = ["rank-models", model_path, model_path, "--tasks", "arith", "--limit", "1", "-n", "2",
            "--max-tokens", "4", "--threads", str(THREADS), "--quiet", "--out", str(tmp_path / "r.json")]
    assert main(args + ["--chat-template", "builtin"]) == 0
    assert main(args) == 0
    assert seen == ["builtin", "builtin", "jinja", "jinja"]
    assert runtime_model.DEFAULT_CHAT_TEMPLATE == "jinja"


def llama_cpp_builtin(template_name, messages):
    """llama.cpp's own renderer for a named template family (llama_chat_apply_template)."""
    import ctypes

    llama_cpp = pytest.importorskip("llama_cpp")
    chat = (llama_cpp.llama_chat_message * len(messages))(
        *[llama_cpp.llama_chat_message(role=m["role"].encode(), content=m["content"].encode()) for m in messages])
    buf = ctypes.create_string_buffer(8192)
    n = llama_cpp.llama_chat_apply_template(template_name, chat, len(messages), True, buf, len(buf))
    assert 0 < n <= len(buf)
    return buf.raw[:n].decode("utf-8")


@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_gemma_without_a_file_template_gets_the_registry_template(gemma, name):
    # The GGUF has no tokenizer.chat_template (llama-cpp-python would fall back to llama-2's format):
    # the registry's Gemma 3 template writes what llama.cpp's built-in 'gemma' template writes, after the BOS.
    assert not gemma.info.has_chat_template
    text = gemma.apply_chat_template(MESSAGES[name])
    assert text == "<bos>" + llama_cpp_builtin(b"gemma", MESSAGES[name])
    ids = gemma.prompt_tokens(MESSAGES[name])
    assert ids[0] == gemma.tokenize("", add_special=True)[0]  # the BOS, once
    assert ids.count(ids[0]) == 1


def test_gemma_generates_from_chat_messages(gemma):
    # The shipped file is the pretrained (not instruction-tuned) 270M: it continues rather than
    # answers, so what is checked is that chat messages work at all (they raised before).
    g = gemma.generate(MESSAGES["multi-turn"], max_tokens=12, temperature=0)
    assert g.n_tokens > 0 and g.text.strip()
    assert g.tokens == gemma.generate(gemma.prompt_tokens(MESSAGES["multi-turn"]), max_tokens=12, temperature=0).tokens
