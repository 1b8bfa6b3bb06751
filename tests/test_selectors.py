"""NAD selectors, logprob baselines, answer checking, tasks and bootstrap CIs: pure, fast, no model."""
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from neurotap.methods import selection
from neurotap.scoring import answers, confidence, selectors, stats, tasks


def sim(n: int, pairs: dict, base: float = 0.1) -> np.ndarray:
    """A symmetric similarity matrix: `base` everywhere, 1 on the diagonal, `pairs` {(i, j): s}."""
    S = np.full((n, n), base)
    for (i, j), s in pairs.items():
        S[i, j] = S[j, i] = s
    np.fill_diagonal(S, 1.0)
    return S


# -- selectors ---------------------------------------------------------------------------------

# Samples 1, 2, 4 agree; 0 and 3 are outliers. Within the cluster, 1 is the most central.
CLUSTER = sim(5, {(1, 2): 0.9, (1, 4): 0.85, (2, 4): 0.8})


def test_cluster_of_three_wins_everywhere():
    assert selectors.select_knn(CLUSTER) == 1
    assert selectors.select_medoid(CLUSTER) == 1
    assert selectors.select_dbscan(CLUSTER) == 1
    assert list(selectors.dbscan_labels(CLUSTER)) == [-1, 0, 0, -1, 0]
    np.testing.assert_allclose(selectors.knn_scores(CLUSTER, k=3), [0.3, 1.85, 1.8, 0.3, 1.75])


def test_dbscan_picks_the_cluster_not_the_hub():
    # Sample 0 is moderately similar to everyone: the global medoid, but in no tight cluster.
    S = sim(6, {(0, j): 0.6 for j in range(1, 6)} | {(2, 3): 0.9, (2, 5): 0.85, (3, 5): 0.8}, base=0.05)
    assert selectors.select_medoid(S) == 0
    assert selectors.select_knn(S, k=5) == 0
    assert selectors.select_knn(S, k=3) == 2
    assert selectors.select_dbscan(S, eps_percentile=15) == 2
    assert list(selectors.dbscan_labels(S, eps_percentile=15)) == [-1, -1, 0, 0, -1, 0]


def test_ties_go_to_the_lowest_index():
    ring = sim(4, {(0, 1): 0.5, (1, 2): 0.5, (2, 3): 0.5, (3, 0): 0.5}, base=0.2)  # all rows alike
    assert selectors.select_knn(ring) == 0
    assert selectors.select_medoid(ring) == 0
    # 2 and 3 tie for the best score, ahead of 0 and 1
    S = sim(4, {(2, 3): 0.9})
    assert selectors.select_knn(S, k=1) == 2
    assert selectors.select_medoid(S) == 2
    assert selectors.select_minact([5, 3, 3, 4]) == 1


def test_knn_ties_go_to_the_medoid():
    # (Before: the lowest index, 0.) k = 1: 0 and 3 are each other's nearest, a tie the reference
    # breaks by the medoid, and 3 is the closer to everyone else.
    S = sim(5, {(0, 3): 0.75, (3, 1): 0.5, (3, 2): 0.5, (3, 4): 0.5}, base=0.125)
    assert selectors.select_knn(S, k=1) == 3
    # within np.isclose (rtol 1e-5) is a tie too: 0 scores 2^-20 more than 2, which is more central
    e = 2.0 ** -20
    near = {(0, 1): 0.5 + e, (0, 4): 0.5 + e, (2, 1): 0.5, (2, 4): 0.5, (2, 3): 0.375, (1, 4): 0.25}
    assert selectors.knn_scores(sim(5, near, 0.125), k=2)[0] > selectors.knn_scores(sim(5, near, 0.125), k=2)[2]
    assert selectors.select_knn(sim(5, near, 0.125), k=2) == 2
    far = near | {(0, 1): 0.5 + 2.0 ** -12, (0, 4): 0.5 + 2.0 ** -12}  # beyond it: the best score
    assert selectors.select_knn(sim(5, far, 0.125), k=2) == 0


