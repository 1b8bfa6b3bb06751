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
