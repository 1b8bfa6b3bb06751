"""Writes the NAD reference data of the tests: what the authors' selectors pick on constructed and
random similarity matrices (tests/data/nad_selectors.npz), and a small cache in their layout
written by their own cache builder (tests/data/nad_cache/) with what their selectors and the NEX
reference compute on it (tests/data/nad_cache_expected.npz).

Not imported by the tests and not run by them: it runs the reference code, which is not a
dependency. References:
  github.com/Chi-Shan0707/NAD_Next at bf0fafa2e9fc6466b2b264a696eaf284315a9394
      nad/core/selectors/impl.py (KNNMedoidSelector, MedoidSelector, DBSCANMedoidSelector,
      MinActivationSelector), nad/core/distance/engine.py (Jaccard distances, float32),
      nad/pipeline/build_cache_fast.py (the cache writer, with its row bank),
      nad/core/views/reader.py and nad/pipeline/analysis.py (reading a cache and selecting);
  github.com/anonymous-research-artifacts/nex at f9033d35e3899123cc889e98259c2f10c539f285
      nex_core/scoring.py (learn_nex_weights, score_responses on the same cache).
To regenerate (the venv of make_nex_reference.py, plus tqdm for NAD_Next):

    /tmp/ref/venv/bin/pip install tqdm
    git clone https://github.com/Chi-Shan0707/NAD_Next /tmp/ref/nad_next
    git -C /tmp/ref/nad_next checkout bf0fafa2e9fc6466b2b264a696eaf284315a9394
    /tmp/ref/venv/bin/python tests/data/make_nad_reference.py --nad /tmp/ref/nad_next \\
        --nex /tmp/ref/nex --out tests/data
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

NAD_COMMIT = "bf0fafa2e9fc6466b2b264a696eaf284315a9394"
NEX_COMMIT = "f9033d35e3899123cc889e98259c2f10c539f285"


def sim(n, pairs, base=0.125):
    """Symmetric S: `base` off the diagonal, 1 on it, `pairs` {(i, j): s}. Values are dyadic, so
    the reference's float32 D = 1 - S holds them exactly."""
    S = np.full((n, n), base)
    for (i, j), s in pairs.items():
        S[i, j] = S[j, i] = s
    np.fill_diagonal(S, 1.0)
    return S


