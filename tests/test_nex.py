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


def test_preprocess_median_mad_two_rows():
    # y = log1p(nov) = [0, 1]; R < 3: minus the mean -> [-0.5, 0.5]; median 0, MAD 1.4826 * 0.5
    z = nex.preprocess(np.array([0.0, np.e - 1.0]))
    np.testing.assert_allclose(z, [-0.5 / 0.7413, 0.5 / 0.7413])


def test_preprocess_removes_log_trend_and_falls_back_to_std():
    t = np.arange(7, dtype=float)
    x = np.log1p(t)
    # residual r: four zeros (so MAD = 0), three values orthogonal to 1 and x, so the line fit keeps it
    a = np.array([1.0, 1.0, 1.0])
    xs = x[4:]
    b = np.cross(a, xs)  # orthogonal to both [1, 1, 1] and x[4:]
    r = np.concatenate([np.zeros(4), b / np.abs(b).max()])
    y = 0.3 + 0.7 * x + r
    z = nex.preprocess(np.expm1(y))
    np.testing.assert_allclose(z, r / r.std(), atol=1e-9)


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


def test_runs():
    assert nex.runs(np.array([1, 1, 0, 0, 0, 1])) == [(1, 0, 2), (0, 2, 5), (1, 5, 6)]
    assert nex.runs(np.zeros(0)) == []


# Two cycles, E E X X E E X X, 6 neurons, every row 32 tokens.
# Cycle 1: introduces {0, 1, 2}; X mass 5, of which 4 on them -> reuse 0.8; novelty E (2 + 1) / 2,
#   X (1 + 0) / 2 per 32 tokens -> consolidation 1 - 1/3 = 2/3.
# Cycle 2: introduces {4, 5}; X mass 5, of which 1 on them -> reuse 0.2; X novelty 0 -> consolidation 1.
# Median reuse 0.5: progress +0.3 (effective 0.3 * 2/3 = 0.2 each) and -0.3 (redundant 0.3 each).
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


def test_credit_two_cycles_by_hand():
    eff, red = nex.credit(CYCLES, CYCLE_STATES, np.full(8, 32))
    np.testing.assert_allclose(eff, [0.2, 0.2, 0.2, 0, 0, 0])
    np.testing.assert_allclose(red, [0, 0, 0, 0, 0.3, 0.3])


def test_credit_without_consolidation_is_redundant():
    m = np.column_stack([CYCLES, np.zeros((8, 3))])
    m[3, 6:9] = 1.0  # X of cycle 1 now introduces 3 more: novelty (1 + 3) / 2 > E's 3 / 2 -> c = 0
    # cycle 1 reuse 4 / 8 = 0.5, cycle 2 0.2: median 0.35, progress +0.15 but c = 0 -> redundant
    eff, red = nex.credit(m, CYCLE_STATES)
    np.testing.assert_allclose(eff, np.zeros(9))
    np.testing.assert_allclose(red, [0.15, 0.15, 0.15, 0, 0.15, 0.15, 0, 0, 0])


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
    # eff = [0.2, 0.4, 0.4, 0, 0.2, 0], red = [0.3, 0, 0, 0, 0.3, 0.6];
    # tanh(log(2/3)) = ((2/3)^2 - 1) / ((2/3)^2 + 1) = -5/13
    w = nex.neuron_weights(responses)
    np.testing.assert_allclose(w, [-5 / 13, 1, 1, 0, -5 / 13, -1], atol=1e-5)
    assert w[3] == 0.0
    # A's mass per neuron [9, 2, 1, 1, 2, 1]: GMF = 3 / (11 * 5/13 + 4) = 39 / 107; B mirrors A
    scores = nex.nex_scores(responses)
    np.testing.assert_allclose(scores, [39 / 107, 39 / 107, 1.0], atol=1e-5)
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
