"""Prompt reuse in the Python API: consecutive calls on one Model reuse the KV cells of the prompt
prefix a context already holds (a long system prompt, a chat's earlier turns). "exact" (the
default) reuses only cells that decoding the prompt computes bit for bit the same, so the tokens
are those of a run without reuse: with flash attention on the CPU, at token granularity (cells
whose row class, see row_class, is the one decoding the prompt whole gives them), otherwise in
whole prompt chunks (n_batch = 512 tokens here). "prefix" reuses the whole common prefix, generated tokens' cells included."""
from __future__ import annotations

import numpy as np
import pytest

import neurotap
from conftest import THREADS

QUESTIONS = ["Hi! Who are you?", "Name a color.", "Why is the sky blue?", "Say a number.", "What is 2 + 3?",
             "Name an animal.", "Tell me a fruit.", "What day comes after Monday?", "Name a planet.", "Thanks, bye!"]


CHUNK = 512  # generate's context decodes prompts in chunks of n_batch tokens: the old unit of reuse
LARGE = 64  # rows from which the CPU flash-attention kernel takes its tiled path (GGML_FA_TILE_Q)
SMALL = 8  # rows under which some kernels vary with the batch (on the Q4_K_M file): never reused
def system_prompt(rules: int) -> str:
    return ("You are a careful assistant. Answer in one short sentence. " * 2 +
            " ".join(f"Rule {i}: be kind, be brief, be clear." for i in range(rules)))


SYSTEM = system_prompt(40)
# A chat that starts under a chunk (~430 tokens) and crosses it: a turn ends just past it.
SHORT_SYSTEM = system_prompt(28)


def chat(model, reuse, system=SYSTEM, log=None, **kw):
    """Ten turns after a long system prompt: each prompt holds the whole conversation so far.
    `log` (a list) gets (prompt ids, cells held before the turn, cells reused) per turn."""
    model.reuse_prompt = reuse
    msgs, turns = [{"role": "system", "content": system}], []
    before = model.reused_cells
    try:
        for q in QUESTIONS:
            msgs.append({"role": "user", "content": q})
            held = list(model._ctx.seq_tokens(0)) if model._ctx is not None else []
            at = model.reused_cells
            g = model.generate(msgs, max_tokens=16, **kw)
            if log is not None:
                log.append((g.prompt_tokens, held, model.reused_cells - at))
            turns.append(g.tokens)
            msgs.append({"role": "assistant", "content": g.text})
    finally:
        model.reuse_prompt = True
    return turns, model.reused_cells - before


def common(a, b):
    k, m = 0, min(len(a), len(b))
    while k < m and a[k] == b[k]:
        k += 1
    return k


def row_class(i, n, mod4=True):
    """What decides row i's values in a one-sequence batch of n rows on the CPU with flash
    attention: the attention kernel (by the batch's rows) and, on weights llama.cpp repacks
    (`mod4`: ModelInfo.repackable_weights), whether the matmuls take it in a group of 4 or as one
    of the last n % 4 (TappedContext::batch_class)."""
    size = "tiled" if n >= LARGE else "small" if n >= SMALL else "tiny" if n >= 2 else "single"
    return size, mod4 and i >= n - n % 4


def planned(p, limit, mod4=True):
    """The class decoding limit prompt rows from the start gives position p (batches end at
    multiples of CHUNK)."""
    start = p // CHUNK * CHUNK
    return row_class(p - start, min(start + CHUNK, limit) - start, mod4)


def exact_reuse(held, ids, mod4=True):
    """What exact reuse keeps at token granularity of the cells `held`, a prompt decoded whole (its
    last token in its last batch, with the rows before it): the common prefix whose cells have the
    class decoding `ids` whole gives them (a batch of SMALL rows or more), never `ids`' last token
    (always decoded: its row is tapped and sampled), cut back until the rest's first batch gives
    its rows their planned classes too: it is the planned batch, or holds as many rows mod 4 (with
    `mod4`) in the same size class (SMALL rows or more)."""
    limit, k = len(ids), 0
    reliable = ("small", "tiled")
    while (k < min(len(held), limit - 1) and held[k] == ids[k]
           and planned(k, len(held), mod4) == planned(k, limit, mod4) and planned(k, limit)[0] in reliable):
        k += 1
    for n in range(k, 0, -1):
        start = n // CHUNK * CHUNK
        end = min(start + CHUNK, limit)
        part = row_class(0, end - n)[0]
        if n == start or ((not mod4 or (n - start) % 4 == 0) and part == row_class(0, end - start)[0]
                          and part in reliable):
            return n
    return 0


