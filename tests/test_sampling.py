"""The parallel sampling engine: rows routed to the right samples, reproducible RNG streams,
native bitsets equal to numpy's, mid-run control, and clear errors."""
import numpy as np
import pytest

import neurotap
from neurotap import _native

NEEDS_MODEL = True  # every test here runs the real model (see conftest.py)

PROMPT = [{"role": "user", "content": "What is 12 + 7? Answer briefly."}]


@pytest.fixture(scope="module")
def run8(model):
    # Sequences end at different steps (eos at different lengths): routing must survive gaps.
    run = model.start_sampling(PROMPT, n=8, max_tokens=40, temperature=1.0, top_p=1.0, seed=11,
                               capture="float32", logprobs=5)
    run.advance()
    return run.samples()


def test_samples_end_at_different_steps(run8):
    lengths = {s.n_tokens for s in run8}
    assert len(lengths) > 1, "the routing test needs samples that end at different steps"


def test_batched_rows_equal_single_sequence_rows(model, run8):
    """Sample k's activations equal a single-sequence run fed the same tokens."""
    for s in run8:
        if s.n_tokens < 2:
            continue
        ref = _teacher_forced(model, s.tokens)
        assert ref.shape == s.activations.shape
        rel = np.linalg.norm(ref - s.activations) / np.linalg.norm(ref)
        assert rel < 5e-3, (s.index, rel)
    # and the check can fail: another sample's rows are far off
    a, b = run8[0], run8[1]
    n = min(a.n_tokens, b.n_tokens)
    if n > 2 and a.tokens[:n] != b.tokens[:n]:
        assert np.linalg.norm(a.activations[:n] - b.activations[:n]) / np.linalg.norm(a.activations[:n]) > 0.05


def _teacher_forced(model, tokens):
    """Rows of a single-sequence run fed exactly `tokens`."""
    g = model.trace(PROMPT, tokens)
    assert g.tokens == tokens
    return g.activations


def test_bitsets_equal_numpy_from_full_rows(run8):
    for s in run8:
        act = (s.activations > 0).reshape(s.n_tokens, -1)
        assert s.active_sets.shape[0] == (s.n_tokens + 31) // 32
        for c in range(s.active_sets.shape[0]):
            ref = np.packbits(act[c * 32:(c + 1) * 32].any(axis=0), bitorder="little")
            got = s.active_sets[c].view(np.uint8)
            np.testing.assert_array_equal(got[: len(ref)], ref)
            assert not got[len(ref):].any()


def test_counts_and_logprobs(run8):
    for s in run8:
        np.testing.assert_array_equal(s.active_counts, (s.activations > 0).sum(-1))
        assert s.token_logprob.shape == (s.n_tokens,) and (s.token_logprob <= 0).all()
        assert s.top_ids.shape == (s.n_tokens, 5)
        assert (np.diff(s.top_logprobs, axis=1) <= 0).all()
        # with top_p=1, temperature=1 the sampled token is drawn from this distribution
        assert np.isfinite(s.token_logprob).all()


def test_same_seed_same_samples_and_distinct_streams(model):
    kw = dict(n=4, max_tokens=16, temperature=1.0, top_p=1.0, seed=5, reducers=())
    a = model.sample(PROMPT, **kw)
    b = model.sample(PROMPT, **kw)
    assert [s.tokens for s in a] == [s.tokens for s in b]
    assert len({tuple(s.tokens) for s in a}) > 1
    assert len({_native.sample_seed(5, i) for i in range(64)}) == 64
    c = model.sample(PROMPT, **{**kw, "seed": 6})
    assert [s.tokens for s in c] != [s.tokens for s in a]


def test_stop_some_and_continue_one(model):
    run = model.start_sampling(PROMPT, n=6, max_tokens=30, temperature=1.0, top_p=1.0, seed=2)
    run.advance(8)
    live = [i for i in range(6) if run.sample(i).finish_reason == ""]
    assert live and all(run.sample(i).n_tokens == 8 for i in live)
    keep = live[0]
    run.keep([keep])
    assert run.n_live == 1
    assert all(run.sample(i).finish_reason == "stopped" for i in live[1:])
    run.advance()
    kept = run.sample(keep)
    assert kept.finish_reason in ("eos", "length", "stop") and kept.n_tokens >= 8
    # same tokens as the same sample in a run that was never pruned
    full = model.sample(PROMPT, n=6, max_tokens=30, temperature=1.0, top_p=1.0, seed=2, reducers=())
    assert kept.tokens == full[keep].tokens


def test_per_sample_teacher_forcing_reproduces_a_sampled_run(model):
    """Each sample fed its own token stream: the tokens, and the NAD sets computed from them, are
    those of the run that sampled the streams (the benchmarks feed real text to other models so)."""
    kw = dict(n=4, max_tokens=20, temperature=1.0, top_p=1.0, seed=3, reducers=("contributions",), ignore_eos=True)
    sampled = model.sample(PROMPT, **kw)
    streams = [s.tokens for s in sampled]
    assert len({tuple(t) for t in streams}) > 1
    forced = model.sample(PROMPT, **{**kw, "seed": 99}, forced=streams)
    for a, b in zip(sampled, forced):
        assert b.tokens == a.tokens
        assert b.contribution_sets == a.contribution_sets
    # Shorter streams: sampling goes on after them, up to max_tokens.
    part = model.sample(PROMPT, **kw, forced=[t[:5] for t in streams])
    assert [s.tokens[:5] for s in part] == [t[:5] for t in streams] and all(s.n_tokens == 20 for s in part)
    with pytest.raises(ValueError, match="3 token streams for n=4"):
        model.start_sampling(PROMPT, **kw, forced=streams[:3])
    with pytest.raises(ValueError, match="more forced tokens"):
        model.start_sampling(PROMPT, **{**kw, "max_tokens": 10}, forced=streams)
    with pytest.raises(ValueError, match="out of range"):
        model.start_sampling(PROMPT, **kw, forced=[[0], [1], [-1], [2]])


