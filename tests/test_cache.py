"""The authors' sparse cache both ways: a cache their own builder wrote is read and scored as their
tools score it; neurotap's export reads back to exactly what NEX and NAD compute from the samples.

tests/data/nad_cache/ was written by NAD_Next's build_cache_fast (tests/data/make_nad_reference.py,
which records the commits); nad_cache_expected.npz holds what NAD_Next's selectors and the NEX
reference computed on it. The model tests (real samples, the CLI) carry the `model` marker.
"""
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest

from neurotap.apps.cache import Cache, export_cache, load_cache, pack_keys, unpack_keys
from neurotap.methods import nad, selection
from neurotap.runtime.sampling import Sample
from neurotap.scoring import nex, selectors

needs_sklearn = pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="needs scikit-learn")

DATA = Path(__file__).parent / "data"
# NAD_Next's Manifest dataclass (nad/core/schema/manifest.py): its loader, Manifest(**data), takes
# exactly these fields.
MANIFEST_FIELDS = {"version", "dataset_id", "model_id", "num_runs", "aggregations", "dtypes", "row_ptr_sum",
                   "token_row_ptr_sum", "token_metadata", "run_metadata", "global_key_dict_hash", "files_sha256",
                   "created_at", "endianness"}


# -- a cache written by the reference builder ---------------------------------------------------

def test_reads_the_reference_layout():
    c = load_cache(DATA / "nad_cache")
    assert isinstance(c, Cache) and len(c) == 8
    assert c.groups() == {"p0": [0, 1, 2, 3], "p1": [4, 5, 6, 7]}
    assert set(json.loads((DATA / "nad_cache" / "manifest.json").read_text())) == MANIFEST_FIELDS
    rows = np.fromfile(DATA / "nad_cache/rows/sample_row_ptr.int64", np.int64)
    assert [m.shape[0] for m, _ in c.responses] == np.diff(rows).tolist()
    for m, t in c.responses:
        assert m.shape[1] == c.keys.size and t[:-1].tolist() == [32] * (len(t) - 1) and 1 <= t[-1] <= 32
    # base/ is the reference builder's per-response sum over its slices (float16)
    for i, (m, _) in enumerate(c.responses):
        np.testing.assert_allclose(c.mass[i], m.sum(axis=0), rtol=2e-3)
        np.testing.assert_array_equal(c.present[i], m.sum(axis=0) > 0)


