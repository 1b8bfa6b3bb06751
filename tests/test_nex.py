"""NEX (arXiv 2602.05805) stages on constructed inputs whose results are known by hand. No model."""
import importlib.util
import os
import warnings

import numpy as np
import pytest

from neurotap import nex

needs_sklearn = pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="needs scikit-learn")


def _burst_response(pattern, n_neurons=None):
    """Row r activates pattern[r] neurons never seen before (mass 1), nothing else; 32-token rows."""
    n = n_neurons or sum(pattern)
    m = np.zeros((len(pattern), n))
    j = 0
    for r, k in enumerate(pattern):
        m[r, j:j + k] = 1.0
        j += k
    return m, np.full(len(pattern), 32)


BURST = [1] * 12 + [20] * 4 + [1] * 12
BURST_STATES = np.array([0] * 12 + [1] * 4 + [0] * 12)


def test_novelty_counts_first_activations_per_token():
    m = np.array([[1.0, 0.0, 0.0],
                  [2.0, 3.0, 0.0],   # neuron 1 new, neuron 0 already seen
                  [0.0, 1.0, 0.0],   # nothing new
                  [0.0, 0.0, 5.0]])  # neuron 2 new, in a 16-token last row
    nov = nex.novelty(m, np.array([32, 32, 32, 16]))
    np.testing.assert_allclose(nov, [1 / 32, 1 / 32, 0.0, 1 / 16])


def test_preprocess_constant_is_zeros():
    for n in (1, 2, 3, 10):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            z = nex.preprocess(np.full(n, 0.25))
        assert z.shape == (n,) and np.all(z == 0.0)
    assert nex.preprocess(np.zeros(0)).shape == (0,)


def test_preprocess_two_rows_fit_exactly():
    # (Before the reference alignment: centred on the mean and scaled by 1.4826 MAD.) The log-time
    # line goes through two points, so nothing is left; phases never segment under 3 rows anyway.
    z = nex.preprocess(np.array([0.0, np.e - 1.0]))
    np.testing.assert_array_equal(z, [0.0, 0.0])


def _off_trend(n, seed=0):
    """A residual orthogonal to [1, log1p(t)]: the least-squares line keeps it whole."""
    x = np.log1p(np.arange(n, dtype=float))
    X = np.column_stack([np.ones(n), x])
    v = np.random.default_rng(seed).normal(size=n)
    return x, v - X @ np.linalg.lstsq(X, v, rcond=None)[0]


def test_preprocess_removes_log_trend_and_scales_by_mad():
    x, r = _off_trend(9)
    r *= 0.1 / np.abs(r).max()
    z = nex.preprocess(np.expm1(0.3 + 0.7 * x + r))
    med = np.median(r)
    np.testing.assert_allclose(z, (r - med) / (np.median(np.abs(r - med)) + 1e-6), atol=1e-9)


def test_preprocess_zero_mad_is_left_unscaled():
    # (Before: divided by the std.) Four of seven residuals are 0, so the MAD is 0: the reference
    # returns r - median unscaled and decodes by its sign.
    t = np.arange(7, dtype=float)
    x = np.log1p(t)
    a = np.array([1.0, 1.0, 1.0])
    xs = x[4:]
    b = np.cross(a, xs)  # orthogonal to both [1, 1, 1] and x[4:]
    r = np.concatenate([np.zeros(4), b / np.abs(b).max()])
    y = 0.3 + 0.7 * x + r
    z = nex.preprocess(np.expm1(y))
    np.testing.assert_allclose(z, r, atol=1e-9)


def test_constant_novelty_is_all_exploit():
    # Every row brings 2 new neurons: the line fits exactly, the residuals are rounding noise taken
    # as 0 (a deliberate difference: the reference would decode the noise), the MAD is 0 and no
    # row is above 0.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        states = nex.phases(*_burst_response([2] * 10))
    np.testing.assert_array_equal(states, np.zeros(10))


@needs_sklearn
def test_burst_decodes_to_explore_exactly_on_burst_rows():
    m, t = _burst_response(BURST)
    np.testing.assert_array_equal(nex.phases(m, t), BURST_STATES)


@needs_sklearn
def test_higher_mean_state_is_explore_in_either_component_order():
    z = nex.preprocess(nex.novelty(*_burst_response(BURST)))
    means, variances = nex.fit_emissions(z)
    for order in ([0, 1], [1, 0]):
        s = nex.viterbi(z, means[order], variances[order])
        np.testing.assert_array_equal(s, BURST_STATES)


