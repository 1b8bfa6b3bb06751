"""Compact chunk set records (cpp/reducers/set_record.h): the encoded form gives back the dense bitsets bit
for bit, and NAD's similarities and every selector's pick are the same whatever the storage."""
import pickle

import numpy as np
import pytest

from neurotap import _native
from neurotap.methods import nad, selection
from neurotap.runtime.sampling import Sample
from neurotap.scoring import selectors

PROMPT = [{"role": "user", "content": "Tom has 23 apples and buys 45 more. How many apples does he have?"}]


def dense_chunks(rng, n_chunks, n_bits, densities):
    """Dense uint64 [n_chunks, words] sets; later chunks drawn partly from the earlier ones."""
    W = (n_bits + 63) // 64
    bits = np.zeros((n_chunks, 64 * W), bool)
    seen = np.zeros(64 * W, bool)
    for c in range(n_chunks):
        d = densities[c % len(densities)]
        b = rng.random(64 * W) < d
        b |= seen & (rng.random(64 * W) < 0.5)
        b[n_bits:] = False
        bits[c] = b
        seen |= b
    return np.packbits(bits, axis=1, bitorder="little").view(np.uint64)


def unpack(words):
    return np.unpackbits(np.ascontiguousarray(words).view(np.uint8), axis=-1, bitorder="little").astype(bool)


@pytest.mark.parametrize("n_bits", [1, 64, 100, 46080])
def test_round_trip(n_bits):
    rng = np.random.default_rng(n_bits)
    dense = dense_chunks(rng, 9, n_bits, [0.0, 0.003, 0.05, 0.4, 1.0])
    s = _native.ChunkSets.from_dense(dense, n_bits)
    assert len(s) == 9 and s.shape == dense.shape and s.n_bits == n_bits and s.n_words == dense.shape[1]
    np.testing.assert_array_equal(np.asarray(s), dense)
    np.testing.assert_array_equal(s.to_dense(), dense)
    for c in (0, 4, 8, -1, -9):
        np.testing.assert_array_equal(s[c], dense[c])
    for sl in (slice(2, 5), slice(None, None, 3), slice(7, 2, -2), slice(5, 5), slice(None, 100)):
        np.testing.assert_array_equal(s[sl], dense[sl])
    with pytest.raises(IndexError):
        s[9]
    keys = s.keys()
    assert len(keys) == 9
    for c in range(9):
        np.testing.assert_array_equal(keys[c], np.flatnonzero(unpack(dense[c])))
        assert keys[c].dtype == np.uint32
    np.testing.assert_array_equal(s.keys(3, 5)[1], keys[4])
    np.testing.assert_array_equal(s.counts, unpack(dense).sum(axis=1))
    for k in (None, 0, 1, 5, 9, 20, -2):
        ref = np.bitwise_or.reduce(dense[:k], axis=0) if len(dense[:k]) else np.zeros(dense.shape[1], np.uint64)
        np.testing.assert_array_equal(s.union(k), ref)
        assert s.union_size(k) == unpack(ref).sum()
    assert np.asarray(s, dtype=np.int64).dtype == np.int64
    # Pickled, and rebuilt from its parts: the same record; a damaged one is refused.
    assert pickle.loads(pickle.dumps(s)) == s
    n, data, offsets, counts, fresh = s.state()
    assert _native.ChunkSets(n, data, offsets, counts, fresh) == s
    if len(data) > 2:
        with pytest.raises(ValueError, match="malformed"):
            _native.ChunkSets(n, data[:-1], offsets, counts, fresh)
    with pytest.raises(ValueError, match="malformed"):
        _native.ChunkSets(n, data, offsets[:-1], counts, fresh)


