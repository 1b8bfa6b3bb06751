"""`neurotap serve`'s door, through the official openai client against a real server subprocess:
streaming with n > 1 (OpenAI's indexed choices) and with NAD (every candidate's figures in the
last chunk), NeuReasoner as a request option, logit_bias, echo, an API key, /metrics, and bodies
that cannot be decoded (each a 4xx in OpenAI's format, never a 500)."""
import json
import re
import threading
import time
import urllib.error
import urllib.request

import pytest

from neurotap import nad
from neurotap.methods import neureasoner as nr
from test_neureasoner import PROMPT, always, calibration
from test_server import MSGS, SAMPLING, start_server, stop_server

NEEDS_MODEL = True
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("sse_starlette")

KEY = "door-test-key"


def http(url, body=None, key=KEY, raw=False):
    """(status, headers, body) of a GET, or of a POST of `body` (bytes or a JSON-able object)."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    headers = {"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            got = r.read()
            return r.status, dict(r.headers), got.decode() if raw else json.loads(got)
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def exit_calibration(model):
    return calibration(model, instance=always([11], "exit"))


def resample_calibration(model):
    return calibration(model, intra=always([5, model.info.n_ff + 2], "resample"))


@pytest.fixture(scope="module")
def door(model, model_path, tmp_path_factory):
    d = tmp_path_factory.mktemp("door")
    nr.save_calibration(exit_calibration(model), d / "exit.json")
    nr.save_calibration(resample_calibration(model), d / "resample.json")
    proc, url = start_server(model_path, "--api-key", KEY, "--neureasoner", f"exit={d / 'exit.json'}",
                             "--neureasoner", f"resample={d / 'resample.json'}")
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def client(door):
    return openai.OpenAI(base_url=door + "/v1", api_key=KEY, max_retries=0, timeout=300)


def by_index(chunks, n):
    """Each choice's streamed text and finish reason, from chunks of indexed choices."""
    text, finish = [""] * n, [None] * n
    for c in chunks:
        for ch in c.choices:
            piece = ch.delta.content if hasattr(ch, "delta") else ch.text
            text[ch.index] += piece or ""
            if ch.finish_reason is not None:
                assert finish[ch.index] is None  # one finish per choice
                finish[ch.index] = ch.finish_reason
    return text, finish


def test_stream_n2_chat_equals_the_whole_answer(client):
    kw = dict(model="m", messages=MSGS, max_tokens=24, n=2, seed=5, temperature=0.8)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text, finish = by_index([c for c in chunks if c.choices], 2)
    assert text == [c.message.content for c in whole.choices]
    assert text[0] != text[1]  # two samples, not one answer twice
    assert finish == [c.finish_reason for c in whole.choices]
    assert {ch.index for c in chunks for ch in c.choices} == {0, 1}
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].to_dict()["neurotap"]["finish_reasons"] == whole.to_dict()["neurotap"]["finish_reasons"]


def test_stream_n3_completions(client):
    kw = dict(model="m", prompt="Once upon a time", max_tokens=16, n=3, seed=2, temperature=0.9)
    whole = client.completions.create(**kw)
    text, finish = by_index(list(client.completions.create(**kw, stream=True)), 3)
    assert text == [c.text for c in whole.choices] and finish == [c.finish_reason for c in whole.choices]


def test_nad_stream_ends_with_every_candidate(client, model):
    spec = {"n": 4, "method": "knn", "early_stop": 8}
    kw = dict(model="m", messages=MSGS, max_tokens=32, seed=3, temperature=0.8, top_p=0.95,
              extra_body={"nad": spec, "top_k": 40, "min_p": 0.05})
    chunks = list(client.chat.completions.create(**kw, stream=True))
    best = nad.best_of_n(model, MSGS, n=4, method="knn", early_stop=8, max_tokens=32, seed=3, **SAMPLING)
    text, finish = by_index(chunks, 1)
    assert text[0] == best.text and finish[0] is not None
    e = chunks[-1].to_dict()["neurotap"]["nad"]  # the last chunk: the decision's figures
    assert e["pick"] == best.index and [c["text"] for c in e["candidates"]] == [c.text for c in best.candidates]
    assert [c["activated_neurons"] for c in e["candidates"]] == list(nad.set_sizes(best.candidates, 8))
    assert all("neurotap" not in c.to_dict() for c in chunks[:-1])


