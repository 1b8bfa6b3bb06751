"""`neurotap serve` through the official openai client, against a server this test starts as a
subprocess on 127.0.0.1: chat, n samples in one batch, NAD, NEAT, streaming, reasoning content and
budget, bad requests, a disconnect that cancels its run, a burst of concurrent requests and a
full queue. Answers are compared with the same runs made in this process."""
import json
import os
import socket
import subprocess
import sys
import threading
import time

from pathlib import Path

import urllib.error
import urllib.request

import numpy as np
import pytest

import neurotap
from conftest import THREADS
from neurotap import nad, neat
from neurotap.apps.server import split_reasoning
from neurotap.core.resources import shipped_file
from test_chat_template import make_thinking_gguf

NEEDS_MODEL = True  # every test here runs the real model (see conftest.py)
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("sse_starlette")

MSGS = [{"role": "user", "content": "Name three colors."}]
SAMPLING = dict(temperature=0.8, top_p=0.95, top_k=40, min_p=0.05)  # the server's defaults
MAX_QUEUE = 4


def http(url, body=None):
    """(status, headers, JSON) of a GET, or of a POST of `body` (bytes or a JSON-able object)."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_path, *extra, env=None):
    port = free_port()
    cmd = [sys.executable, "-m", "neurotap", "serve", model_path, "--port", str(port), "--threads", "2",
           "--ctx", "2048", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**{k: v for k, v in os.environ.items() if k != "NEUROTAP_API_KEY"},  # no key
                                 "OMP_WAIT_POLICY": "passive", **(env or {})})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited ({proc.returncode}):\n{proc.stdout.read()}")
        try:
            if http(url + "/health")[0] == 200:
                return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    pytest.fail("the server did not answer /health within 120 s")


def stop_server(proc):
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def server(model_path):
    # One slot: requests decode one at a time (the queue and the hand-off as without batching);
    # tests/test_server_batch.py runs a batch of four.
    proc, url = start_server(model_path, "--parallel", "1", "--max-queue", str(MAX_QUEUE), "--neat",
                             f"shipped={shipped_file('neat-smollm2-135m.json')}")
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=300)


def health(url):
    return http(url + "/health")[2]


def ext(resp):
    return resp.to_dict()["neurotap"]


def test_models_and_health(client, server, model):
    (m,) = client.models.list().data
    assert m.id == Path(model.info.path).name  # served by path: the file's name
    h = health(server)
    assert h["status"] == "ok" and h["max_queue"] == MAX_QUEUE and h["running"] is None


def test_chat_equals_the_engine(client, model):
    r = client.chat.completions.create(model="m", messages=MSGS, max_tokens=24, temperature=0)
    (ref,) = model.sample(MSGS, n=1, max_tokens=24, temperature=0, reducers=(), tap=False)
    assert r.choices[0].message.content == ref.text
    assert r.choices[0].finish_reason == {"eos": "stop", "length": "length"}[ref.finish_reason]
    assert r.usage.prompt_tokens == len(model.prompt_tokens(MSGS))  # the Jinja template, as llama-cpp-python
    assert r.usage.completion_tokens == nad.sampled_tokens(ref)


def test_n_samples_decode_as_one_batch(client, model):
    r = client.chat.completions.create(model="m", messages=MSGS, max_tokens=16, n=4, seed=7,
                                       extra_body={"top_k": 40, "min_p": 0.05}, temperature=0.8, top_p=0.95)
    with model.start_sampling(MSGS, n=4, max_tokens=16, seed=7, reducers=(), tap=False, **SAMPLING) as run:
        run.advance()
        ref = run.samples()
        spent = run.tokens_sampled
    assert [c.message.content for c in r.choices] == [s.text for s in ref]
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert len({s.text for s in ref}) > 1  # per-sample seeds: not four copies of one answer
    assert r.usage.completion_tokens == spent  # every token of every sample


def test_nad_returns_the_pick_with_every_candidate(client, model):
    spec = {"n": 4, "method": "knn", "early_stop": 8}
    r = client.chat.completions.create(model="m", messages=MSGS, max_tokens=24, seed=3,
                                       extra_body={"nad": spec, "top_k": 40, "min_p": 0.05}, temperature=0.8,
                                       top_p=0.95)
    best = nad.best_of_n(model, MSGS, n=4, method="knn", early_stop=8, max_tokens=24, seed=3, **SAMPLING)
    e = ext(r)["nad"]
    assert r.choices[0].message.content == best.text and len(r.choices) == 1
    assert e["pick"] == best.index and e["method"] == "knn" and e["early_stop"] == 8
    assert r.usage.completion_tokens == best.tokens_generated  # the losers' 8 tokens each included
    assert [c["text"] for c in e["candidates"]] == [c.text for c in best.candidates]
    assert [c["activated_neurons"] for c in e["candidates"]] == list(nad.set_sizes(best.candidates, 8))
    assert np.allclose(e["similarity"], best.similarity, atol=1e-6)


def test_nad_hands_the_winner_off_and_frees_the_losers(client, server, model):
    # The server's race is best_of_n's: the same pick, text and tokens...
    spec = {"n": 4, "method": "minact", "early_stop": 8}
    r = client.chat.completions.create(model="m", messages=MSGS, max_tokens=40, seed=11,
                                       extra_body={"nad": spec, "top_k": 40, "min_p": 0.05}, temperature=0.8,
                                       top_p=0.95)
    best = nad.best_of_n(model, MSGS, n=4, method="minact", early_stop=8, max_tokens=40, seed=11, **SAMPLING)
    assert best.sample.n_tokens > 8  # live at the decision: handed off
    assert ext(r)["nad"]["pick"] == best.index and r.choices[0].message.content == best.text
    assert r.usage.completion_tokens == best.tokens_generated
    # ... and what stays held after it is the winner's context of one sequence: the race's four
    # sequences' cells were freed at the decision (kept, they would be 4 x 256 cells).
    cells = (len(model.prompt_tokens(MSGS)) + 40 + 255) // 256 * 256
    assert health(server)["memory"]["kv"] == cells * model.info.kv_bytes_per_cell


def test_neat_default_and_named(client, model):
    cal = neat.load_calibration("default", model)
    (ref,) = model.sample(MSGS, n=1, max_tokens=48, temperature=0, reducers=(), neat=cal)
    for name in ("default", "shipped"):
        r = client.chat.completions.create(model="m", messages=MSGS, max_tokens=48, temperature=0,
                                           extra_body={"neat": name})
        assert r.choices[0].message.content == ref.text
        n = ext(r)["neat"]
        assert n["calibration"] == name
        assert n["samples"][0]["decisions"] == len(ref.neat_events) and n["samples"][0]["exit_at"] == ref.neat_exit_at
    assert ref.neat_events  # NEAT looked at this answer: the comparison says something
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=MSGS, max_tokens=4, extra_body={"neat": "nope"})
    assert e.value.body["param"] == "neat" and "shipped" in e.value.body["message"]


def test_streaming_equals_the_whole_answer(client):
    kw = dict(model="m", messages=[{"role": "user", "content": "Write a short poem about the sea."}],
              max_tokens=40, temperature=0, logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens and not chunks[-1].choices
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in whole.choices[0].logprobs.content]
    assert all(len(t.top_logprobs) == 2 for t in streamed)
    # A stop string is never streamed, not even its first characters.
    stop = whole.choices[0].message.content[10:14]
    kw.update(stop=[stop])
    cut = client.chat.completions.create(**kw).choices[0].message.content
    assert stop not in cut
    assert "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stream=True)
                   if c.choices) == cut


def test_completions_logprobs(client, model):
    r = client.completions.create(model="m", prompt="The capital of France is", max_tokens=6, temperature=0,
                                  logprobs=3)
    (ref,) = model.sample("The capital of France is", n=1, max_tokens=6, temperature=0, reducers=(), tap=False,
                          logprobs=3)
    c = r.choices[0]
    assert c.text == ref.text
    assert c.logprobs.token_logprobs == pytest.approx([float(x) for x in ref.token_logprob])
    assert "".join(c.logprobs.tokens) == ref.text and c.logprobs.text_offset[0] == 0
    assert all(len(t) <= 3 for t in c.logprobs.top_logprobs)


def test_bad_requests_get_openai_errors(client, server):
    cases = [
        (dict(messages=[]), "messages"),
        (dict(messages=MSGS, temperature=5), "temperature"),
        (dict(messages=MSGS, logit_bias={"49152": 5}), "logit_bias"),  # n=2 with stream is served (test_server_door)
        (dict(messages=MSGS, max_tokens=10**6), "max_tokens"),
        (dict(messages=MSGS, extra_body={"nad": {"n": 4, "method": "bogus"}}), "nad.method"),
        (dict(messages=MSGS, extra_body={"nad": {"n": 4, "early_stop": 64}}, max_tokens=32), "nad"),
        (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
         "messages[0].content"),
    ]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            kw = {"model": "m", "max_tokens": 4, **kwargs}
            if kw.get("stream"):
                list(client.chat.completions.create(**kw))
            else:
                client.chat.completions.create(**kw)
        body = e.value.body
        assert body["param"] == param and body["type"] == "invalid_request_error" and body["message"], kwargs
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=MSGS, max_tokens=10**6)
    assert e.value.body["code"] == "context_length_exceeded"
    status, _, raw = http(server + "/v1/chat/completions", b"{not json")
    assert status == 400 and set(raw["error"]) == {"message", "type", "param", "code"}
    assert http(server + "/v1/nothing")[2]["error"]["code"] == "not_found"
    assert health(server)["running"] is None  # nothing reached the engine


def _wait(url, cond, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = health(url)
        if cond(h):
            return h
        time.sleep(0.05)
    pytest.fail(f"server state not reached: {health(url)}")


def test_disconnect_cancels_the_run(client, server):
    before = health(server)["cancelled"]
    stream = client.chat.completions.create(model="m", messages=MSGS, max_tokens=1500, temperature=0.8, stream=True,
                                            extra_body={"ignore_eos": True})
    got = 0
    for c in stream:
        got += bool(c.choices and c.choices[0].delta.content)
        if got == 3:
            break
    stream.close()
    h = _wait(server, lambda h: h["cancelled"] == before + 1 and h["running"] is None)
    assert 3 <= h["last_cancelled"]["tokens_sampled"] < 1500  # the native run stopped early
    r = client.chat.completions.create(model="m", messages=MSGS, max_tokens=4, temperature=0)
    assert r.choices[0].message.content  # the server goes on


def test_burst_completes_and_a_full_queue_answers_503(client, server):
    prompts = [f"Count from {i} to {i + 5}." for i in range(MAX_QUEUE)]

    def ask(p):
        return client.chat.completions.create(model="m", messages=[{"role": "user", "content": p}], max_tokens=12,
                                              temperature=0.7, seed=5).choices[0].message.content

    alone = [ask(p) for p in prompts]
    results = [None] * len(prompts)

    def burst():
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, ask(prompts[i])))
                   for i in range(len(prompts))]
        for t in threads:
            t.start()
        return threads

    for t in burst():  # as many at once as the queue holds: none may be refused
        t.join()
    assert results == alone  # every answer back, each to its own request

    # One long request runs, MAX_QUEUE wait: the next one is refused with 503.
    long = client.chat.completions.create(model="m", messages=MSGS, max_tokens=1500, stream=True,
                                          extra_body={"ignore_eos": True})
    next(iter(long))
    results = [None] * len(prompts)
    threads = burst()
    _wait(server, lambda h: h["waiting"] == MAX_QUEUE)
    status, headers, body = http(server + "/v1/chat/completions", {"messages": MSGS, "max_tokens": 4})
    assert status == 503 and body["error"]["code"] == "queue_full" and headers["retry-after"] == "1"
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="m", messages=MSGS, max_tokens=4)
    long.close()
    for t in threads:
        t.join()
    assert results == alone
    h = health(server)
    assert h["rejected"] >= 2 and h["waiting"] == 0


def test_split_reasoning():
    assert split_reasoning("plain answer", False) == (None, "plain answer")
    assert split_reasoning("<think>\nhmm\n</think>\n\nYes.", False) == ("hmm\n", "Yes.")
    assert split_reasoning("hmm</think>Yes.", True) == ("hmm", "Yes.")
    assert split_reasoning("still thinking", True) == ("still thinking", "")


@pytest.fixture(scope="module")
def thinking_server(model_path, tmp_path_factory):
    path = make_thinking_gguf(model_path, tmp_path_factory.mktemp("think") / "smollm2-thinking.gguf")
    proc, url = start_server(path)
    yield url, path
    stop_server(proc)


def test_reasoning_content_and_budget(thinking_server):
    url, path = thinking_server
    c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
    kw = dict(model="m", messages=MSGS, max_tokens=40, temperature=0)
    free = c.chat.completions.create(**kw).to_dict()
    msg = free["choices"][0]["message"]
    assert msg["reasoning_content"] and msg["content"] == ""  # SmolLM2 never closes the block the template opened
    budget = c.chat.completions.create(**kw, extra_body={"reasoning_budget": 8}).to_dict()
    m = budget["choices"][0]["message"]
    assert budget["neurotap"]["reasoning_budget"] == {"forced_after": 8}
    assert free["choices"][0]["message"]["reasoning_content"].startswith(m["reasoning_content"].rstrip())
    assert m["content"] and budget["usage"]["completion_tokens"] <= 40 + 1
    streamed = list(c.chat.completions.create(**kw, stream=True, extra_body={"reasoning_budget": 8}))
    deltas = [ch.to_dict()["choices"][0]["delta"] for ch in streamed if ch.choices]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == m["reasoning_content"]
    assert "".join(d.get("content") or "" for d in deltas) == m["content"]
    # chat_template_kwargs reach the template: no thinking block, no reasoning_content.
    off = c.chat.completions.create(**kw, extra_body={"chat_template_kwargs": {"enable_thinking": False}}).to_dict()
    assert "reasoning_content" not in off["choices"][0]["message"] and off["choices"][0]["message"]["content"]
    local = neurotap.load(path, n_ctx=256, n_threads=THREADS)
    no_think = local.prompt_tokens(MSGS, chat_template_kwargs={"enable_thinking": False})
    assert off["usage"]["prompt_tokens"] == len(no_think)
    assert free["usage"]["prompt_tokens"] == len(local.prompt_tokens(MSGS))


def test_server_refuses_bad_start(model_path):
    r = subprocess.run([sys.executable, "-m", "neurotap", "serve", model_path, "--neat", "x=/no/such.json",
                        "--port", str(free_port())], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "/no/such.json" in r.stderr


def test_every_finish_reason_maps_to_openai():
    from neurotap import _native
    from neurotap.apps.server import FINISH
    from neurotap.runtime.sampling import FINISH_REASONS

    # The runtime's list (and the native module's, once it exposes one) is exactly what the map covers.
    reasons = set(FINISH_REASONS) | set(getattr(_native, "FINISH_REASONS", ()))
    assert set(FINISH) == reasons
    assert set(FINISH.values()) <= {"stop", "length"}  # OpenAI's, for what a plain generation can end with
    assert FINISH["length"] == "length" and FINISH["neureasoner_exit"] == FINISH["neat_exit"] == "stop"


def test_server_module_runs_as_the_serve_command():
    r = subprocess.run([sys.executable, "-m", "neurotap.apps.server", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "usage: neurotap serve" in r.stdout and "--max-queue" in r.stdout


def test_streamed_multibyte_text_equals_the_whole_answer(client):
    """Japanese text: tokens end inside UTF-8 characters, and a stream sends only whole ones (it
    once decoded each step's bytes with replacement characters and then sliced at wrong offsets)."""
    kw = dict(model="m", messages=[{"role": "user", "content": "Write in Japanese."}], max_tokens=24,
              temperature=SAMPLING["temperature"], top_p=SAMPLING["top_p"],
              extra_body={"top_k": SAMPLING["top_k"], "min_p": SAMPLING["min_p"]})
    for seed in (9, 10):
        whole = client.chat.completions.create(**kw, seed=seed).choices[0].message.content
        assert sum(ord(ch) > 127 for ch in whole) > 5 and "\ufffd" not in whole, whole  # the test can tell
        for extra in ({}, {"logprobs": True, "top_logprobs": 1}):  # a text view, or whole samples
            chunks = list(client.chat.completions.create(**kw, seed=seed, stream=True, **extra))
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole, extra
    two = client.chat.completions.create(**kw, seed=9, n=2)
    texts = ["", ""]
    for c in client.chat.completions.create(**kw, seed=9, n=2, stream=True):
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
    assert texts == [c.message.content for c in sorted(two.choices, key=lambda c: c.index)]


def test_nad_streams_the_winner_from_the_decision(client):
    spec = {"n": 4, "method": "minact", "early_stop": 8}
    kw = dict(model="m", messages=MSGS, max_tokens=40, seed=11, temperature=0.8, top_p=0.95,
              extra_body={"nad": spec, "top_k": 40, "min_p": 0.05})
    whole = client.chat.completions.create(**kw)
    chunks = [c for c in client.chat.completions.create(**kw, stream=True) if c.choices]
    pieces = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert "".join(pieces) == whole.choices[0].message.content
    assert len(pieces) > 2  # the winner's first 8 tokens at the decision, then token by token
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