@pytest.mark.parametrize("z, expected", [
    ([-1, -1, -1, 1, -1, -1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 1, 1, 1]),  # short run -> previous run
    ([1, -1, -1, -1], [0, 0, 0, 0]),                                  # short first run -> next run
    ([-1, 1, -1, 1, 1], [1, 1, 1, 1, 1]),                             # merges cascade
])
def test_short_runs_are_merged(z, expected):
    # sharp emissions: without merging every row would keep its own state
    s = nex.viterbi(np.array(z, dtype=float), [-1.0, 1.0], [0.01, 0.01])
    np.testing.assert_array_equal(s, expected)
    np.testing.assert_array_equal(nex.viterbi(np.array(z, dtype=float), [-1.0, 1.0], [0.01, 0.01], min_run=1), np.array(z) > 0)


def test_short_runs_merge_in_one_pass():
    # As the reference: the first run takes the next row's label, the scan goes on from where the
    # run ended, and the merged run is not measured again ([0, 0] would be short for min_run 3).
    z = np.array([-1.0, 1.0, -1.0])
    np.testing.assert_array_equal(nex.viterbi(z, [-1.0, 1.0], [0.01, 0.01], min_run=3), [1, 1, 1])


def test_explore_is_the_first_state_on_equal_means():
    z = np.array([0.0, 0.0, 0.0])
    # both states emit alike, so the path stays in state 0 (the first best at the last row), and
    # state 0 is Explore: of equal means the first, as the reference's argmax (before: state 1)
    np.testing.assert_array_equal(nex.viterbi(z, [0.5, 0.5], [1.0, 1.0]), [1, 1, 1])


def test_runs():
    assert nex.runs(np.array([1, 1, 0, 0, 0, 1])) == [(1, 0, 2), (0, 2, 5), (1, 5, 6)]
    assert nex.runs(np.zeros(0)) == []


EPS = 1e-6


def f32_median(*xs):
    return float(np.median(np.array(xs, dtype=np.float32)))  # the reference's median reuse


# Two cycles, E E X X E E X X, 6 neurons, every row 32 tokens; novelty (new neurons per row)
# 2 1 1 0 2 0 0 0, median 0.5 (per 32 tokens): both Explore runs are above it.
# Cycle 1: introduces {0, 1, 2}; X mass 5, of which 4 on them -> reuse 4 / (5 + eps); novelty E
#   median 1.5, X 0.5 -> consolidation 1 - 0.5 / (1.5 + 32 eps).
# Cycle 2: introduces {4, 5}; X mass 5, of which 1 on them -> reuse 1 / (5 + eps); X novelty 0 ->
#   consolidation 1. Progress +-0.3 about the median: effective 0.3 x 2/3 (mass 1 each) and
#   redundant 0.3 each, up to the epsilons.
CYCLES = np.array([
    [1, 1, 0, 0, 0, 0],  # E: 0, 1 new
    [0, 0, 1, 0, 0, 0],  # E: 2 new
    [3, 0, 0, 1, 0, 0],  # X: 3 new
    [0, 1, 0, 0, 0, 0],  # X
    [0, 0, 0, 0, 1, 1],  # E: 4, 5 new
    [1, 0, 0, 0, 0, 0],  # E
    [3, 0, 0, 0, 1, 0],  # X
    [1, 0, 0, 0, 0, 0],  # X
], dtype=float)
CYCLE_STATES = np.array([1, 1, 0, 0, 1, 1, 0, 0])


def cycles_credit():
    r1, r2 = 4 / (5 + EPS), 1 / (5 + EPS)
    med = f32_median(r1, r2)
    c1 = 1 - (0.5 / 32) / (1.5 / 32 + EPS)
    return np.array([1, 1, 1, 0, 0, 0]) * (r1 - med) * c1, np.array([0, 0, 0, 0, 1, 1]) * (med - r2)


def test_credit_two_cycles_by_hand():
    eff, red = nex.credit(CYCLES, CYCLE_STATES, np.full(8, 32))
    want_eff, want_red = cycles_credit()
    np.testing.assert_allclose(eff, want_eff)
    np.testing.assert_allclose(red, want_red)
    np.testing.assert_allclose(eff, [0.2, 0.2, 0.2, 0, 0, 0], atol=1e-5)  # the rounded story above
    np.testing.assert_allclose(red, [0, 0, 0, 0, 0.3, 0.3], atol=1e-5)


