"""share_prompt=True: the n samples of one request share the prompt's KV cells (one stream)
instead of each holding a copy (per-sequence streams). The same seeds draw the same tokens and
records either way (within the regime start_sampling's docstring names), the memory plan counts
the prompt once, and the context holds what the plan says."""
import numpy as np
import pytest

import neurotap
from neurotap import nad
from neurotap.methods.race import NadRace

from conftest import THREADS
from test_neureasoner import always, calibration

NEEDS_MODEL = True  # every test here runs a real model (see conftest.py)
MSGS = [{"role": "user", "content": "Name three colors, briefly."}]
# About 300 prompt tokens: a copy per sample costs 512 cells, one shared copy far less.
LONG = [{"role": "user", "content": "Summarize: " + " ".join(
    f"Item {i} is a small red box that holds {i} green stones." for i in range(20))}]
RECORDS = ("counts", "active_sets", "contributions")


def pad(n):
    return (n + 255) // 256 * 256


def same(a, b):
    """Tokens, text, finish reasons and every record equal, bit for bit."""
    assert [s.tokens for s in a] == [s.tokens for s in b]
    assert [s.text for s in a] == [s.text for s in b]
    assert [s.finish_reason for s in a] == [s.finish_reason for s in b]
    for x, y in zip(a, b):
        assert np.array_equal(x.active_counts, y.active_counts)
        assert np.array_equal(np.asarray(x.active_sets), np.asarray(y.active_sets))
        assert np.array_equal(np.asarray(x.contribution_sets), np.asarray(y.contribution_sets))
        assert np.array_equal(x.token_logprob, y.token_logprob)


def sample_both(model, prompt, **kw):
    out = []
    for share in (False, True):
        with model.start_sampling(prompt, share_prompt=share, reducers=RECORDS, logprobs=2, **kw) as run:
            assert run.shares_prompt == share
            run.advance()
            out.append(run.samples())
    return out


def test_shared_prompt_draws_the_same_samples(model):
    # Samples that end early free their cells only when the run ends: freed mid-run, the next
    # step's tokens would fill them, before the live samples' earlier cells, and attention (over
    # cells in cell order, accumulating in f16) would round differently.
    ended_early = 0
    for seed in (2, 6, 7):
        per_stream, shared = sample_both(model, MSGS, n=4, max_tokens=48, seed=seed, temperature=0.9)
        same(per_stream, shared)
        lens = [s.n_tokens for s in shared]
        ended_early += min(lens) < max(lens) and any(s.finish_reason == "eos" for s in shared)
    assert ended_early >= 2  # the case the deferred freeing is for did occur


def test_best_of_n_early_stop_shared_equals_per_stream(model):
    kw = dict(n=4, method="minact", early_stop=8, max_tokens=40, seed=5, temperature=0.9)
    a = nad.best_of_n(model, [{"role": "user", "content": "Name three colors."}], share_prompt=False, **kw)
    b = nad.best_of_n(model, [{"role": "user", "content": "Name three colors."}], share_prompt=True, **kw)
    assert a.index == b.index and a.text == b.text and a.sample.tokens == b.sample.tokens
    assert a.tokens_generated == b.tokens_generated
    np.testing.assert_array_equal(a.similarity, b.similarity)
    assert [c.tokens for c in a.candidates] == [c.tokens for c in b.candidates]
    assert b.sample.n_tokens > 8  # the winner went on past the decision (handed off)


def test_the_plan_and_the_cells_held_agree():
    """KV cells during a run equal the plan: n x pad(prompt + held) per stream, pad(prompt + n x
    held) shared; a race holds kv_tokens + 1 per sample."""
    with neurotap.load("smollm2-135m", n_ctx=1024, n_threads=THREADS) as m:
        kvb = m.info.kv_bytes_per_cell
        n_prompt = len(m.prompt_tokens(LONG))
        assert 256 < n_prompt < 400
        for share, cells in ((False, 4 * pad(n_prompt + 16)), (True, pad(n_prompt + 4 * 16))):
            opts = m.sampling_options(n=4, max_tokens=16)
            assert m.run_memory(opts, n_prompt, share_prompt=share)["kv"] == cells * kvb
            with m.start_sampling(LONG, n=4, max_tokens=16, share_prompt=share, seed=1) as run:
                assert m.memory()["kv"] == cells * kvb
                run.advance()
        assert m.memory()["kv"] == pad(n_prompt + 4 * 16) * kvb  # the idle context kept for reuse
        for share, cells in ((False, 4 * pad(n_prompt + 9)), (True, pad(n_prompt + 4 * 9))):
            opts = m.sampling_options(n=4, max_tokens=48, kv_tokens=8)
            assert m.run_memory(opts, n_prompt, share_prompt=share)["kv"] == cells * kvb
            with NadRace(m, LONG, n=4, early_stop=8, max_tokens=48, seed=1, share_prompt=share) as race:
                assert m.memory()["kv"] == cells * kvb
                race.advance()
                race.decide("knn")
                assert race.handed_off
                assert m.memory()["kv"] == pad(n_prompt + 48) * kvb  # the winner's own context only
                race.advance()


def test_refused_per_stream_accepted_shared():
    with neurotap.load("smollm2-135m", n_ctx=1024, n_threads=THREADS, max_sample_cells=1024) as m:
        kw = dict(n=4, max_tokens=16, seed=4, ignore_eos=True, reducers=RECORDS)
        # Four copies of the prompt need 4 x 512 cells; one shared copy and four tails 512.
        with pytest.raises(neurotap.ContextError, match=r"need 2048 KV cells, beyond max_sample_cells=1024.*"
                                                        r"share_prompt=True .* need 512"):
            m.start_sampling(LONG, **kw)
        shared = m.sample(LONG, share_prompt=True, **kw)
        with pytest.raises(neurotap.ContextError, match=r"n=16 samples sharing a prompt of \d+ tokens.* at most n=\d+"):
            m.start_sampling(LONG, n=16, max_tokens=64, share_prompt=True)
        m.max_sample_cells = 4096  # the per-stream reference, now allowed
        same(m.sample(LONG, **kw), shared)


def test_rollbacks_need_per_sequence_streams(model):
    cal = calibration(model, intra=always([5], "resample"))
    with pytest.raises(ValueError, match="share one KV stream"):
        model.start_sampling(MSGS, n=2, max_tokens=8, neureasoner=cal, share_prompt=True).advance()
    # One sample has one stream either way: its rollbacks run.
    s = model.sample(MSGS, n=1, max_tokens=8, neureasoner=cal, share_prompt=True, reducers=("counts",))
    assert len(s) == 1