def test_ties_do_not_depend_on_summation_order():
    # Rows 1 and 2 hold the same similarities in another order: summed as they come, 0.1 + 0.7 + 0.2
    # and 0.2 + 0.7 + 0.1 differ in the last bit; sorted first they are equal, a tie -> lowest index.
    S = sim(4, {(0, 1): 0.1, (1, 2): 0.7, (1, 3): 0.2, (0, 2): 0.2, (2, 3): 0.1, (0, 3): 0.05})
    assert (0.1 + 0.7) + 0.2 != (0.2 + 0.7) + 0.1
    scores = selectors.medoid_scores(S)
    assert scores[1] == scores[2]
    assert selectors.select_medoid(S) == 1
    assert selectors.select_knn(S, k=3) == 1


def test_k_larger_than_n_is_clipped():
    S = sim(3, {(0, 1): 0.2, (0, 2): 0.3, (1, 2): 0.9})
    np.testing.assert_allclose(selectors.knn_scores(S, k=10), [0.5, 1.1, 1.2])
    assert selectors.select_knn(S, k=10) == 2
    S2 = sim(2, {(0, 1): 0.4})
    np.testing.assert_allclose(selectors.knn_scores(S2, k=3), [0.4, 0.4])
    assert selectors.select_knn(S2, k=3) == 0


def test_all_identical_samples():
    S = np.ones((6, 6))
    assert selectors.select_knn(S) == 0
    assert selectors.select_medoid(S) == 0
    assert selectors.select_dbscan(S) == 0
    assert list(selectors.dbscan_labels(S)) == [0] * 6  # one cluster, despite a 0 percentile eps
    assert selectors.select_minact([7] * 6) == 0


def test_dbscan_without_cluster_returns_the_global_medoid():
    S = sim(5, {(0, 1): 0.30, (0, 2): 0.20, (0, 3): 0.25, (0, 4): 0.15, (1, 2): 0.40,
                (1, 3): 0.35, (1, 4): 0.10, (2, 3): 0.50, (2, 4): 0.12, (3, 4): 0.05})
    assert selectors.select_medoid(S) == 2  # row sums: 0.90 1.15 1.22 1.15 0.42
    assert list(selectors.dbscan_labels(S, eps_percentile=10)) == [-1] * 5
    assert selectors.select_dbscan(S, eps_percentile=10) == 2
    # more neighbours required than there are samples: never a cluster
    assert selectors.select_dbscan(S, eps_percentile=100, min_samples=6) == 2


def test_dbscan_largest_cluster_wins():
    # A = {0,1,2} is tighter, B = {3,4,5,6} is larger; within B, 3 and 4 tie as medoid.
    A = {(i, j): 0.99 for i in range(3) for j in range(i + 1, 3)}
    B = {(i, j): 0.8 for i in range(3, 7) for j in range(i + 1, 7)} | {(3, 4): 0.85}
    S = sim(7, A | B)
    assert list(selectors.dbscan_labels(S)) == [0, 0, 0, 1, 1, 1, 1]
    assert selectors.select_dbscan(S) == 3
    assert selectors.select_knn(S, k=2) == 0  # knn prefers the tight pair structure of A


def test_dbscan_medoid_tie_is_the_lowest_index():
    # Cluster {0..4}: 1..4 tie as its medoid, 0 is off-centre. The lowest index, 1 (the reference's
    # code takes 4, the first tied one of its search from 0; its comment says the lowest index).
    T = {(i, j): 0.75 for i in range(1, 5) for j in range(i + 1, 5)} | {(0, j): 0.625 for j in range(1, 5)}
    S = sim(7, T, base=0.0625)
    assert list(selectors.dbscan_labels(S)) == [0, 0, 0, 0, 0, -1, -1]
    assert selectors.select_dbscan(S) == 1


