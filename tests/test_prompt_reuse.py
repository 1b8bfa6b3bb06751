"""Prompt reuse in the Python API: consecutive calls on one Model reuse the KV cells of the prompt
prefix a context already holds (a long system prompt, a chat's earlier turns) in whole prompt
chunks (n_batch = 512 tokens here), and generate exactly what they generate without reuse."""
from __future__ import annotations

QUESTIONS = ["Hi! Who are you?", "Name a color.", "Why is the sky blue?", "Say a number.", "What is 2 + 3?",
             "Name an animal.", "Tell me a fruit.", "What day comes after Monday?", "Name a planet.", "Thanks, bye!"]


CHUNK = 512  # generate's context decodes prompts in chunks of n_batch tokens: the unit of reuse
SYSTEM = ("You are a careful assistant. Answer in one short sentence. " * 2 +
          " ".join(f"Rule {i}: be kind, be brief, be clear." for i in range(40)))


def chat(model, reuse: bool, **kw):
    """Ten turns after a long system prompt: each prompt holds the whole conversation so far."""
    model.reuse_prompt = reuse
    msgs, turns = [{"role": "system", "content": SYSTEM}], []
    before = model.reused_cells
    try:
        for q in QUESTIONS:
            msgs.append({"role": "user", "content": q})
            g = model.generate(msgs, max_tokens=16, **kw)
            turns.append(g.tokens)
            msgs.append({"role": "assistant", "content": g.text})
    finally:
        model.reuse_prompt = True
    return turns, model.reused_cells - before


def test_ten_turn_chat_same_tokens_with_and_without_reuse(model):
    plain, reused_plain = chat(model, False, temperature=0.0)
    reused, n = chat(model, True, temperature=0.0)
    assert reused_plain == 0
    assert reused == plain
    assert len({tuple(t) for t in plain}) > 5  # the turns are different answers
    # Every turn after the first reuses the system prompt's first chunk (the first turn too when
    # an earlier test left it in the cells).
    assert n >= 9 * CHUNK, n


def test_long_system_prompt_is_long_enough(model):
    ids = model.prompt_tokens([{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"}])
    assert CHUNK + 1 < len(ids) < model.n_ctx - 400


def test_reuse_counts_whole_chunks_of_the_common_prefix(model):
    p = "The quick brown fox jumps over the lazy dog. " * 60
    ids = model.tokenize(p)
    assert len(ids) > CHUNK + 10
    model.generate(ids, max_tokens=4, temperature=0)
    before = model.reused_cells
    g = model.generate(ids, max_tokens=4, temperature=0)
    # Whole chunks, never the last token (its row is sampled).
    assert model.reused_cells - before == (len(ids) - 1) // CHUNK * CHUNK
    # A prompt that differs after k tokens reuses the whole chunks before k: here none.
    k = CHUNK - 10
    other = ids[:k] + model.tokenize(" A different ending.", add_special=False) + ids[k:]
    before = model.reused_cells
    h = model.generate(other, max_tokens=4, temperature=0)
    assert model.reused_cells - before == 0
    model.reuse_prompt = False
    try:
        before = model.reused_cells
        assert model.generate(ids, max_tokens=4, temperature=0).tokens == g.tokens
        assert model.generate(other, max_tokens=4, temperature=0).tokens == h.tokens
        assert model.reused_cells == before
    finally:
        model.reuse_prompt = True


def test_sampling_reuses_the_first_sequence(model):
    p = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Write a haiku about rain."}]
    kw = dict(n=3, max_tokens=12, temperature=1.0, seed=5, reducers=("counts",))
    first = model.sample(p, **kw)
    with model.start_sampling(p, **kw) as run:
        run.advance()
        again = run.samples()
        assert run.n_reused == (len(model.prompt_tokens(p)) - 1) // CHUNK * CHUNK > 0
    assert [s.tokens for s in again] == [s.tokens for s in first]
    for a, b in zip(again, first):
        assert (a.active_counts == b.active_counts).all()