def test_neureasoner_exit_as_a_request_option(client, model):
    cal = exit_calibration(model)
    (ref,) = model.sample(PROMPT, n=1, max_tokens=120, temperature=0, reducers=(), neureasoner=cal)
    assert ref.finish_reason == "neureasoner_exit"
    r = client.chat.completions.create(model="m", messages=PROMPT, max_tokens=120, temperature=0,
                                       extra_body={"neureasoner": "exit"})
    assert r.choices[0].message.content == ref.text and nr.FINISHED_THINKING in ref.text
    e = r.to_dict()["neurotap"]
    assert e["finish_reasons"] == ["neureasoner_exit"] and r.choices[0].finish_reason == "stop"
    s = e["neureasoner"]
    assert s["calibration"] == "exit" and s["samples"][0]["exit_at"] == ref.neureasoner_exit_at
    assert [(x["token"], x["level"], x["action"]) for x in s["samples"][0]["events"]] == \
        [(x.token, x.level_name, x.action_name) for x in ref.neureasoner_events]
    # Detect only: the same detector, overridden per request, records and leaves the answer alone.
    quiet = client.chat.completions.create(model="m", messages=PROMPT, max_tokens=40, temperature=0,
                                           extra_body={"neureasoner": {"calibration": "exit",
                                                                       "actions": {"instance": "none"}}})
    plain = client.chat.completions.create(model="m", messages=PROMPT, max_tokens=40, temperature=0)
    assert quiet.choices[0].message.content == plain.choices[0].message.content
    ev = quiet.to_dict()["neurotap"]["neureasoner"]["samples"][0]["events"]
    assert ev and all(x["action"] == "none" for x in ev)


def test_neureasoner_rollbacks_stream_whole_lines(client, model):
    cal = resample_calibration(model)
    kw = dict(model="m", messages=PROMPT, max_tokens=60, temperature=0.8, seed=11,
              extra_body={"neureasoner": "resample", "top_k": 40, "min_p": 0.05})
    (ref,) = model.sample(PROMPT, n=1, max_tokens=60, seed=11, reducers=(), neureasoner=cal, **SAMPLING)
    assert sum(e.rollback_to >= 0 for e in ref.neureasoner_events) == 3  # it did roll back
    whole = client.chat.completions.create(**kw)
    assert whole.choices[0].message.content == ref.text
    text, _ = by_index(list(client.chat.completions.create(**kw, stream=True)), 1)
    assert text[0] == ref.text  # nothing streamed was taken back
    with pytest.raises(openai.BadRequestError) as e:
        list(client.chat.completions.create(**kw, stream=True, logprobs=True))
    assert e.value.body["param"] == "neureasoner"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=MSGS, max_tokens=4, extra_body={"neureasoner": "nope"})
    assert e.value.body["param"] == "neureasoner" and "exit" in e.value.body["message"]


def test_logit_bias_bans_and_forces(client, model):
    kw = dict(model="m", prompt="The sky is", max_tokens=6, temperature=0)
    plain = client.completions.create(**kw).choices[0].text
    first = model.tokenize(plain, add_special=False)[0]
    banned = client.completions.create(**kw, logit_bias={str(first): -100}).choices[0].text
    assert model.tokenize(banned, add_special=False)[0] != first
    (ref,) = model.sample("The sky is", n=1, max_tokens=6, temperature=0, reducers=(), tap=False,
                          logit_bias={first: -100})
    assert banned == ref.text
    blue = model.tokenize(" blue", add_special=False)
    assert len(blue) == 1
    forced = client.completions.create(**kw, logit_bias={str(blue[0]): 100}).choices[0].text
    assert forced == " blue" * 6
    chat = client.chat.completions.create(model="m", messages=MSGS, max_tokens=4, temperature=0.8, seed=1,
                                          logit_bias={str(blue[0]): 100})
    assert chat.choices[0].message.content == " blue" * 4
    for bad in ({"-1": 1}, {"abc": 1}, {str(model.info.n_vocab): 1}, {"5": 101}, {"5": "x"}, [1]):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(**kw, logit_bias=bad)
        assert e.value.body["param"] == "logit_bias"


def test_logit_bias_in_the_python_api(model):
    plain = model.generate("The sky is", max_tokens=4, temperature=0)
    g = model.generate("The sky is", max_tokens=4, temperature=0, logit_bias={plain.tokens[0]: -100})
    assert g.tokens[0] != plain.tokens[0]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.generate("The sky is", max_tokens=2, logit_bias={model.info.n_vocab: 1.0})
    with pytest.raises(ValueError, match="logit_bias"):
        model.sample("The sky is", n=2, max_tokens=2, logit_bias={5: float("nan")})