def test_dbscan_equal_clusters_tie_break():
    A = {(i, j): 0.8 for i in range(3) for j in range(i + 1, 3)}
    B = {(i, j): 0.9 for i in range(3, 6) for j in range(i + 1, 6)}
    assert selectors.select_dbscan(sim(6, A | B), eps_percentile=40) == 3  # B's medoid is more central
    B_same = {k: 0.8 for k in B}
    assert selectors.select_dbscan(sim(6, A | B_same), eps_percentile=40) == 0  # full tie: lowest index


def test_minact():
    assert selectors.select_minact(np.array([120, 80, 95, 80])) == 1
    assert selectors.select_minact([3]) == 0
    with pytest.raises(ValueError):
        selectors.select_minact([])


@pytest.mark.parametrize("bad, msg", [
    (np.ones((2, 3)), "square"),
    (np.array([[1.0, 0.2], [0.3, 1.0]]), "symmetric"),
    (np.array([[1.0, np.nan], [np.nan, 1.0]]), "finite"),
])
def test_invalid_matrices(bad, msg):
    for select in (selectors.select_knn, selectors.select_medoid, selectors.select_dbscan):
        with pytest.raises(ValueError, match=msg):
            select(bad)


@pytest.mark.parametrize("method, select", [
    ("knn", selectors.select_knn), ("medoid", selectors.select_medoid), ("dbscan", selectors.select_dbscan)])
def test_one_sample_cannot_agree(method, select):
    with pytest.raises(ValueError, match=f"method '{method}' needs at least 2 samples.*got 1"):
        select(np.ones((1, 1)))


def test_invalid_parameters():
    with pytest.raises(ValueError, match="k must be"):
        selectors.select_knn(CLUSTER, k=0)
    with pytest.raises(ValueError, match="min_samples"):
        selectors.select_dbscan(CLUSTER, min_samples=0)
    for p in (0, -5, 100.5):
        with pytest.raises(ValueError, match="eps_percentile"):
            selectors.select_dbscan(CLUSTER, eps_percentile=p)


def test_check_methods():
    assert selection.check_methods(["knn", "majority", "knn"], n=4) == ["knn", "majority"]
    assert selection.check_methods(["majority", "minact", "deepconf"], n=1) == ["majority", "minact", "deepconf"]
    with pytest.raises(ValueError, match="'nope'.*available: .*knn"):
        selection.check_methods(["knn", "nope"], n=4)
    with pytest.raises(ValueError, match="method 'dbscan' needs at least 2"):
        selection.check_methods(["minact", "dbscan"], n=1)
    assert set(selection.METHODS) == {"knn", "medoid", "dbscan", "minact", "random", "deepconf",
                                      "selfcert", "majority", "avg", "nex", "rad", "route-knn"}


# -- against the reference selectors -----------------------------------------------------------

NAD_REF = np.load(Path(__file__).parent / "data" / "nad_selectors.npz")


def _ref_cases():
    ptr, S_all, offs = NAD_REF["ptr"], NAD_REF["S"], 0
    for c, name in enumerate(NAD_REF["names"]):
        n = int(ptr[c + 1] - ptr[c])
        yield str(name), S_all[offs:offs + n * n].reshape(n, n), NAD_REF["sizes"][ptr[c]:ptr[c + 1]], \
            int(NAD_REF["k"][c]), [int(x) for x in NAD_REF["picks"][c]]
        offs += n * n


def _dbscan_difference(S, got, want):
    """Which kept rule explains a DBSCAN pick that differs from the reference's (None: none)."""
    labels = selectors.dbscan_labels(S)
    sizes = np.bincount(labels[labels >= 0])
    if (sizes == sizes.max()).sum() > 1 and labels[got] != labels[want]:
        return "equal clusters"  # neurotap: the tighter; the reference: the one holding the lowest index
    members = np.flatnonzero(labels == labels[got])
    scores = dict(zip(members, selectors.medoid_scores(S[np.ix_(members, members)])))
    if labels[want] == labels[got] and scores[want] == scores[got] == max(scores.values()) and got < want:
        return "medoid tie"  # neurotap: the lowest index; the reference: its search order
    return None


