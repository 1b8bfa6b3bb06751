"""`neurotap serve --prompt-reuse exact|prefix|off` (and --no-prompt-reuse, the same as off): a
greedy chat through the official openai client against a real server subprocess reuses what each
mode promises, turn by turn (/health counts the reused cells), and exact and off answer as a run
without reuse in this process."""
import pytest

from test_prompt_reuse import QUESTIONS, SYSTEM, exact_reuse
from test_server import health, start_server, stop_server

NEEDS_MODEL = True  # every test here runs the real model (see conftest.py)
openai = pytest.importorskip("openai")
TURNS = 4


@pytest.fixture(scope="module", params=[("exact",), ("prefix",), ("off",), ("off", "--no-prompt-reuse")],
                ids=["exact", "prefix", "off", "no-prompt-reuse"])
def server(request, model_path):
    mode, *flag = request.param
    proc, url = start_server(model_path, "--parallel", "2", *(flag or ["--prompt-reuse", mode]))
    yield mode, url
    stop_server(proc)


def test_chat_reuses_what_the_mode_promises(server, model):
    mode, url = server
    assert health(url)["prompt_reuse"] == mode
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
    msgs, prev = [{"role": "system", "content": SYSTEM}], None
    for q in QUESTIONS[:TURNS]:
        msgs.append({"role": "user", "content": q})
        ids = model.prompt_tokens(msgs)
        before = health(url)["reused_cells"]
        r = client.chat.completions.create(model="m", messages=msgs, max_tokens=12, temperature=0)
        got = health(url)["reused_cells"] - before
        answer = r.choices[0].message.content
        assert r.usage.prompt_tokens == len(ids) and answer
        if mode != "prefix":  # the tokens of a run without reuse
            model.reuse_prompt = "off"
            try:
                (ref,) = model.sample(msgs, n=1, max_tokens=12, temperature=0, reducers=(), tap=False)
            finally:
                model.reuse_prompt = True
            assert answer == ref.text
        if mode == "off":
            assert got == 0
        elif prev is not None and mode == "exact":
            # The slot that served the last turn: its prompt's cells of the class the new prompt gives them.
            assert got == exact_reuse(prev, ids, model.info.repackable_weights) > 0, (got, len(ids))
        elif prev is not None:
            assert got >= len(prev)  # the whole previous prompt and the answer's cells that match
        prev = ids
        msgs.append({"role": "assistant", "content": answer})


def test_cells_a_slot_gave_up_come_back_from_the_prompt_cache(model_path, model):
    """--parallel 1: a chat's slot is taken by another conversation, then the chat goes on. Its
    cells were saved aside (--cache-ram) when the other request took the slot and come back for
    the next turn: it reuses its system prompt's and earlier turn's cells, and answers as a run
    without reuse; with --cache-ram 0 it decodes them again."""
    client_for = lambda url: openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
    other = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a fruit."}]
    reused = {}
    for ram in ("64", "0"):
        proc, url = start_server(model_path, "--parallel", "1", "--cache-ram", ram)
        try:
            client = client_for(url)
            msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[0]}]
            r = client.chat.completions.create(model="m", messages=msgs, max_tokens=8, temperature=0)
            msgs.append({"role": "assistant", "content": r.choices[0].message.content})
            client.chat.completions.create(model="m", messages=other, max_tokens=4, temperature=0)
            msgs.append({"role": "user", "content": QUESTIONS[1]})
            before = health(url)
            r = client.chat.completions.create(model="m", messages=msgs, max_tokens=12, temperature=0)
            after = health(url)
            reused[ram] = after["reused_cells"] - before["reused_cells"]
            model.reuse_prompt = "off"
            try:
                (ref,) = model.sample(msgs, n=1, max_tokens=12, temperature=0, reducers=(), tap=False)
            finally:
                model.reuse_prompt = True
            assert r.choices[0].message.content == ref.text
            restores = after["prompt_cache_restores"] - before["prompt_cache_restores"]
            assert (restores, after["cache_ram_mib"]) == ((1, 64) if ram == "64" else (0, 0))
            assert (after["prompt_cache_bytes"] > 0) == (ram == "64")
        finally:
            stop_server(proc)
    ids = model.prompt_tokens(msgs)
    assert reused["64"] > len(model.prompt_tokens([{"role": "system", "content": SYSTEM}])) // 2, (reused, len(ids))
    assert reused["0"] < reused["64"] // 4, reused  # only the chat template's opening is shared with the other
