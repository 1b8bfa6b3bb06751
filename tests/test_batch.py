"""runtime.batch.Batch (the server's continuous batching) in process: a run paused by the batcher
at a token target holds the same records as the same run advanced alone to that target (NAD
decides on them there), and the same tokens; what a stream reads of a sample each step is the
sample's."""
import numpy as np
import pytest

import neurotap
from neurotap.methods import nad
from neurotap.runtime.batch import Batch
from neurotap.runtime.sampling import sample_from

MSGS = [{"role": "user", "content": "Name three colors."}]
SAMPLING = dict(temperature=0.8, top_p=0.95, top_k=40, min_p=0.05)


def test_a_paused_batched_run_holds_every_record_of_its_tokens():
    m = neurotap.load(n_ctx=1024)
    ids = m.prompt_tokens(MSGS)
    kw = dict(n=4, reducers=("contributions", "active_sets"), chunk=8, max_tokens=32, seed=3, **SAMPLING)
    alone = m.start_sampling(ids, **kw)
    batch = Batch(m, 4)
    opts = m.sampling_options(**kw)
    opts.seqs = [0, 1, 2, 3]
    run = batch.start(ids, opts, 8)
    for until in (8, 16):
        alone.advance(until)
        batch.set_until(run, until)
        while run.n_live and run not in batch.run():
            pass
        a, b = alone.samples(), [sample_from(run.sample(i), 8) for i in range(4)]
        assert [s.tokens for s in a] == [s.tokens for s in b]
        chunks = until // 8
        np.testing.assert_array_equal(nad.set_sizes(a, until), nad.set_sizes(b, until))
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x.contribution_set(chunks), y.contribution_set(chunks))
            np.testing.assert_array_equal(x.active_set(chunks), y.active_set(chunks))
    alone.close()


def test_a_stream_view_is_what_the_sample_says(model):
    """What a stream reads each step (the text and where a sample stands, not its records) is the
    whole sample's, token by token, stop strings and the end included; a run that records
    log-probabilities is read whole (streams send them)."""
    from neurotap.runtime.sampling import Sample, TextView

    ids = model.prompt_tokens([{"role": "user", "content": "Write a line in Japanese and one in French."}])
    with model.start_sampling(ids, n=2, max_tokens=40, seed=5, stop=["。", " le "], reducers=(), tap=False,
                              **SAMPLING) as run:
        for until in range(1, 41):
            run.advance(until)
            for i in range(2):
                v, s = run.stream_view(i), run.sample(i)
                assert isinstance(v, TextView)
                assert (v.index, v.text, v.n_tokens, v.last_token, v.finish_reason) == \
                       (s.index, s.text, s.n_tokens, s.tokens[-1] if s.tokens else -1, s.finish_reason)
                assert v.token_logprob is None
            if not run.n_live:
                break
        with pytest.raises(ValueError, match="out of range"):
            run._native.stream_view(2)
    with model.start_sampling(ids, n=1, max_tokens=4, seed=5, logprobs=2, reducers=(), tap=False, **SAMPLING) as run:
        run.advance(4)
        v = run.stream_view(0)
        assert isinstance(v, Sample) and v.token_logprob is not None and v.text == run.sample(0).text




def test_prompts_joining_together_are_decoded_in_one_call_and_draw_what_they_draw_alone(model):
    """Untapped runs joining at the same step: their prompts (of different lengths, some reusing a
    slot's cells, one too long to join and one of a single row) go into one llama_decode where
    llama.cpp's split keeps every row in the kernels of its prompt decoded alone; each run's tokens
    are those of the same run made alone, and a later run that reuses cells decoded together
    answers as without reuse."""
    qs = ["Write a line about rain.", "Name two rivers, please.", "Count to five.", "Say hi."]
    batch = Batch(model, 4)
    assert batch.ctx.joint_prompts  # the default model: Q4_1, no repacked weights
    kw = dict(n=1, max_tokens=12, reducers=(), tap=False, **SAMPLING)

    def start(msgs, seq, seed, **extra):
        o = model.sampling_options(seed=seed, **{**kw, **extra})
        o.seqs = [seq]
        return batch.start(model.prompt_tokens(msgs), o, o.max_tokens)

    def finish(runs):
        live = list(runs)
        while live:
            for r in batch.run():
                batch.remove(r)  # its target reached: it needs its owner, who ends it
                live.remove(r)

    def alone(msgs, seed, **extra):
        model.reuse_prompt = False
        try:
            (s,) = model.sample(msgs, seed=seed, **{**kw, **extra})
        finally:
            model.reuse_prompt = True
        return s.tokens

    chats = [[{"role": "user", "content": q}] for q in qs]
    for round_ in range(2):  # the second round reuses each slot's cells (decoded together the first time)
        before = batch.joint_prompt_decodes
        runs = [start(c, seq, 10 * round_ + seq) for seq, c in enumerate(chats)]
        finish(runs)
        assert batch.joint_prompt_decodes == before + 1
        for seq, (c, r) in enumerate(zip(chats, runs)):
            assert list(r.sample(0)["tokens"]) == alone(c, 10 * round_ + seq)
        if round_ == 0:
            assert all(r.n_reused == 0 for r in runs)
            chats = [c + [{"role": "assistant", "content": "Fine."}, {"role": "user", "content": "Again?"}]
                     for c in chats]
        else:
            assert all(r.n_reused > 0 for r in runs)
    # A tapped run joins alone; the untapped ones still together.
    before = batch.joint_prompt_decodes
    runs = [start(chats[0], 0, 1, tap=True, reducers=("active_sets",)), start(chats[1], 1, 2), start(chats[2], 2, 3)]
    finish(runs)
    assert batch.joint_prompt_decodes == before + 1
    assert list(runs[1].sample(0)["tokens"]) == alone(chats[1], 2)
