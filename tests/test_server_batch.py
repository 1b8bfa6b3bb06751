"""Continuous batching and prompt reuse in `neurotap serve` (--parallel 4), through the official
openai client against a real server subprocess: concurrent requests with different seeds, n, NAD,
NEAT and streaming share decode steps and each answer equals the same run made alone in this
process; a ten-turn chat reuses its earlier turns' cells and answers as without reuse; what does
not fit waits in the queue, and a full queue answers 503."""
import threading

import pytest

from neurotap import nad, neat
from test_server import MSGS, SAMPLING, _wait, ext, health, http, start_server, stop_server
from test_prompt_reuse import CHUNK, QUESTIONS, SYSTEM

NEEDS_MODEL = True  # every test here runs the real model (see conftest.py)
openai = pytest.importorskip("openai")
PARALLEL, MAX_QUEUE = 4, 6


@pytest.fixture(scope="module")
def server(model_path):
    proc, url = start_server(model_path, "--parallel", str(PARALLEL), "--max-queue", str(MAX_QUEUE))
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=300)


def concurrently(*calls):
    out = [None] * len(calls)
    errors = []

    def one(i, f):
        try:
            out[i] = f()
        except Exception as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i, f)) for i, f in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


def test_concurrent_requests_share_steps_and_equal_their_runs_alone(client, server, model):
    q = [{"role": "user", "content": c} for c in ("Write a line about rain.", "Name two rivers.", "Count to five.")]
    before = health(server)

    def chat(msgs, **kw):
        return lambda: client.chat.completions.create(model="m", messages=[msgs], **kw)

    cal = neat.load_calibration("default", model)
    plain, many, greedy_neat, race, streamed = concurrently(
        chat(q[0], max_tokens=20, seed=5, temperature=0.8, top_p=0.95, extra_body={"top_k": 40, "min_p": 0.05,
                                                                                   "ignore_eos": True}),
        chat(q[1], max_tokens=16, n=2, seed=9, temperature=0.8, top_p=0.95, extra_body={"top_k": 40, "min_p": 0.05}),
        chat(MSGS[0], max_tokens=48, temperature=0, extra_body={"neat": "default"}),
        chat(q[2], max_tokens=24, seed=3, temperature=0.8, top_p=0.95,
             extra_body={"nad": {"n": 3, "method": "knn", "early_stop": 8}, "top_k": 40, "min_p": 0.05}),
        lambda: list(client.chat.completions.create(model="m", messages=[q[0]], max_tokens=20, temperature=0,
                                                    stream=True)),
    )
    after = health(server)
    # Each equals the same run made alone in this process.
    (ref,) = model.sample([q[0]], n=1, max_tokens=20, seed=5, reducers=(), tap=False, ignore_eos=True, **SAMPLING)
    assert plain.choices[0].message.content == ref.text and plain.usage.completion_tokens == 20
    refs = model.sample([q[1]], n=2, max_tokens=16, seed=9, reducers=(), tap=False, **SAMPLING)
    assert [c.message.content for c in many.choices] == [s.text for s in refs]
    (ref,) = model.sample(MSGS, n=1, max_tokens=48, temperature=0, reducers=(), neat=cal)
    assert greedy_neat.choices[0].message.content == ref.text
    assert ext(greedy_neat)["neat"]["samples"][0]["decisions"] == len(ref.neat_events) and ref.neat_events
    best = nad.best_of_n(model, [q[2]], n=3, method="knn", early_stop=8, max_tokens=24, seed=3, **SAMPLING)
    e = ext(race)["nad"]
    assert race.choices[0].message.content == best.text and e["pick"] == best.index
    assert [c["text"] for c in e["candidates"]] == [c.text for c in best.candidates]
    assert race.usage.completion_tokens == best.tokens_generated
    (ref,) = model.sample([q[0]], n=1, max_tokens=20, temperature=0, reducers=(), tap=False)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == ref.text
    # They were decoded together: fewer shared steps than rows.
    steps = after["batch_steps"] - before["batch_steps"]
    assert 0 < steps < after["batch_rows"] - before["batch_rows"]
    assert after["completed"] - before["completed"] == 5 and after["sequences_in_flight"] == 0


def test_ten_turn_chat_reuses_its_turns_and_answers_as_without_reuse(client, server, model):
    msgs = [{"role": "system", "content": SYSTEM}]
    before = health(server)["reused_cells"]
    model.reuse_prompt = False
    try:
        for q in QUESTIONS:
            msgs.append({"role": "user", "content": q})
            r = client.chat.completions.create(model="m", messages=msgs, max_tokens=12, temperature=0)
            (ref,) = model.sample(msgs, n=1, max_tokens=12, temperature=0, reducers=(), tap=False)
            assert r.choices[0].message.content == ref.text
            msgs.append({"role": "assistant", "content": r.choices[0].message.content})
    finally:
        model.reuse_prompt = True
    reused = health(server)["reused_cells"] - before
    assert reused >= 9 * CHUNK, reused  # every later turn reused at least the system prompt's first chunk


def test_what_does_not_fit_waits_and_a_full_queue_answers_503(client, server):
    # Every slot busy with a long stream; MAX_QUEUE requests wait; the next one is refused.
    longs = [client.chat.completions.create(model="m", messages=MSGS, max_tokens=1500, stream=True,
                                            extra_body={"ignore_eos": True}) for _ in range(PARALLEL)]
    for s in longs:
        next(iter(s))
    _wait(server, lambda h: h["sequences_in_flight"] == PARALLEL)
    results = [None] * MAX_QUEUE

    def ask(i):
        results[i] = client.chat.completions.create(model="m", messages=MSGS, max_tokens=4, temperature=0)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(MAX_QUEUE)]
    for t in threads:
        t.start()
    _wait(server, lambda h: h["waiting"] == MAX_QUEUE)
    status, headers, body = http(server + "/v1/chat/completions", {"messages": MSGS, "max_tokens": 4})
    assert status == 503 and body["error"]["code"] == "queue_full"
    for s in longs:  # their clients go away: their runs are cancelled and the waiting ones join
        s.close()
    for t in threads:
        t.join()
    assert all(r.choices[0].message.content for r in results)
    h = _wait(server, lambda h: h["sequences_in_flight"] == 0 and h["waiting"] == 0)
    assert h["rejected"] >= 1


def test_a_request_wider_than_the_batch_runs_alone(client, server, model):
    r = client.chat.completions.create(model="m", messages=MSGS, max_tokens=10, n=PARALLEL + 2, seed=4,
                                       temperature=0.8, top_p=0.95, extra_body={"top_k": 40, "min_p": 0.05})
    refs = model.sample(MSGS, n=PARALLEL + 2, max_tokens=10, seed=4, reducers=(), tap=False, **SAMPLING)
    assert [c.message.content for c in r.choices] == [s.text for s in refs]