def constructed_cases():
    """(name, S, set sizes, k): ties of each kind the selectors break."""
    cases = []
    # kNN exact tie (k = 1: 0 and 3 are each other's nearest) broken by the medoid: 3 is closer to
    # the rest. neurotap took the lowest index (0) before.
    cases.append(("knn_exact_tie_medoid", sim(5, {(0, 3): 0.75, (3, 1): 0.5, (3, 2): 0.5, (3, 4): 0.5}),
                  [10, 10, 10, 10, 10], 1))
    # kNN scores 2^-20 apart (within rtol 1e-5): a tie, and the medoid (2) wins over the top score (0).
    e = 2.0 ** -20
    cases.append(("knn_near_tie_medoid", sim(5, {(0, 1): 0.5 + e, (0, 4): 0.5 + e, (2, 1): 0.5, (2, 4): 0.5,
                                                 (2, 3): 0.375, (1, 4): 0.25}), [9, 8, 7, 8, 9], 2))
    # kNN scores 2^-12 apart: beyond the tolerance, the higher score wins.
    e = 2.0 ** -12
    cases.append(("knn_no_tie", sim(5, {(0, 1): 0.5 + e, (0, 4): 0.5 + e, (2, 1): 0.5, (2, 4): 0.5,
                                        (2, 3): 0.375, (1, 4): 0.25}), [9, 8, 7, 8, 9], 2))
    # Rows holding the same similarities in another order: an exact medoid tie (1 and 2), whatever
    # the summation order; the lowest index wins. kNN ties too and falls to the medoid.
    cases.append(("medoid_exact_tie_order", sim(4, {(0, 1): 0.1, (1, 2): 0.7, (1, 3): 0.2, (0, 2): 0.2,
                                                    (2, 3): 0.1, (0, 3): 0.05}), [5, 6, 6, 5], 3))
    # Two clusters of three, equally large: the reference takes the one holding index 0, neurotap
    # the tighter one (its medoid more central) -- a kept difference.
    A = {(i, j): 0.75 for i in range(3) for j in range(i + 1, 3)}
    B = {(i, j): 0.875 for i in range(3, 6) for j in range(i + 1, 6)}
    cases.append(("dbscan_equal_clusters", sim(6, A | B, base=0.0625), [4, 4, 4, 4, 4, 4], 3))
    # One cluster of four whose members tie as medoid (all pairs 0.75): both take the lowest index.
    C = {(i, j): 0.75 for i in (0, 2, 4, 5) for j in (0, 2, 4, 5) if i < j}
    cases.append(("dbscan_medoid_tie", sim(7, C, base=0.0625), [5, 5, 5, 5, 5, 5, 5], 3))
    # A cluster {0..4} whose medoids 1..4 tie and whose lowest index 0 is off-centre: neurotap (and
    # the reference's comment) take 1, the reference's code the first tied one in its search from
    # 0, which pops the last neighbour first: 4. A kept difference.
    T = {(i, j): 0.75 for i in range(1, 5) for j in range(i + 1, 5)} | {(0, j): 0.625 for j in range(1, 5)}
    cases.append(("dbscan_medoid_tie_search_order", sim(7, T, base=0.0625), [5, 5, 5, 5, 5, 5, 5], 3))
    # A larger, looser cluster beats a tight pair; no ties.
    L = {(i, j): 0.625 for i in range(2, 6) for j in range(i + 1, 6)} | {(2, 3): 0.6875}
    cases.append(("dbscan_largest", sim(7, L | {(0, 1): 0.9375}, base=0.0625), [3, 3, 3, 3, 3, 3, 3], 3))
    # MinAct ties: the lowest index.
    cases.append(("minact_tie", sim(4, {(0, 1): 0.5}), [7, 3, 5, 3], 3))
    return cases