@needs_sklearn
def test_nex_on_the_reference_cache_agrees():
    exp = np.load(DATA / "nad_cache_expected.npz")
    c = load_cache(DATA / "nad_cache")
    np.testing.assert_array_equal(c.keys, exp["weight_keys"])
    w = nex.neuron_weights(c.responses, reference_rounding=True)
    np.testing.assert_allclose(w, exp["weights"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(c.nex_scores(reference_rounding=True), exp["scores"], rtol=1e-5, atol=1e-6)
    # by default (no rounding-sized credit for a lone median cycle: response 0 has one cycle)
    np.testing.assert_allclose(c.nex_scores(), exp["scores"], rtol=0, atol=5e-3)


@needs_sklearn
def test_selectors_on_the_reference_cache_agree():
    """Distances as NAD_Next's engine computes them (Jaccard, float32), and the same picks as its
    knn-medoid, medoid, dbscan-medoid and min-activation selectors (and its analyze pipeline,
    checked when the data was made) with --distance ja --cut mass:1.0."""
    exp = np.load(DATA / "nad_cache_expected.npz")
    c = load_cache(DATA / "nad_cache")
    for g, (pid, idx) in enumerate(c.groups().items()):
        S = c.similarity(idx)
        D = (1.0 - S).astype(np.float32)
        np.fill_diagonal(D, 0.0)
        np.testing.assert_array_equal(D, exp["D"][g])
        got = [idx[selectors.select_knn(S)], idx[selectors.select_medoid(S)], idx[selectors.select_dbscan(S)],
               idx[selectors.select_minact(c.set_sizes(idx))]]
        assert got == exp["picks"][g].tolist(), pid


def test_reading_cleans_as_the_reference(tmp_path):
    """Reserved layer 255 ignored, non-finite or negative masses taken as 0, rows of no tokens left
    out; a cache without a row bank still gives NAD's sets."""
    root = tmp_path / "c"
    (root / "rows").mkdir(parents=True)
    (root / "base").mkdir()
    k = lambda layer, n: (layer << 16) | n  # noqa: E731
    keys = np.array([k(0, 1), k(3, 2), k(255, 7), k(0, 1), k(2, 5), k(1, 1)], np.uint32)
    w = np.array([2.0, np.nan, 9.0, 1.0, -3.0, 4.0], np.float16)
    np.array([0, 4], np.int64).tofile(root / "rows/sample_row_ptr.int64")
    np.array([0, 3, 3, 5, 6], np.int64).tofile(root / "rows/row_ptr.int64")
    np.array([0, 32, 32, 64, 70], np.int64).tofile(root / "rows/token_row_ptr.int64")  # row 1: no tokens
    keys.tofile(root / "rows/keys.uint32")
    w.tofile(root / "rows/w_sum.float16")
    np.array([0, 4], np.int64).tofile(root / "base/row_ptr.int64")
    keys[[0, 1, 2, 4]].tofile(root / "base/keys.uint32")
    np.array([3, 1, 9, 0], np.float16).tofile(root / "base/w_sum.float16")
    c = load_cache(root)
    assert c.keys.tolist() == [k(0, 1), k(1, 1), k(2, 5), k(3, 2)]
    (m, t), = c.responses
    assert t.tolist() == [32, 32, 6]
    np.testing.assert_array_equal(m, [[2, 0, 0, 0], [1, 0, 0, 0], [0, 4, 0, 0]])
    np.testing.assert_array_equal(c.mass, [[3, 0, 0, 1]])
    np.testing.assert_array_equal(c.present, [[True, False, True, True]])  # a key with mass 0 is in NAD's set
    for f in (root / "rows").iterdir():
        f.unlink()
    (root / "rows").rmdir()
    c = load_cache(root)
    assert c.responses is None and c.set_sizes().tolist() == [3]
    with pytest.raises(ValueError, match="no row bank"):
        c.nex_scores()
    (root / "base/w_sum.float16").write_bytes(b"\0")
    with pytest.raises(ValueError, match="multiple of 2"):
        load_cache(root)
    with pytest.raises(FileNotFoundError, match="no cache"):
        load_cache(tmp_path / "missing")


# -- export, without a model --------------------------------------------------------------------

N_LAYERS, N_FF = 3, 40  # 120 neurons: two uint64 words per set


def fake_sample(rng, index, n_tokens, density=0.08):
    """A Sample as a chunk=1 contributions run leaves it: one set per token."""
    bits = rng.random((n_tokens, 128)) < density
    bits[:, N_LAYERS * N_FF:] = False
    sets = np.packbits(bits, axis=1, bitorder="little").view(np.uint64)
    return Sample(text=f"answer {index}", tokens=list(rng.integers(0, 1000, n_tokens)), finish_reason="length",
                  index=index, contribution_sets=sets, chunk=1)


def test_keys():
    assert pack_keys(np.array([0, 41, 119]), 40).tolist() == [0, (1 << 16) | 1, (2 << 16) | 39]
    layer, neuron = unpack_keys(np.array([(2 << 16) | 39], np.uint32))
    assert layer.tolist() == [2] and neuron.tolist() == [39]
    with pytest.raises(ValueError, match="n_ff must be 1..65536"):
        pack_keys(np.array([1]), 70000)
    with pytest.raises(ValueError, match="255 is reserved"):
        pack_keys(np.array([255 * 10]), 10)


@pytest.mark.parametrize("row", [32, 1])
def test_export_reads_back_as_the_samples(tmp_path, row):
    rng = np.random.default_rng(row)
    samples = [fake_sample(rng, i, n) for i, n in enumerate([70, 33, 0, 64])]
    out = export_cache(samples, tmp_path / "cache", n_ff=N_FF, row_tokens=row, problem_ids=["a", "a", "b", "a"],
                       extra=[{"answer": "7"}] * 4, model_id="toy")
    c = load_cache(out)
    layer, neuron = unpack_keys(c.keys)
    bits = layer * N_FF + neuron
    for s, (m, t), mass, present in zip(samples, c.responses, c.mass, c.present):
        want_m, want_t = selection.nex_input(s, row=row)  # NEX's own input from the samples
        np.testing.assert_array_equal(t, want_t)
        np.testing.assert_array_equal(m, want_m[:, bits])
        assert want_m[:, np.setdiff1d(np.arange(want_m.shape[1]), bits)].sum() == 0
        np.testing.assert_array_equal(mass, want_m.sum(axis=0)[bits])
        np.testing.assert_array_equal(present, np.isin(bits, np.flatnonzero(np.unpackbits(
            s.contribution_set().view(np.uint8), bitorder="little"))))
    np.testing.assert_array_equal(c.similarity(), nad.similarity(samples))  # the native Jaccard, exactly
    np.testing.assert_array_equal(c.set_sizes(), nad.set_sizes(samples))
    assert c.groups() == {"a": [0, 1, 3], "b": [2]}
    assert [(e["problem_id"], e["run_index"], e["answer"]) for e in c.samples] == \
        [("a", 0, "7"), ("a", 1, "7"), ("b", 0, "7"), ("a", 2, "7")]
    man = json.loads((out / "manifest.json").read_text())
    assert set(man) == MANIFEST_FIELDS and man["num_runs"] == 4 and man["run_metadata"]["position_size"] == row
    tok = np.fromfile(out / "token_data/token_ids.int32", np.int32)
    assert tok.tolist() == [x for s in samples for x in s.tokens]


def test_export_index_is_nad_nexts(tmp_path):
    """index/ as NAD_Next's builder computes it: per response, positions by descending weight
    (stable) and the cumulative weight share, float16."""
    rng = np.random.default_rng(3)
    out = export_cache([fake_sample(rng, i, 50) for i in range(2)], tmp_path / "c", n_ff=N_FF)
    ptr = np.fromfile(out / "base/row_ptr.int64", np.int64)
    w = np.fromfile(out / "base/w_sum.float16", np.float16).astype(np.float32)
    perm = np.fromfile(out / "index/perm_sum.int32", np.int32)
    prefix = np.fromfile(out / "index/prefix_sum.float16", np.float16)
    assert np.array_equal(np.fromfile(out / "index/perm_max.int32", np.int32), np.arange(ptr[-1]))
    for a, b in zip(ptr[:-1], ptr[1:]):
        order = np.argsort(-w[a:b], kind="mergesort")
        np.testing.assert_array_equal(perm[a:b], a + order)
        cdf = np.cumsum(w[a:b][order], dtype=np.float32)
        np.testing.assert_array_equal(prefix[a:b], (cdf / cdf[-1]).astype(np.float16))


def test_export_is_atomic_and_never_replaces_other_data(tmp_path):
    rng = np.random.default_rng(5)
    samples = [fake_sample(rng, i, 40) for i in range(2)]
    out = tmp_path / "cache"
    export_cache(samples, out, n_ff=N_FF)
    with pytest.raises(FileExistsError, match="overwrite=True replaces"):
        export_cache(samples, out, n_ff=N_FF)
    export_cache(samples[:1], out, n_ff=N_FF, overwrite=True)
    assert len(load_cache(out)) == 1
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not a cache folder"):
        export_cache(samples, other, n_ff=N_FF, overwrite=True)
    assert (other / "mine.txt").read_text() == "keep"
    with pytest.raises(ValueError, match="per-token activated sets"):
        export_cache([Sample(tokens=[1, 2], contribution_sets=np.zeros((1, 2), np.uint64), chunk=32)],
                     tmp_path / "x", n_ff=N_FF)
    assert sorted(os.listdir(tmp_path)) == ["cache", "notes"]  # no temporary folder left behind


# -- real samples of the default model ----------------------------------------------------------

PROMPT = [{"role": "user", "content": "Explain why the sky is blue."}]


@needs_sklearn
def test_cache_of_real_samples_gives_the_same_scores_and_picks(model, tmp_path):
    samples = model.sample(PROMPT, n=4, max_tokens=96, seed=3, reducers=("contributions",), chunk=1)
    for row in (32, 4):  # 4-token rows: cycles (one per answer here, so credit only with the reference's rounding)
        c = load_cache(export_cache(samples, tmp_path / f"c{row}", n_ff=model.info.n_ff, row_tokens=row))
        direct = [selection.nex_input(s, row=row) for s in samples]
        layer, neuron = unpack_keys(c.keys)
        bits = layer * model.info.n_ff + neuron
        for ref in (False, True):
            w = nex.neuron_weights(c.responses, reference_rounding=ref)
            np.testing.assert_array_equal(w, nex.neuron_weights(direct, reference_rounding=ref)[bits])
            np.testing.assert_allclose(c.nex_scores(reference_rounding=ref),
                                       nex.nex_scores(direct, reference_rounding=ref), rtol=1e-12)
            np.testing.assert_allclose(nex.nex_scores(c.responses, reference_rounding=ref),
                                       nex.nex_scores(direct, reference_rounding=ref), rtol=1e-12)
        if row == 4:
            assert (w != 0).sum() > 1000
    S = c.similarity()
    np.testing.assert_array_equal(S, nad.similarity(samples))
    assert selectors.select_knn(S) == nad.select(samples, "knn")
    assert selectors.select_medoid(S) == nad.select(samples, "medoid")
    assert selectors.select_dbscan(S) == nad.select(samples, "dbscan")
    assert selectors.select_minact(c.set_sizes()) == nad.select(samples, "minact")
    c32 = load_cache(tmp_path / "c32")
    assert int(np.argmax(c32.nex_scores())) == nad.select(samples, "nex")


@pytest.mark.model
def test_cli_export_cache(tmp_path, capsys):
    from neurotap.apps.cli import main

    out = tmp_path / "cache"
    rc = main(["export-cache", "--tasks", "arith", "--limit", "2", "-n", "2", "--max-tokens", "24", "--out", str(out),
               "--threads", "2"])
    assert rc == 0
    assert "4 responses (2 problems)" in capsys.readouterr().out
    c = load_cache(out)
    assert list(c.groups()) == ["arith-0000", "arith-0001"] and all("answer" in e for e in c.samples)
    assert main(["export-cache", "--tasks", "arith", "--limit", "1", "--out", str(out)]) == 2  # exists
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export-cache", "a prompt", "--tasks", "arith", "--out", str(tmp_path / "y")]) == 2
    assert "either a prompt or --tasks" in capsys.readouterr().err