def test_picks_match_the_reference_selectors():
    """NAD_Next's KNNMedoidSelector, MedoidSelector, DBSCANMedoidSelector and MinActivationSelector
    on constructed tie cases and 120 random Jaccard matrices of small sets (tests/data/
    make_nad_reference.py): kNN, medoid and MinAct picks are all equal; DBSCAN's differ only where
    a documented rule of neurotap's applies."""
    kept = {"equal clusters": 0, "medoid tie": 0}
    n = 0
    for name, S, sizes, k, (knn, medoid, dbscan, minact) in _ref_cases():
        n += 1
        assert selectors.select_knn(S, k) == knn, name
        assert selectors.select_medoid(S) == medoid, name
        assert selectors.select_minact(sizes) == minact, name
        got = selectors.select_dbscan(S)
        if got != dbscan:
            why = _dbscan_difference(S, got, dbscan)
            assert why is not None, (name, got, dbscan)
            kept[why] += 1
    assert n == 129
    assert kept["equal clusters"] == 1 and kept["medoid tie"] == 4  # 124 of 129 DBSCAN picks equal


# -- confidence --------------------------------------------------------------------------------

def test_token_confidence():
    lp = np.array([[-0.1, -3.0, -5.0], [-1.0, -1.0, -1.0]])
    np.testing.assert_allclose(confidence.token_confidence(lp), [8.1 / 3, 1.0])


def test_lowest_group_confidence_finds_the_weakest_window():
    c = np.array([5.0, 5.0, 5.0, 1.0, 2.0, 5.0, 5.0])  # weakest pair of neighbours: 1, 2
    lp = -np.repeat(c[:, None], 4, axis=1)  # token confidence of row i is c[i]
    assert confidence.lowest_group_confidence(lp, window=2) == pytest.approx(1.5)
    assert confidence.lowest_group_confidence(lp, window=3) == pytest.approx(8 / 3)
    assert confidence.lowest_group_confidence(lp, window=7) == pytest.approx(c.mean())
    assert confidence.lowest_group_confidence(lp, window=32) == pytest.approx(c.mean())  # T < window
    assert confidence.lowest_group_confidence(np.zeros((0, 4))) == -math.inf
    # the window with the dip loses even when the overall mean is high
    assert confidence.select_deepconf([lp, -np.full((7, 4), 3.0)], window=2) == 1
    assert confidence.select_deepconf([lp, lp]) == 0


def test_self_certainty_is_kl_from_uniform():
    rng = np.random.default_rng(0)
    V, T = 7, 5
    logits = rng.normal(size=(T, V)) * 2
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    p = np.exp(logp)
    kl = np.sum((1 / V) * np.log((1 / V) / p), axis=1)  # KL(U || p), directly
    assert confidence.self_certainty(logp.mean(axis=1), V) == pytest.approx(kl.mean())
    assert confidence.self_certainty(np.full(3, -np.log(V)), V) == pytest.approx(0.0)  # uniform p
    assert confidence.self_certainty(np.zeros(0), V) == -math.inf
    flat = np.full(T, -np.log(V))
    assert confidence.select_selfcert([flat, logp.mean(axis=1), flat], V) == 1


# -- answers -----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("The answer is 1,234.", "1234"),
    ("Answer: -7", "-7"),
    ("3.50", "3.5"),
    ("no number", None),
    ("", None),
    ("It is 42.", "42"),
    ("First 12, then 30, so Answer: 68", "68"),
    ("x = 4.0", "4"),
    ("10-3 gives 7", "7"),
    ("10-3", "3"),
    ("Total: 1,234,567 apples", "1234567"),
    ("We get -0.5 degrees.", "-0.5"),
    ("Answer: $2,500", "2500"),
    ("a list 1,2,3", "3"),
])
def test_extract_answer(text, expected):
    assert answers.extract_answer(text) == expected


def test_is_correct():
    assert answers.is_correct("68", 68)
    assert answers.is_correct("2.5", "2.50")
    assert answers.is_correct("1234", "1,234")
    assert answers.is_correct("4", 4.0)
    assert answers.is_correct("-3", "-3")
    assert not answers.is_correct("67", 68)
    assert not answers.is_correct(None, 68)