def test_credit_reference_rules_by_hand():
    """The authors' crediting rules: (a) a neuron is credited by its mass in the Explore row that
    introduced it, (b) run slopes are medians, (c) a cycle whose Explore median slope is not above
    the response's median is skipped and left out of the median reuse; empty rows are dropped."""
    rows = [  # (neuron: mass) per row; novelty per row in the comment
        ({0: 2, 1: 1}, 1),          # E  2
        ({0: 1, 2: 3}, 1),          # E  1
        ({3: 1, 4: 1, 5: 1, 6: 1}, 1),  # E  4   -> E1 median 2 (mean 7/3)
        ({0: 3, 7: 1}, 0),          # X  1
        ({}, None),                 # nothing activated: dropped, no state
        ({1: 1, 2: 1}, 0),          # X  0   -> X1 median 0.5
        ({8: 1, 0: 1}, 1),          # E  1
        ({0: 1}, 1),                # E  0   -> E2 median 0.5: not above the median 1, skipped
        ({1: 1}, 0),                # X  0
        ({0: 1}, 0),                # X  0
        ({9: 2, 10: 2, 11: 2}, 1),  # E  3
        ({12: 1, 13: 1}, 1),        # E  2   -> E3 median 2.5
        ({0: 1, 9: 1}, 0),          # X  0
        ({0: 2}, 0),                # X  0   (novelty sorted: 0 0 0 0 0 0 1 1 1 2 2 3 4, median 1)
    ]
    m = np.zeros((len(rows), 14))
    for i, (row, _) in enumerate(rows):
        for j, v in row.items():
            m[i, j] = v
    states = np.array([s for _, s in rows if s is not None])
    t = np.full(len(rows), 32)
    np.testing.assert_array_equal(nex.novelty(m, t) * 32, [2, 1, 4, 1, 0, 1, 0, 0, 0, 3, 2, 0, 0])
    assert nex.cycles(states) == [(0, 3, 3, 5), (5, 7, 7, 9), (9, 11, 11, 13)]
    r1, r3 = 5 / (6 + EPS), 1 / (4 + EPS)  # cycle 1: X rows carry 6, 5 of it on 0..6; cycle 3: 4 and 1
    med = f32_median(r1, r3)  # cycle 2 left out
    c1 = 1 - (0.5 / 32) / (2 / 32 + EPS)
    want_eff = np.zeros(14)
    want_eff[:7] = np.array([2, 1, 3, 1, 1, 1, 1]) * (r1 - med) * c1  # masses in rows 0, 0, 1, 2, 2, 2, 2
    want_red = np.zeros(14)
    want_red[9:] = np.array([2, 2, 2, 1, 1]) * (med - r3)
    eff, red = nex.credit(m, states, t)
    np.testing.assert_allclose(eff, want_eff)
    np.testing.assert_allclose(red, want_red)
    assert eff[8] == red[8] == 0  # introduced by the skipped cycle
    with pytest.raises(ValueError, match="one value per retained row .13 of 14"):
        nex.credit(m, np.zeros(14, dtype=int), t)


def test_credit_without_consolidation_is_redundant():
    m = np.column_stack([CYCLES, np.zeros((8, 4))])
    m[3, 6:9] = 1.0  # X of cycle 1 now introduces 3 more: novelty (1 + 3) / 2 > E's 3 / 2 -> c = 0
    m[5, 9] = 1.0  # and E of cycle 2 one more, keeping it above the median novelty (1)
    r1, r2 = 4 / (8 + EPS), 1 / (5 + EPS)
    med = f32_median(r1, r2)  # progress +0.15 but c = 0 -> redundant; -0.15 -> redundant
    eff, red = nex.credit(m, CYCLE_STATES)
    np.testing.assert_array_equal(eff, np.zeros(10))
    np.testing.assert_allclose(red, np.array([1, 1, 1, 0, 0, 0, 0, 0, 0, 0]) * (r1 - med)
                               + np.array([0, 0, 0, 0, 1, 1, 0, 0, 0, 1]) * (med - r2))


def test_median_cycle_gets_no_credit():
    """A lone cycle is its own median: progress 0, no credit. The reference takes the median over
    float32 values but subtracts it from the unrounded reuse, so its progress is reuse -
    float32(reuse), a rounding-sized credit whose sign the rounding sets; reference_rounding=True
    reproduces that."""
    m = CYCLES[:4]
    eff, red = nex.credit(m, CYCLE_STATES[:4])  # one cycle
    assert not eff.any() and not red.any()
    eff, red = nex.credit(m, CYCLE_STATES[:4], reference_rounding=True)
    r = 4 / (5 + EPS)
    p = r - float(np.float32(r))
    assert p != 0 and abs(p) < 1e-7
    c = 1 - (0.5 / 32) / (1.5 / 32 + EPS)
    if p > 0:
        np.testing.assert_allclose(eff, [p * c] * 3 + [0] * 3)
        assert not red.any()
    else:
        np.testing.assert_allclose(red, [-p] * 3 + [0] * 3)
        assert not eff.any()