def random_sets(rng, n_cases=120):
    """Random small sets over a small universe: many equal similarities and equal distances."""
    out = []
    for _ in range(n_cases):
        n = int(rng.integers(4, 13))
        universe = int(rng.integers(12, 40))
        sets = []
        for _ in range(n):
            size = int(rng.integers(3, max(4, universe // 2)))
            sets.append(np.sort(rng.choice(universe, size=size, replace=False)).astype(np.int32))
        out.append(sets)
    return out


def reference_picks(sel, D, lengths, k):
    run_stats = {"lengths": np.asarray(lengths, np.int32)}
    return (sel.KNNMedoidSelector(k=k).select(D, run_stats), sel.MedoidSelector().select(D, run_stats),
            sel.DBSCANMedoidSelector(eps=None, min_samples=3).select(D, run_stats),
            sel.MinActivationSelector().select(D, run_stats))


def selector_data(out: Path, nad) -> None:
    sel, eng, reader = nad
    names, S_all, sizes_all, ks, picks, ptr = [], [], [], [], [], [0]
    for name, S, sizes, k in constructed_cases():
        D = (1.0 - S).astype(np.float32)
        np.fill_diagonal(D, 0.0)
        names.append(name)
        S_all.append(S.ravel()), sizes_all.append(np.asarray(sizes)), ks.append(k)
        picks.append(reference_picks(sel, D, sizes, k))
        ptr.append(ptr[-1] + len(sizes))
    # Random sets: D from the reference's own Jaccard engine; S as neurotap computes it (inter / union).
    rng = np.random.default_rng(7)
    for sets in random_sets(rng):
        views = [reader.RunView(keys=s, weights=np.ones(s.size, np.float32)) for s in sets]
        D = eng.DistanceEngine(eng.DistanceSpec(name="ja", num_threads=1)).dense_matrix(views)
        n = len(sets)
        inter = np.array([[np.intersect1d(a, b).size for b in sets] for a in sets], np.float64)
        size = np.array([s.size for s in sets], np.float64)
        S = inter / (size[:, None] + size[None, :] - inter)
        assert np.array_equal(D, (1.0 - S).astype(np.float32) * (1 - np.eye(n, dtype=np.float32)))
        names.append("random")
        S_all.append(S.ravel()), sizes_all.append(size.astype(np.int64)), ks.append(3)
        picks.append(reference_picks(sel, D, size.astype(np.int32), 3))
        ptr.append(ptr[-1] + n)
    np.savez_compressed(out / "nad_selectors.npz", nad_commit=np.array(NAD_COMMIT), names=np.array(names),
                        ptr=np.asarray(ptr, np.int64), S=np.concatenate(S_all), sizes=np.concatenate(sizes_all),
                        k=np.asarray(ks, np.int64), picks=np.asarray(picks, np.int64))
    print(f"nad_selectors.npz: {len(names)} matrices ({len(constructed_cases())} constructed)")


# -- a cache in the authors' layout, written by their builder ----------------------------------

K = 16  # entries per shard row (a slice of 32 tokens), as NAD's shards hold a fixed top-K


def make_shards(rng, raw: Path):
    """Two problems (one shard each), four samples per problem, 14-24 slices per sample. A sample
    alternates Exploit slices (few new neurons) and Explore bursts (many); its neurons come from a
    pool per problem and per 'answer' (two answers per problem), so samples of one answer agree."""
    samples, shard_rows = [], []
    sid = 0
    for problem in range(2):
        base_pool = rng.choice(30 * 1536, size=300, replace=False)
        answer_pools = [np.concatenate([base_pool[:150], rng.choice(30 * 1536, size=150, replace=False)])
                        for _ in range(2)]
        rows = []
        for run in range(4):
            pool = rng.permutation(answer_pools[run % 2])
            fresh, seen = list(pool), []
            n_rows = int(rng.integers(14, 25))
            explore = False
            left = int(rng.integers(3, 6))
            for r in range(n_rows):
                n_new = int(rng.integers(8, 14)) if explore else int(rng.integers(0, 3))
                new = [int(fresh.pop()) for _ in range(min(n_new, len(fresh)))]
                old = [int(seen[int(rng.integers(len(seen)))]) for _ in range(K - len(new))] if seen else []
                ids = np.array(new + old, np.int64)
                if ids.size < K:  # the first slice: nothing seen yet, fill with new neurons
                    extra = [int(fresh.pop()) for _ in range(K - ids.size)]
                    new += extra
                    ids = np.concatenate([ids, np.array(extra, np.int64)])
                seen.extend(new)
                tokens = 32 if r < n_rows - 1 else int(rng.integers(5, 33))
                rows.append((sid, r, ids, rng.gamma(2.0, 0.7, size=K).astype(np.float16), tokens))
                left -= 1
                if left == 0:
                    explore = not explore
                    left = int(rng.integers(2, 4)) if explore else int(rng.integers(3, 7))
            samples.append({"problem_id": f"p{problem}", "run_index": run})
            sid += 1
        shard_rows.append(rows)
    raw.mkdir(parents=True)
    for i, rows in enumerate(shard_rows):
        ids = np.stack([r[2] for r in rows])
        tok = np.array([r[4] for r in rows], np.int64)
        np.savez(raw / f"shard_{i:02d}.npz",
                 idx_samples=np.array([r[0] for r in rows], np.int64),
                 slice_ids=np.array([r[1] for r in rows], np.int32),
                 layers=(ids // 1536 + 1).astype(np.uint8),  # NAD's shards: layer > 0 is a real entry
                 neurons=(ids % 1536).astype(np.uint16),
                 scores=np.stack([r[3] for r in rows]),
                 token_row_ptr=np.concatenate([[0], np.cumsum(tok)]).astype(np.int64),
                 token_ids=rng.integers(0, 49152, size=int(tok.sum())).astype(np.int32))
    return samples


def cache_data(out: Path, nad, nex_root: Path) -> None:
    sel, eng, reader = nad
    from nad.pipeline.analysis import analyze
    from nad.pipeline.build_cache_fast import build_cache_fast

    sys.path.insert(0, str(nex_root))
    from nex_core import scoring as nex_scoring

    rng = np.random.default_rng(11)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        samples = make_shards(rng, tmp / "raw")
        meta = {"samples": samples}
        (tmp / "meta.json").write_text(json.dumps(meta))
        build_cache_fast(str(tmp / "raw"), str(tmp / "cache"), str(tmp / "meta.json"), workers=1,
                         row_bank=True, pos_size=32)
        shutil.copy(tmp / "meta.json", tmp / "cache" / "meta.json")  # analyze() groups by it
        cache = tmp / "cache"

        weights = nex_scoring.learn_nex_weights(cache)
        scores = nex_scoring.score_responses(cache, weights)
        base_keys = np.unique(np.fromfile(cache / "base/keys.uint32", np.uint32))
        assert not np.delete(weights, base_keys).any()

        r = reader.CacheReader(str(cache))
        spec = reader.ViewSpec(agg=reader.Agg.MAX, cut=reader.CutSpec(reader.CutType.MASS, 1.0),
                               order=reader.Order.BY_KEY)
        D_all, picks = [], []
        for p in ("p0", "p1"):
            ids = [i for i, s in enumerate(samples) if s["problem_id"] == p]
            views = [r.get_run_view(i, spec) for i in ids]
            D = eng.DistanceEngine(eng.DistanceSpec(name="ja", num_threads=1)).dense_matrix(views)
            D_all.append(D)
            picks.append([ids[j] for j in reference_picks(sel, D, [len(v.keys) for v in views], 3)])
        # Their whole pipeline on the same cache picks the same run ids.
        res = analyze(str(cache), agg="max", cut="mass:1.0", distance="ja", distance_threads=1,
                      selectors=[{"name": "knn-medoid", "params": {"k": 3}}, {"name": "medoid"},
                                 {"name": "dbscan-medoid", "params": {"eps": "auto", "min_samples": 3}},
                                 {"name": "min-activation"}])
        for p, want in zip(("p0", "p1"), picks):
            got = res["problems"][p]["selectors"]
            assert [got["knn-medoid"], got["medoid"], got["dbscan-medoid"], got["min-activation"]] == want

        dest = out / "nad_cache"
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(cache, dest)
    np.savez_compressed(out / "nad_cache_expected.npz", nad_commit=np.array(NAD_COMMIT),
                        nex_commit=np.array(NEX_COMMIT), weight_keys=base_keys, weights=weights[base_keys],
                        scores=scores, D=np.stack(D_all), picks=np.asarray(picks, np.int64))
    files = sorted(str(p.relative_to(out / "nad_cache")) for p in (out / "nad_cache").rglob("*") if p.is_file())
    print(f"nad_cache/: {len(samples)} responses, {len(files)} files; NEX scores {np.round(scores, 4)}; "
          f"picks (knn, medoid, dbscan, minact) per problem {picks}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nad", required=True, help="checkout of Chi-Shan0707/NAD_Next")
    ap.add_argument("--nex", required=True, help="checkout of anonymous-research-artifacts/nex")
    ap.add_argument("--out", required=True, help="folder for the data (tests/data)")
    args = ap.parse_args()
    nad_root = str(Path(args.nad).resolve())
    sys.path.insert(0, nad_root)
    os.environ["PYTHONPATH"] = nad_root + os.pathsep + os.environ.get("PYTHONPATH", "")  # the builder's workers
    from nad.core.distance import engine
    from nad.core.selectors import impl
    from nad.core.views import reader

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    selector_data(out, (impl, engine, reader))
    cache_data(out, (impl, engine, reader), Path(args.nex).resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