def test_majority():
    assert answers.majority_vote(["5", None, "7", "5"]) == "5"
    assert answers.majority_index([None, "7", "5", "5"]) == 2
    assert answers.majority_vote(["5", "7"]) is None  # tie = failure
    assert answers.majority_index(["5", "7", None]) is None
    assert answers.majority_vote([None, None]) is None
    assert answers.majority_vote([]) is None
    assert answers.majority_vote(["9"]) == "9"


# -- tasks -------------------------------------------------------------------------------------

def test_arith_is_seeded_and_correct():
    a = tasks.arith(200, seed=3)
    assert a == tasks.arith(200, seed=3)
    assert a != tasks.arith(200, seed=4)
    assert [t.id for t in a[:2]] == ["arith-0000", "arith-0001"]
    n_diff = 0
    for t in a:
        x, y = map(int, re.findall(r"\d+", t.question))
        assert 10 <= x <= 99 and 10 <= y <= 99
        if "left" in t.question:
            n_diff += 1
            assert int(t.answer) == x - y >= 0, t
        else:
            assert int(t.answer) == x + y, t
    assert 0 < n_diff < len(a) / 2  # some differences, sums the majority
    assert len({t.question for t in a}) > 150  # varied templates


def test_prompt_and_resolve(tmp_path):
    t = tasks.arith(1)[0]
    prompt = tasks.format_prompt(t)
    assert t.question in prompt and "Answer:" in prompt
    assert tasks.format_prompt(t, "Q: {question} {json: 1}") == f"Q: {t.question} {{json: 1}}"
    assert tasks.resolve_tasks("arith", None, 0) == tasks.arith(50, 0)
    assert len(tasks.resolve_tasks("arith", 7, 0)) == 7
    p = tmp_path / "t.jsonl"
    p.write_text("\n".join(json.dumps({"id": i, "question": f"q{i}", "answer": i * 2}) for i in range(5)))
    got = tasks.resolve_tasks(str(p), 3, 0)
    assert got == [tasks.Task(str(i), f"q{i}", str(i * 2)) for i in range(3)]


@pytest.mark.parametrize("third, msg", [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"id": "c", "question": "q"}', "missing key 'answer'"),
    ('{"id": "c", "question": "", "answer": "1"}', "empty 'question'"),
    ('{"id": "c", "question": 5, "answer": "1"}', "'question' must be a string"),
    ('{"id": "a", "question": "q", "answer": "1"}', "duplicate id 'a'"),
])
def test_load_jsonl_errors_name_the_line(tmp_path, third, msg):
    p = tmp_path / "file.jsonl"
    p.write_text('{"id": "a", "question": "q", "answer": "1"}\n\n' + third + "\n")
    with pytest.raises(ValueError, match=f"file.jsonl:3: {msg}"):
        tasks.load_jsonl(p)


def test_load_jsonl_missing_and_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.jsonl"):
        tasks.load_jsonl(tmp_path / "nothere.jsonl")
    p = tmp_path / "empty.jsonl"
    p.write_text("\n  \n")
    with pytest.raises(ValueError, match="empty.jsonl"):
        tasks.load_jsonl(p)


# -- stats -------------------------------------------------------------------------------------

def test_bootstrap_ci():
    assert stats.bootstrap_ci(np.ones(20)) == (1.0, 1.0)
    assert stats.bootstrap_ci([0.3]) == (0.3, 0.3)
    x = np.array([1, 0, 1, 1, 0, 1, 0, 1, 1, 1])
    low, high = stats.bootstrap_ci(x, seed=1)
    assert low < x.mean() < high and 0 <= low and high <= 1
    assert stats.bootstrap_ci(x, seed=1) == (low, high)
    y = np.random.default_rng(0).random(30)  # continuous: 0/1 means are too coarse to tell seeds apart
    assert stats.bootstrap_ci(y, seed=1) != stats.bootstrap_ci(y, seed=2)
    with pytest.raises(ValueError):
        stats.bootstrap_ci([])