def test_credit_no_cycle_contributes_nothing():
    for states in ([0] * 8, [1] * 8, [0, 0, 0, 0, 1, 1, 1, 1]):
        eff, red = nex.credit(CYCLES, np.array(states))
        assert not eff.any() and not red.any()


def test_neuron_weights_and_gmf_by_hand(monkeypatch):
    swap = [4, 1, 2, 3, 0, 5]  # B is A with neurons 0 and 4 swapped
    a, b = CYCLES, CYCLES[:, swap]
    c = np.array([[0, 1, 1, 0, 0, 0], [0, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0]], dtype=float)
    fixed = {8: CYCLE_STATES, 3: np.zeros(3, dtype=int)}  # decoding is tested above; pin it here
    monkeypatch.setattr(nex, "phases", lambda m, t, rho=0.95: fixed[m.shape[0]])
    responses = [(a, np.full(8, 32)), (b, np.full(8, 32)), (c, np.full(3, 32))]
    # eff = [0.2, 0.4, 0.4, 0, 0.2, 0], red = [0.3, 0, 0, 0, 0.3, 0.6] up to the epsilons;
    # tanh(log(2/3)) = ((2/3)^2 - 1) / ((2/3)^2 + 1) = -5/13
    ea, ra = cycles_credit()
    eff, red = ea + ea[swap], ra + ra[swap]
    want = np.tanh(np.log((eff + EPS) / (red + EPS)))
    w = nex.neuron_weights(responses)
    np.testing.assert_allclose(w, want, rtol=1e-6)
    np.testing.assert_allclose(w, [-5 / 13, 1, 1, 0, -5 / 13, -1], atol=2e-5)
    assert w[3] == 0.0
    # A's mass per neuron [9, 2, 1, 1, 2, 1]: GMF = 3 / (11 * 5/13 + 4) = 39 / 107; B mirrors A
    mass = np.array([9, 2, 1, 1, 2, 1])
    gmf = mass @ np.maximum(want, 0) / (mass @ np.abs(want))
    scores = nex.nex_scores(responses)
    np.testing.assert_allclose(scores, [gmf, gmf, 1.0], rtol=1e-6)
    np.testing.assert_allclose(scores, [39 / 107, 39 / 107, 1.0], atol=2e-5)
    assert nex.select_nex(responses) == 2


def test_single_row_and_empty_responses_score_half():
    single = (np.array([[0.0, 2.0, 1.0]]), np.array([20]))
    empty = (np.zeros((0, 3)), np.zeros(0, dtype=int))
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        assert nex.phases(*single).tolist() == [0]
        assert nex.phases(*empty).shape == (0,)
        assert nex.good_mass_fraction(single[0], np.zeros(3)) == 0.5
        assert nex.good_mass_fraction(empty[0], np.array([1.0, -1.0, 0.5])) == 0.5
        scores = nex.nex_scores([single, empty])
    assert scores.tolist() == [0.5, 0.5]
    assert nex.select_nex([single, empty]) == 0  # tie -> lowest index


@needs_sklearn
def test_select_nex_picks_known_best():
    # G: two bursts. Neurons of burst 1 (A) carry the Exploit run after it; those of burst 2 (B)
    # are dropped. P is one row on B neurons, Q one row on A neurons: too short to be credited.
    pattern = [1] * 8 + [10] * 4 + [1] * 10 + [10] * 4 + [1] * 10
    n = sum(pattern)
    g, t = _burst_response(pattern, n)
    a_cols = np.arange(8, 48)
    b_cols = np.arange(58, 98)
    g[12:22, a_cols] = 0.5  # reuse A after burst 1
    np.testing.assert_array_equal(nex.phases(g, t), [0] * 8 + [1] * 4 + [0] * 10 + [1] * 4 + [0] * 10)
    p = np.zeros((1, n))
    p[0, b_cols] = 1.0
    q = np.zeros((1, n))
    q[0, a_cols] = 1.0
    responses = [(g, t), (p, np.array([32])), (q, np.array([32]))]
    w = nex.neuron_weights(responses)
    assert np.all(w[a_cols] > 0.99) and np.all(w[b_cols] < -0.99)
    scores = nex.nex_scores(responses)
    assert scores[1] == 0.0 and scores[2] == 1.0 and 0.0 < scores[0] < 1.0
    assert nex.select_nex(responses) == 2


def test_plot_phases_writes_png_atomically(tmp_path):
    pytest.importorskip("matplotlib")
    m, t = _burst_response(BURST)
    out = tmp_path / "phases.png"
    nex.plot_phases(nex.novelty(m, t), BURST_STATES, out, title="burst")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(tmp_path) == ["phases.png"]
