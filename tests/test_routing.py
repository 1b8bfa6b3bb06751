"""RAD's routing scoring (neurotap.scoring.routing) against direct loops, on random routes."""
import numpy as np
import pytest

from neurotap.scoring.routing import (anchor_position, rad_window, routing_set, routing_state, select_rad,
                                      set_jaccard, weighted_jaccard)


def random_routes(rng, T=20, L=3, E=8, k=2):
    ids = np.stack([[rng.choice(E, k, replace=False) for _ in range(L)] for _ in range(T)]).astype(np.int32)
    w = rng.random((T, L, k)).astype(np.float32)
    return ids, w / w.sum(axis=2, keepdims=True)


def test_routing_state_is_the_mean_scattered_gate_weight():
    rng = np.random.default_rng(0)
    ids, w = random_routes(rng)
    E = 8
    got = routing_state(ids, w, E, 4, 12)
    want = np.zeros((3, E))
    for t in range(4, 12):
        for l in range(3):
            for j in range(2):
                want[l, ids[t, l, j]] += w[t, l, j]
    np.testing.assert_allclose(got, want.ravel() / 8, rtol=1e-6)
    assert routing_state(ids, w, E, 5, 5).sum() == 0  # an empty window


def test_weighted_jaccard_matches_its_definition():
    rng = np.random.default_rng(1)
    V = rng.random((5, 24)) * (rng.random((5, 24)) < 0.4)
    S = weighted_jaccard(V)
    for a in range(5):
        for b in range(5):
            assert S[a, b] == pytest.approx(np.minimum(V[a], V[b]).sum() / np.maximum(V[a], V[b]).sum())
    assert weighted_jaccard(np.zeros((2, 4)))[0, 1] == 1.0
    with pytest.raises(ValueError, match="non-negative"):
        weighted_jaccard(-V)


def test_set_jaccard_and_routing_sets():
    rng = np.random.default_rng(2)
    ids, _ = random_routes(rng, T=6)
    m = routing_set(ids, 8, stop=3)
    want = {(l, e) for t in range(3) for l in range(3) for e in ids[t, l]}
    assert set(map(tuple, np.argwhere(m.reshape(3, 8)))) == want
    M = rng.random((4, 30)) < 0.3
    S = set_jaccard(M)
    assert S[0, 1] == pytest.approx((M[0] & M[1]).sum() / (M[0] | M[1]).sum())
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        routing_set(ids + 8, 8)


def test_rad_picks_the_centre_of_the_dense_basin():
    rng = np.random.default_rng(3)
    centre = rng.random(40)
    basin = [np.clip(centre + rng.normal(0, 0.02, 40), 0, None) for _ in range(5)]
    stray = [rng.random(40) for _ in range(4)]
    V = np.stack(stray[:2] + basin + stray[2:])
    assert select_rad(V, k=3) in range(2, 7)


def test_anchor_and_window():
    text = "think think. The answer is \\boxed{42}"
    ends = np.cumsum([len(p) for p in ["think", " think.", " The", " answer", " is", " \\boxed{", "42", "}"]])
    pos = anchor_position(ends, text)
    assert pos == 5  # the token holding "\boxed{" (the last anchor)
    assert rad_window(8, pos, 16) == (5, 8)
    assert rad_window(30, None, 16) == (14, 30)
    assert anchor_position(ends, "no marker here") is None
    with pytest.raises(ValueError):
        rad_window(4, None, 0)