def test_echo(client, model):
    kw = dict(model="m", prompt="The capital of France is", max_tokens=5, temperature=0)
    plain = client.completions.create(**kw).choices[0]
    echoed = client.completions.create(**kw, echo=True).choices[0]
    assert echoed.text == "The capital of France is" + plain.text
    streamed, _ = by_index(list(client.completions.create(**kw, echo=True, stream=True)), 1)
    assert streamed[0] == echoed.text
    lp = client.completions.create(**kw, echo=True, logprobs=2).choices[0].logprobs
    ids = model.tokenize("The capital of France is")
    assert len(lp.tokens) == len(ids) + 5 and "".join(lp.tokens) == echoed.text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # the first token has no context
    want, _ = model.forced_logprobs(ids[:1], ids[1:])
    assert lp.token_logprobs[1:len(ids)] == pytest.approx(list(want), abs=1e-4)
    assert all(len(t) <= 2 for t in lp.top_logprobs[1:])
    with pytest.raises(openai.BadRequestError) as e:
        list(client.completions.create(**kw, echo=True, logprobs=2, stream=True))
    assert e.value.body["param"] == "echo"


def test_api_key(door):
    url = door + "/v1/chat/completions"
    body = {"messages": MSGS, "max_tokens": 2}
    for key in (None, "wrong", KEY + "x", ""):
        status, headers, err = http(url, body, key=key)
        assert status == 401 and err["error"]["code"] == "invalid_api_key"
        assert set(err["error"]) == {"message", "type", "param", "code"}
    assert http(door + "/v1/models", key=None)[0] == 401 and http(door + "/metrics", key=None)[0] == 401
    assert http(door + "/health", key=None)[0] == 200  # open: load balancers probe it without a key
    assert http(url, body)[0] == 200
    bad = openai.OpenAI(base_url=door + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="m", messages=MSGS, max_tokens=2)


def scrape(door):
    status, headers, text = http(door + "/metrics", raw=True)
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    values = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.fullmatch(r"# (HELP|TYPE) neurotap_\w+ .+", line), line
            continue
        m = re.fullmatch(r'(neurotap_\w+)(\{(\w+="[^"]*"(,\w+="[^"]*")*)\})? (\S+)', line)
        assert m, line
        values[m.group(1) + (m.group(2) or "")] = float(m.group(5))
    return values