def test_watch_reducer_gathers_the_watched_neurons(model):
    watch = [(0, 5), (29, 1535), (12, 700)]
    run = model.start_sampling(PROMPT, n=2, max_tokens=6, seed=1, reducers=("watch",), watch=watch,
                               capture="float32")
    run.advance()
    for s in run.samples():
        ref = np.stack([s.activations[:, layer, i] for layer, i in watch], axis=1)
        np.testing.assert_array_equal(s.watched, ref)


def test_request_beyond_the_cells_fails_before_decoding(model):
    with pytest.raises(neurotap.ContextError, match=r"at most n=\d+ samples"):
        model.start_sampling(PROMPT, n=64, max_tokens=900)
    # Each sample is bound by n_ctx like generate() (the fixture loads n_ctx=1024).
    with pytest.raises(neurotap.ContextError, match="exceeds the context of 1024"):
        model.start_sampling(PROMPT, n=2, max_tokens=2000)
    with pytest.raises(neurotap.ContextError, match="exceeds the context of 1024"):
        model.generate(PROMPT, max_tokens=2000)


@pytest.mark.parametrize("kw,msg", [
    (dict(n=0), "n must"), (dict(max_tokens=0), "max_tokens"), (dict(reducers=("nope",)), "unknown reducers"),
    (dict(reducers=("watch",)), "watch"), (dict(watch=[(30, 0)], reducers=("watch",)), "outside"),
    (dict(chunk=0), "chunk"), (dict(temperature=0.7, top_p=0.0), "top_p"),
])
def test_bad_sampling_parameters(model, kw, msg):
    with pytest.raises(ValueError, match=msg):
        model.start_sampling(PROMPT, **{"n": 2, "max_tokens": 4, **kw})


def test_stop_strings_end_each_sample(model):
    full = model.sample(PROMPT, n=4, max_tokens=30, temperature=1.0, top_p=1.0, seed=4, reducers=())
    cut = model.sample(PROMPT, n=4, max_tokens=30, temperature=1.0, top_p=1.0, seed=4, reducers=(), stop=" ")
    for f, c in zip(full, cut):
        assert " " not in c.text and f.text.startswith(c.text)
        if " " in f.text:
            assert c.finish_reason == "stop" and c.n_tokens <= f.n_tokens


def test_a_finished_run_gives_its_context_back_once(model):
    """advance() and close() on a finished run must not hand its context to the pool again: two
    later runs would then share one KV cache and draw wrong tokens."""
    ref = [s.tokens for s in model.sample(PROMPT, n=2, max_tokens=24, seed=11)]
    done = model.start_sampling(PROMPT, n=2, max_tokens=8, seed=3)
    assert done.advance() == 0
    assert done.advance() == 0 and done.advance(4) == 0  # finished: nothing decodes, nothing returns
    done.close()
    a = model.start_sampling(PROMPT, n=2, max_tokens=24, seed=11)
    b = model.start_sampling(PROMPT, n=2, max_tokens=24, seed=11)
    assert a._lease.ctx is not b._lease.ctx  # one context per run in flight
    a.advance(12)
    b.advance(12)
    a.advance()
    b.advance()
    assert [s.tokens for s in a.samples()] == ref and [s.tokens for s in b.samples()] == ref


def test_closing_a_live_run_stops_it_and_keeps_its_records(model):
    with model.start_sampling(PROMPT, n=3, max_tokens=40, seed=2) as run:
        run.advance(5)
        assert run.n_live == 3
    assert run.n_live == 0 and run.advance() == 0
    for s in run.samples():
        assert s.finish_reason in ("stopped", "eos", "stop") and s.n_tokens <= 5
        assert s.active_counts.shape == (s.n_tokens, model.info.n_layers)


def test_hooks_by_transformerlens_name(model):
    """What the tap reads, by TransformerLens-style name, equals the arrays it comes from."""
    g = model.generate(PROMPT, max_tokens=6, temperature=0, capture="float32",
                       hooks=["blocks.{l}.hook_resid_post", "ln2.hook_normalized"])
    L = model.info.n_layers
    assert g.residuals.shape == g.norm_inputs.shape == (g.n_tokens, L, model.info.n_embd)
    np.testing.assert_array_equal(g.cache["blocks.3.mlp.hook_post"], g.activations[:, 3])
    np.testing.assert_array_equal(g.cache["blocks.29.hook_resid_post"], g.residuals[:, 29])
    np.testing.assert_array_equal(g.cache.stack("ln2.hook_normalized"), g.norm_inputs)
    assert len(g.cache) == 3 * L
    plain = model.generate(PROMPT, max_tokens=6, temperature=0)
    assert plain.tokens == g.tokens and plain.residuals is None and len(plain.cache) == 0
    with pytest.raises(ValueError, match="unknown hook 'attn.hook_z'.*mlp.hook_post"):
        model.generate(PROMPT, max_tokens=2, hooks=["attn.hook_z"])
    s = model.sample(PROMPT, n=2, max_tokens=4, seed=1, capture="float16")[0]
    assert s.cache.stack("mlp.hook_post").dtype == np.float16
