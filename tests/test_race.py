"""The one NAD race (neurotap.methods.race.NadRace) that best_of_n, `neurotap eval` and the server
run: a winner handed off to a context of its own draws what it would have drawn in the race, its
record whole, and the race's cells are freed at the decision."""
import numpy as np
import pytest

from neurotap import nad
from neurotap.methods.race import NadRace, can_hand_off

NEEDS_MODEL = True  # every test here runs a real model (see conftest.py)
MSGS = [{"role": "user", "content": "Name three colors."}]
KW = dict(n=4, early_stop=8, max_tokens=40, seed=5, logprobs=2, temperature=0.9)


def race_to_end(model, hand_off):
    with NadRace(model, MSGS, hand_off=hand_off, **KW) as race:
        assert race.advance(100) == race.n_live  # never past the decision before it
        assert all(c.n_tokens <= 8 for c in race.candidates)
        pick = race.decide("minact")
        kv_after_decision = model.memory()["kv"]
        while race.advance(race.sample(pick).n_tokens + 5):  # the winner in steps, as the server streams
            pass
        return pick, race.sample(pick), race.tokens_sampled, race.handed_off, kv_after_decision


@pytest.fixture(params=["smollm2", "gemma3"])
def each_model(request):
    """Both shipped architectures (llama; gemma3 with its sliding-window layers' KV state)."""
    return request.getfixturevalue("model" if request.param == "smollm2" else "gemma")


def test_hand_off_draws_what_the_race_would_and_frees_the_losers(each_model):
    model = each_model
    p1, s1, t1, h1, kv1 = race_to_end(model, True)
    p2, s2, t2, h2, kv2 = race_to_end(model, False)
    # Gemma 3's sliding-window KV state does not move yet (can_hand_off): its winner stays in the race.
    assert h1 == can_hand_off(model) == (model.info.architecture != "gemma3") and not h2
    assert p1 == p2 and s1.index == p1 and s1.tokens == s2.tokens and s1.text == s2.text and s1.n_tokens > 8
    assert t1 == t2  # every candidate's first 8 draws plus the winner's rest, either way
    # The record of the handed-off winner covers all its tokens (the race's first 8, its own after).
    assert len(s1.token_logprob) == s1.n_tokens
    np.testing.assert_allclose(s1.token_logprob, s2.token_logprob, atol=1e-3)
    # ... and so do its top-k rows (the native record of a handed-off run is shaped by its own rows).
    assert s1.top_ids.shape == s2.top_ids.shape == (s1.n_tokens, 2)
    assert (s1.top_ids == s2.top_ids).all()
    np.testing.assert_allclose(s1.top_logprobs, s2.top_logprobs, atol=1e-3)
    # After the decision the handed-off race holds one sequence's cells, the kept race four.
    cells = model.info.kv_bytes_per_cell
    assert kv1 == kv2 if not h1 else kv1 < kv2 and kv2 - kv1 >= 3 * 256 * cells


def test_best_of_n_decides_early_on_gemma(gemma):
    best = nad.best_of_n(gemma, MSGS, n=3, method="knn", early_stop=8, max_tokens=24, seed=2)
    assert best.sample.n_tokens > 0 and len(best.candidates) == 3 and best.similarity.shape == (3, 3)


def test_race_checks_its_decision(model):
    with pytest.raises(ValueError, match="early_stop"):
        NadRace(model, MSGS, n=2, early_stop=50, max_tokens=40)
    with NadRace(model, MSGS, n=2, early_stop=4, max_tokens=8, seed=1) as race:
        race.advance()
        race.decide("minact")
        with pytest.raises(ValueError, match="decided already"):
            race.keep([0])