def test_metrics_move_after_requests(client, door):
    before = scrape(door)
    chat = 'neurotap_requests_total{route="/v1/chat/completions",status="200"}'
    r = client.chat.completions.create(model="m", messages=MSGS, max_tokens=6, temperature=0)
    client.chat.completions.create(model="m", messages=MSGS, max_tokens=8, seed=1,
                                   extra_body={"nad": {"n": 2, "method": "minact", "early_stop": 4}})
    http(door + "/v1/chat/completions", {"messages": []})
    after = scrape(door)
    assert after[chat] == before.get(chat, 0) + 2
    bad = 'neurotap_requests_total{route="/v1/chat/completions",status="400"}'
    assert after[bad] == before.get(bad, 0) + 1
    assert after["neurotap_prompt_tokens_total"] >= before["neurotap_prompt_tokens_total"] + 2 * r.usage.prompt_tokens
    assert after["neurotap_completion_tokens_total"] >= before["neurotap_completion_tokens_total"] + 6 + 8
    assert after["neurotap_nad_decisions_total"] == before["neurotap_nad_decisions_total"] + 1
    assert after["neurotap_queue_depth"] == 0 and after["neurotap_sequences_in_flight"] == 0
    assert "neurotap_prompt_cells_reused_total" in after and "neurotap_joint_prompt_decodes_total" in after
    # While a stream of two samples runs and a request waits: the gauges say so.
    long = client.chat.completions.create(model="m", messages=MSGS, max_tokens=1500, n=2, stream=True,
                                          extra_body={"ignore_eos": True})
    next(iter(long))
    waiting = threading.Thread(target=lambda: client.chat.completions.create(model="m", messages=MSGS, max_tokens=2))
    waiting.start()
    deadline = time.monotonic() + 60
    while (now := scrape(door))["neurotap_queue_depth"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert now["neurotap_queue_depth"] == 1 and now["neurotap_sequences_in_flight"] == 2
    long.close()
    waiting.join()
    assert scrape(door)["neurotap_queue_depth"] == 0


def test_api_key_from_the_environment(model_path):
    proc, url = start_server(model_path, env={"NEUROTAP_API_KEY": "from-env"})
    try:
        assert http(url + "/v1/models", key=None)[0] == 401
        assert http(url + "/v1/models", key=KEY)[0] == 401
        assert http(url + "/v1/models", key="from-env")[0] == 200
        assert http(url + "/health", key=None)[0] == 200
    finally:
        stop_server(proc)


ODD_BODIES = [
    b'{"messages": [{"role": "user", "content": "a\\u0000b\\ud800c"}]}',  # NUL and a lone surrogate
    b"[" * 5000 + b"]" * 5000,  # nested 5,000 deep
    b'{"messages": ' + b"[" * 200 + b"]" * 200 + b"}",
    b'{"messages": [{"role": "user", "content": "\xff\xfe bad utf-8"}]}',
    b'\xef\xbb\xbf{"messages": []}',
    b"",
    b"null",
    b"42",
    b'"a string"',
    b"[]",
    b"{not json",
    b'{"messages": NaN}',
    b'{"messages": [{"role": "user", "content": "hi"}], "temperature": Infinity}',
    b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e999}',
    b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": ' + b"9" * 5000 + b"}",
    b'{"messages": [{"role": "user", "content": "hi"}], "seed": 123456789012345678901234567890}',
    b'{"messages": [{"role": "user", "content": "hi"}], "n": -1}',
    b'{"messages": [{"role": "user", "content": "hi"}], "n": 1.5}',
    b'{"messages": [{"role": "user", "content": "hi"}], "n": true}',
    b'{"messages": [{"role": "user", "content": "hi"}], "stop": [1, 2]}',
    b'{"messages": [{"role": "user", "content": "hi"}], "stop": {"a": 1}}',
    b'{"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}',
    b'{"messages": [{"role": "user", "content": "hi"}], "stream_options": [1]}',
    b'{"messages": [{"role": "user", "content": "hi"}], "logprobs": 3}',
    b'{"messages": [{"role": "user", "content": "hi"}], "nad": [1]}',
    b'{"messages": [{"role": "user", "content": "hi"}], "nad": {"n": "4"}}',
    b'{"messages": [{"role": "user", "content": "hi"}], "neat": {"x": 1}}',
    b'{"messages": [{"role": "user", "content": "hi"}], "neureasoner": 5}',
    b'{"messages": [{"role": "user", "content": "hi"}], "neureasoner": {"calibration": "exit", "actions": 3}}',
    b'{"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": "x"}',
    b'{"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"1": [1]}}',
    b'{"messages": [{"role": 5, "content": "hi"}]}',
    b'{"messages": [{"role": "user", "content": {"deep": [[[[1]]]]}}]}',
    b'{"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}',
    b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "x\\udfff"}]}]}',
    b'{"messages": [{"role": "user", "content": "hi", "\\ud800": 1}]}',
    b'{"messages": [["user", "hi"]]}',
    b'{"messages": "hi"}',
    b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": [[[[[[1]]]]]]}',
    b'{"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 50, "logprobs": true}',
]
ODD_COMPLETIONS = [
    b'{"prompt": [1, 2, -5]}',
    b'{"prompt": [1, 2, 99999999999999999999]}',
    b'{"prompt": [[1, 2], [3]]}',
    b'{"prompt": [true]}',
    b'{"prompt": "a\\ud800"}',
    b'{"prompt": ""}',
    b'{"prompt": "hi", "echo": "yes"}',
    b'{"prompt": "hi", "logprobs": 100}',
    b'{"prompt": "hi", "suffix": "x"}',
]


def test_undecodable_bodies_get_openai_4xx(door):
    for route, bodies in (("/v1/chat/completions", ODD_BODIES), ("/v1/completions", ODD_COMPLETIONS)):
        for body in bodies:
            status, _, err = http(door + route, body)
            assert 400 <= status < 500, (body[:80], status, err)
            assert set(err["error"]) == {"message", "type", "param", "code"} and err["error"]["message"], body[:80]
    # The two bodies of the issue, by name: a 400 that says what is wrong.
    status, _, err = http(door + "/v1/chat/completions", ODD_BODIES[0])
    assert status == 400 and "surrogate" in err["error"]["message"] and err["error"]["param"] == "messages[0].content"
    status, _, err = http(door + "/v1/chat/completions", ODD_BODIES[1])
    assert status == 400 and "nested too deeply" in err["error"]["message"]
    # A NUL alone is text: it is answered.
    status, _, ok = http(door + "/v1/chat/completions", {"messages": [{"role": "user", "content": "a\u0000b"}],
                                                         "max_tokens": 2})
    assert status == 200 and ok["choices"][0]["message"]["content"] is not None