def test_size_bounds():
    rng = np.random.default_rng(1)
    n_bits = 458752  # the 8B shape: 32 x 14336
    sparse = dense_chunks(rng, 8, n_bits, [0.02])
    s = _native.ChunkSets.from_dense(sparse, n_bits)
    assert s.nbytes < sparse.nbytes / 4
    full = np.full((3, n_bits // 64), ~np.uint64(0))
    f = _native.ChunkSets.from_dense(full, n_bits)
    assert f.nbytes <= full.nbytes + 3 * (3 + 16) + 8  # never more than dense, beyond a few bytes per chunk
    with pytest.raises(ValueError, match="beyond"):
        _native.ChunkSets.from_dense(np.full((1, 2), ~np.uint64(0)), 100)
    with pytest.raises(ValueError, match="n_bits"):
        _native.ChunkSets.from_dense(np.zeros((1, 2), np.uint64), 200)


def test_sample_takes_dense_arrays():
    dense = np.array([[5, 0], [0, 1]], np.uint64)
    s = Sample(tokens=[1, 2], contribution_sets=dense, active_sets=dense, chunk=1)
    assert isinstance(s.contribution_sets, _native.ChunkSets) and isinstance(s.active_sets, _native.ChunkSets)
    np.testing.assert_array_equal(s.contribution_set(), [5, 1])
    np.testing.assert_array_equal(s.active_set(1), [5, 0])
    np.testing.assert_array_equal(s.contribution_set(0), [0, 0])


# -- on the real model ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(model):
    out = {}
    for chunk in (32, 1):
        r = model.start_sampling(PROMPT, n=6, max_tokens=96, seed=11, chunk=chunk, reducers=("contributions",),
                                 logprobs=selection.TOP_LOGPROBS)
        r.advance()
        out[chunk] = r.samples()
    return out


def test_sets_equal_unions_of_token_sets(runs):
    for a, b in zip(runs[1], runs[32]):
        assert a.tokens == b.tokens
        per_token = unpack(np.asarray(a.contribution_sets))
        for c in range(len(b.contribution_sets)):
            np.testing.assert_array_equal(unpack(b.contribution_sets[c]), per_token[32 * c:32 * c + 32].any(axis=0))
        assert b.contribution_sets.counts.sum() > 0


@pytest.mark.parametrize("tokens", [None, 32, 64])
def test_selectors_pick_the_same_as_on_dense_sets(runs, tokens):
    samples = runs[32]
    chunks = None if tokens is None else tokens // 32
    dense = [np.asarray(s.contribution_sets)[slice(None, chunks)] for s in samples]
    bits = np.stack([unpack(d).any(axis=0) for d in dense])  # numpy's own unions
    inter = (bits[:, None] & bits[None]).sum(-1)
    union = (bits[:, None] | bits[None]).sum(-1)
    S_ref = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    S = nad.similarity(samples, tokens)
    np.testing.assert_array_equal(S, S_ref)  # exact: the same integers divided
    np.testing.assert_array_equal(nad.set_sizes(samples, tokens), bits.sum(-1))
    assert [s.contribution_sets.union_size(chunks) for s in samples] == list(bits.sum(-1))
    # Dense-built samples (the old storage, encoded on the way in) pick what the run's records pick.
    legacy = [Sample(tokens=s.tokens, text=s.text, index=s.index, chunk=s.chunk, contribution_sets=np.asarray(s.contribution_sets),
                     token_logprob=s.token_logprob, top_logprobs=s.top_logprobs, mean_logprob=s.mean_logprob)
              for s in samples]
    for method in ("knn", "medoid", "dbscan", "minact"):
        ref = {"knn": lambda: selectors.select_knn(S_ref, 3), "medoid": lambda: selectors.select_medoid(S_ref),
               "dbscan": lambda: selectors.select_dbscan(S_ref), "minact": lambda: selectors.select_minact(bits.sum(-1))}
        pick = selection.select(samples, method, tokens=tokens, k=3)
        assert pick == ref[method]() == selection.select(legacy, method, tokens=tokens, k=3), method


def test_nex_input_equals_dense(runs):
    for s in runs[1][:3]:
        T = s.n_tokens
        bits = unpack(np.asarray(s.contribution_sets)[:T]).astype(np.float32)
        mass, rows = selection.nex_input(s)
        for r in range(len(rows)):
            np.testing.assert_array_equal(mass[r], bits[32 * r:32 * r + 32].sum(axis=0))
    assert selection.select(runs[1], "nex") == selection.select(
        [Sample(tokens=s.tokens, chunk=1, contribution_sets=np.asarray(s.contribution_sets)) for s in runs[1]], "nex")


def test_records_are_smaller_than_dense(runs):
    """SmolLM2 (46,080 neurons): a 32-token chunk holds ~15% of them; the record is still smaller."""
    for s in runs[32]:
        dense = len(s.contribution_sets) * s.contribution_sets.n_words * 8
        assert s.contribution_sets.nbytes < 0.8 * dense
    for s in runs[1]:  # per token: ~500 keys of 46,080, far below a bitset
        dense = len(s.contribution_sets) * s.contribution_sets.n_words * 8
        assert s.contribution_sets.nbytes < 0.15 * dense


def test_live_run_reads_its_open_chunk(model):
    """Mid-run (advance(40) of 32-token chunks) the second chunk is open: read, not yet encoded."""
    r = model.start_sampling(PROMPT, n=2, max_tokens=64, seed=3, chunk=32, reducers=("contributions",))
    r.advance(40)
    mid = r.samples()
    r.advance()
    end = r.samples()
    for a, b in zip(mid, end):
        assert len(a.contribution_sets) == (a.n_tokens + 31) // 32
        np.testing.assert_array_equal(a.contribution_sets[0], b.contribution_sets[0])
        if a.n_tokens > 32 and b.n_tokens > 32:
            # The open chunk holds tokens 32..39, a subset of the completed chunk.
            open_, full = unpack(a.contribution_sets[1]), unpack(b.contribution_sets[1])
            assert open_.any() and not (open_ & ~full).any()