def same_again(n, mod4=True):
    """exact_reuse(ids, ids) for a prompt of n tokens: its last planned batch (m rows) is decoded
    again from the last row (with `mod4`: multiple of 4 of its rows) that leaves a batch of its
    size class."""
    m = (n - 1) % CHUNK + 1
    least = LARGE if m >= LARGE else SMALL
    return n - m + ((m - least) // (4 if mod4 else 1) * (4 if mod4 else 1) if m >= SMALL else 0)


@pytest.fixture(scope="module")
def whole_chunk_model():
    """Flash attention off: exact reuse keeps to whole chunks (other kernels, rows unverified)."""
    m = neurotap.load("smollm2-135m", n_ctx=1024, n_threads=THREADS, flash_attn=False)
    yield m
    m.close()


@pytest.mark.parametrize("system", [SYSTEM, SHORT_SYSTEM], ids=["long", "crossing"])
def test_ten_turn_chat_same_tokens_with_and_without_reuse(model, system):
    plain, reused_plain = chat(model, False, system, temperature=0.0)
    log = []
    reused, n = chat(model, True, system, temperature=0.0, log=log)
    assert reused_plain == 0
    assert reused == plain
    assert len({tuple(t) for t in plain}) > 5  # the turns are different answers
    if system == SYSTEM:
        # Every turn after the first reuses the system prompt's first chunk (the first turn too when
        # an earlier test left it in the cells).
        assert n >= 9 * CHUNK, n
    # At token granularity: each later turn keeps the earlier prompt's cells of the class its own
    # decode gives them, the rest decoded again with the new part (short turns: under LARGE tokens).
    assert model._ctx.reuse_by_token
    prompts = [ids for ids, _, _ in log]
    for (prev, _, _), (ids, _, got) in zip(log, log[1:]):
        assert got == exact_reuse(prev, ids, model.info.repackable_weights) > 0, (got, len(ids))
    assert min(len(b) - len(a) for a, b in zip(prompts, prompts[1:])) < LARGE
    if system == SHORT_SYSTEM:  # a tail the old rule left small, decoded then with the chunk before it
        assert any(0 < (len(ids) - 1) % CHUNK < LARGE for ids in prompts), [len(ids) for ids in prompts]
    old_rule = sum((len(ids) - 1) // CHUNK * CHUNK for ids in prompts)  # the most whole chunks could give
    assert n > old_rule, (n, old_rule)


def test_prefix_mode_reuses_the_whole_common_prefix(model):
    plain, _ = chat(model, "off", temperature=0.0)
    log = []
    turns, n = chat(model, "prefix", temperature=0.0, log=log)
    for ids, held, got in log:
        # Every cell held that the prompt begins with, generated tokens' cells included; never the
        # prompt's last token (its row is sampled).
        assert got == min(common(held, ids), len(ids) - 1), (got, len(ids))
    for (prev, _, _), (ids, _, got) in zip(log, log[1:]):
        assert got >= len(prev)  # the previous prompt whole, its last token too: more than exact reuse
    # Valid answers, though not those of a run without reuse (the reused cells of generated tokens
    # differ from a prompt batch's, by up to ~1 in a logit on this small model, and once an answer
    # differs the conversation does): decoding each prompt and answer whole, nearly every token is
    # greedy's pick and the others are close to it.
    assert all(t for t in turns)
    model.reuse_prompt = "off"
    try:
        gaps = np.concatenate([_greedy_gap(model, ids, toks) for (ids, _, _), toks in zip(log, turns)])
    finally:
        model.reuse_prompt = True
    assert gaps.max() < 1.0 and (gaps == 0).mean() > 0.9, gaps
    print(f"prefix mode: {sum(a == b for a, b in zip(turns, plain))} of {len(plain)} turns as without reuse; "
          f"{(gaps > 0).sum()} of {gaps.size} tokens not greedy's pick (largest log-probability gap {gaps.max():.3f})")


def _greedy_gap(model, ids, toks):
    """log p(greedy's pick) - log p(token) at each position of `toks` after `ids`."""
    lp, _, top_lp = model.forced_top_logprobs(ids, toks, 1)
    return top_lp[:, 0] - lp


def test_reuse_modes_and_their_names(model):
    assert model.reuse_prompt == "exact"
    for given, mode in ((True, "exact"), (False, "off"), ("prefix", "prefix"), ("off", "off"), ("exact", "exact")):
        model.reuse_prompt = given
        assert model.reuse_prompt == mode
    for bad in ("all", 1, None):
        with pytest.raises(ValueError, match="prompt reuse must be"):
            model.reuse_prompt = bad
    assert model.reuse_prompt == "exact"


@pytest.fixture(scope="module")
def q4k_model():
    """Gemma 3 270M in Q4_K_M: weights llama.cpp repacks, whose matmul takes a batch's last n % 4
    rows another way (the row classes of exact reuse)."""
    m = neurotap.load("gemma3-270m", n_ctx=1024, n_threads=THREADS)
    yield m
    m.close()


@pytest.mark.parametrize("which", ["smollm2-q4_1", "gemma3-q4_k_m"])
def test_exact_reuse_at_token_granularity_equals_decoding_whole(model, q4k_model, which):
    """Prompts that end just past a chunk, end after a short new part, or are short: the reused
    count follows the rule and the tokens and tapped rows equal a run without reuse."""
    model = model if which.startswith("smollm2") else q4k_model
    assert model._generate_context().reuse_by_token
    assert model.info.repackable_weights == which.startswith("gemma3")  # Q4_K is repacked, Q4_1 is not
    base = model.tokenize("The quick brown fox jumps over the lazy dog. " * 60)
    more = model.tokenize(" Then it ran home.", add_special=False)
    cases = [base[:CHUNK + 20], base[:CHUNK + 20] + more, base[:CHUNK + 200], base[:CHUNK + 200] + more,
             base[:CHUNK - 10] + more, base[:40], base[:40] + more, base[:LARGE + 3], base[:LARGE + 3] + more,
             base[:CHUNK + 1], base[:CHUNK + 2], base[:30], base[:31] + more]
    kw = dict(max_tokens=6, temperature=0, capture="float32")
    model.reuse_prompt = "off"
    fresh = [model.generate(ids, **kw) for ids in cases]
    model.reuse_prompt = "exact"
    held, kept = [], 0
    try:
        for ids, f in zip(cases, fresh):
            before = model.reused_cells
            g = model.generate(ids, **kw)
            got = model.reused_cells - before
            mod4 = model.info.repackable_weights
            assert got == exact_reuse(held, ids, mod4), (len(ids), got)
            kept += got
            assert g.tokens == f.tokens
            assert np.array_equal(g.activations, f.activations), (len(ids), got)
            before = model.reused_cells
            again = model.generate(ids, **kw)  # the same prompt again: all but its last batch's
            # last rows, as many as its size class needs (a last batch under SMALL rows: all)
            assert model.reused_cells - before == exact_reuse(ids, ids, mod4) == same_again(len(ids), mod4)
            assert again.tokens == f.tokens and np.array_equal(again.activations, f.activations)
            held = ids  # what the last prompt left: its rows decoded as one prompt
    finally:
        model.reuse_prompt = True
    assert kept > 4 * CHUNK  # reuse happened, short prompts included
    assert exact_reuse(base[:40], base[:40] + more) > 0


def test_long_system_prompt_is_long_enough(model):
    ids = model.prompt_tokens([{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"}])
    assert CHUNK + 1 < len(ids) < model.n_ctx - 400


def test_reuse_counts_whole_chunks_of_the_common_prefix(whole_chunk_model):
    model = whole_chunk_model
    assert not model._generate_context().reuse_by_token
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


@pytest.mark.parametrize("by_token", [False, True])
def test_sampling_reuses_the_first_sequence(model, whole_chunk_model, by_token):
    model = model if by_token else whole_chunk_model
    p = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Write a haiku about rain."}]
    kw = dict(n=3, max_tokens=12, temperature=1.0, seed=5, reducers=("counts",))
    first = model.sample(p, **kw)
    with model.start_sampling(p, **kw) as run:
        run.advance()
        again = run.samples()
        np_ = len(model.prompt_tokens(p))
        # The first sample's cells of the same prompt: all but its last batch's last rows (as
        # many as its size class needs), or whole chunks.
        assert run.n_reused == (same_again(np_, model.info.repackable_weights) if by_token else (np_ - 1) // CHUNK * CHUNK) > 0
    assert [s.tokens for s in again] == [s.tokens for s in first]
    for a, b in zip(again, first):
        assert (a.active_counts == b.active_counts).all()


@pytest.mark.parametrize("which", ["smollm2-q4_1", "gemma3-q4_k_m"])
def test_rows_of_one_class_do_not_depend_on_the_split(model_path, which):
    """What exact reuse at token granularity rests on, checked on this machine's llama.cpp (CPU,
    flash attention): a row's logits are bit for bit the same however the prompt is split into
    batches, as long as the row keeps its class (row_class: on the same side of LARGE, and among
    the batch's last n % 4 rows or not). Splits that change a row's class do change it on the
    Q4_K_M file (whose weights llama.cpp repacks), which shows the comparison can tell."""
    from llama_cpp import Llama

    path = model_path if which.startswith("smollm2") else str(neurotap.resolve("gemma3-270m"))
    n = 300
    toks = [int(t) for t in np.random.RandomState(0).randint(100, 30000, size=n)]
    llm = Llama(path, n_ctx=1024, n_batch=CHUNK, n_ubatch=CHUNK, logits_all=True, verbose=False,
                n_threads=THREADS, flash_attn=True)
    try:
        def rows(splits, total=n):
            llm.reset()
            pos = 0
            for end in list(splits) + [total]:
                llm.eval(toks[pos:end])
                pos = end
            return np.array(llm.scores[:total])

        def classes(splits, total=n):
            bounds = [0, *splits, total]
            return [row_class(p - a, b - a) for a, b in zip(bounds, bounds[1:]) for p in range(a, b)]

        whole = rows([])
        for splits in ([LARGE], [n - LARGE], [64, 128, 192], [100, 200]):  # same classes
            assert classes(splits) == classes([]), splits
            assert np.array_equal(rows(splits), whole), splits
        small = rows([n - 8])  # the last 8 rows in a batch of their own: another attention kernel
        assert np.array_equal(small[:n - 8], whole[:n - 8]) and not np.array_equal(small, whole)
        # Short prompts: batches of SMALL to LARGE rows, each a multiple of 4 but the last.
        short = rows([], 60)
        for splits in ([32], [8, 20, 40], [8, 16, 24, 32, 40, 48]):
            assert classes(splits, 60) == classes([], 60)
            assert np.array_equal(rows(splits, 60), short), splits
        # 65 + 235 rows: the first batch's last row and the second's last 3 leave their groups of 4.
        assert classes([65]) != classes([])
        if which.startswith("gemma3"):
            assert not np.array_equal(rows([65]), whole)
            # A first batch of 4 rows (under SMALL): those rows differ already.
            assert not np.array_equal(rows([4], 60)[:4], short[:4])
        else:  # no repacked weights: the index mod 4 decides nothing (ModelInfo.repackable_weights)
            assert np.array_equal(rows([65]), whole) and np.array_equal(rows([8, 21, 43], 60), short)
            # Nor do batches of 2 to SMALL rows (decode_prompts' pieces): they are "tiny" only
            # where the weights are repacked.
            assert np.array_equal(rows([2, 5, 9], 60), short)
    finally:
        llm.close()
