"""One NAD race, the only one: N candidates sampled in parallel, a decision with a selector after
`early_stop` tokens (or on complete answers), the winner handed off to a context of its own (the
losers' KV cells freed at once) and continued, in steps its caller chooses.

best_of_n, `neurotap eval` and the server all run their races through NadRace:

    with NadRace(model, prompt, n=16, early_stop=32, max_tokens=256, seed=0) as race:
        race.advance()              # every candidate to the decision (32 tokens, or its end)
        pick = race.decide("knn")   # select, then hand the winner off and free the losers
        at = race.decision_at
        while race.advance(at := at + 16):  # the winner, in steps (a server streams them)
            ...
        winner = race.sample(pick)
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from ..core.defaults import SAMPLE
from ..runtime.chat import read_metadata
from ..runtime.model import Model, Prompt
from ..runtime.sampling import Sample, SampleRun
from .nad import check_early_stop, decision_chunk, set_sizes, similarity
from .selection import METHODS, TOP_LOGPROBS, check_methods, early_methods, pick_methods, select

_LOGPROB_FIELDS = ("token_logprob", "top_ids", "top_logprobs", "mean_logprob")


def check_pick_method(method: str, n: int, early_stop: Optional[int], max_tokens: int) -> None:
    """ValueError unless `method` can pick one of n samples, deciding after early_stop tokens."""
    check_methods([method], n)
    if METHODS[method].pick is None:
        raise ValueError(f"'{method}' is an evaluation baseline, not a pick; choose one of {', '.join(pick_methods())}")
    check_early_stop(early_stop, max_tokens)
    if early_stop is not None and not METHODS[method].early:
        raise ValueError(f"method '{method}' cannot decide early; early-stopping methods: {', '.join(early_methods())}")


@lru_cache(maxsize=None)
def _sliding_window(path: str, architecture: str) -> bool:
    return bool(read_metadata(path, (f"{architecture}.attention.sliding_window",)))


def can_hand_off(model: Model) -> bool:
    """Whether a live sample's KV state can move into a context of its own. Not for models with
    sliding-window attention layers (Gemma 3): the native hand-off cuts one sequence's state out
    of the race's per-sequence streams in the layout of a plain KV cache, and a one-sequence
    context refuses it ("could not restore the handed-off KV state"); their winners go on in the
    race's context, as before the hand-off existed."""
    return not _sliding_window(model.info.path, model.info.architecture)


def race_reducers(methods: Iterable[str]) -> Tuple[str, ...]:
    """What a race records for its selectors: NAD's neuron sets (always, unless every method reads
    something else, as RAD reads routing only), plus what each method needs."""
    need: List[str] = []
    for m in methods:
        need += [r for r in METHODS[m].reducers if r not in need]
    return tuple(need) if need else ("contributions",)


def race_logprobs(methods: Iterable[str], logprobs: int = 0) -> int:
    """Top log-probabilities a race records: what its selectors read, or what its caller asked for."""
    return max(int(logprobs), TOP_LOGPROBS if any(METHODS[m].needs_logprobs for m in methods) else 0)


class NadRace:
    """A race of n samples of one prompt, decided after `early_stop` tokens (None: on complete
    answers). hand_off=True (the default, where possible) moves a single live winner into a
    context of its own sized for its whole length: the race holds KV cells for early_stop tokens
    per sample only and frees them at the decision, and the winner goes on alone with the tap
    off. hand_off=False keeps the race's context (a caller that continues several picks
    together, as `neurotap eval`). NEAT watches the winner to its end: with neat= the winner
    goes on in the race's context, and so does it on a model `can_hand_off` refuses (sliding-
    window attention). The winner draws the same tokens either way, and a handed-off winner's
    log-probability records cover all its tokens (the race's rows, then its own: see `sample`)."""

    def __init__(self, model: Model, prompt: Prompt, *, n: int = 16, early_stop: Optional[int] = 32,
                 max_tokens: int = 256, seed: Optional[int] = SAMPLE.seed, logprobs: int = 0, chunk: Optional[int] = None,
                 hand_off: bool = True, reducers: Sequence[str] = ("contributions",), **sampling: Any):
        check_early_stop(early_stop, max_tokens)
        self.model, self.n, self.early_stop, self.max_tokens, self.seed = model, n, early_stop, max_tokens, seed
        self.hand_off = (hand_off and early_stop is not None and early_stop < max_tokens
                         and sampling.get("neat") is None and can_hand_off(model))
        self.decision_at = early_stop if early_stop is not None else max_tokens
        self._run: SampleRun = model.start_sampling(
            prompt, n=n, max_tokens=max_tokens, seed=seed, reducers=tuple(reducers),
            chunk=decision_chunk(early_stop) if chunk is None else chunk, logprobs=logprobs,
            kv_tokens=early_stop if self.hand_off else 0, **sampling)
        self._tail: Optional[SampleRun] = None  # the winner's run of one, once handed off
        self._race_spent = 0  # tokens the race drew up to the hand-off
        self._kept: Optional[List[int]] = None
        self._candidates: Optional[List[Sample]] = None

    # -- state ------------------------------------------------------------------------
    @property
    def decided(self) -> bool:
        return self._kept is not None

    @property
    def live_run(self) -> SampleRun:
        """The run that decodes now: the race, or the winner's own after the hand-off."""
        return self._tail if self._tail is not None else self._run

    @property
    def n_live(self) -> int:
        """Samples still generating (after a hand-off: the winner alone, or none)."""
        return self.live_run.n_live

    @property
    def handed_off(self) -> bool:
        return self._tail is not None

    @property
    def tokens_sampled(self) -> int:
        """Every token drawn so far: the race's (all candidates) and the winner's after the hand-off."""
        return self._race_spent + self._tail.tokens_sampled if self._tail is not None else self._run.tokens_sampled

    # -- decoding ---------------------------------------------------------------------
    def advance(self, until: Optional[int] = None, *, progress: Optional[bool] = False) -> int:
        """Decode until every live sample holds `until` tokens (default: the decision before it,
        max_tokens after it) or ends; before the decision never past it. Returns the samples still live."""
        limit = self.decision_at if not self.decided else self.max_tokens
        until = limit if until is None else min(int(until), limit)
        return self.live_run.advance(until, progress=progress)

    def cancel(self) -> None:
        """Stops the native decode loop in flight at its next step (safe from any thread)."""
        self.live_run.cancel()

    def finish_live(self, reason: str = "cancelled") -> None:
        """Ends every live sample with this finish reason (a cancelled request's)."""
        self.live_run.finish_live(reason)

    # -- the decision -----------------------------------------------------------------
    @property
    def candidates(self) -> List[Sample]:
        """The n samples as they were at the decision (read once, when the race reached it)."""
        if self._candidates is None:
            self._candidates = self._run.samples()
        return self._candidates

    def select(self, method: str, *, k: int = 3, seed: Optional[int] = None) -> int:
        """The candidate `method` picks at the decision (majority with no majority: 0, the first,
        flagged by the caller's answer check). seed: the selection's (default: the race's, or 0)."""
        pick = select(self.candidates, method, tokens=self.early_stop, k=k,
                      seed=(self.seed or 0) if seed is None else seed, n_vocab=self.model.info.n_vocab)
        return 0 if pick is None else pick

    def similarity(self) -> Optional[np.ndarray]:
        """N x N Jaccard similarity of the candidates' neuron sets at the decision (None for n = 1,
        or for a race that kept no neuron sets: see race_reducers)."""
        if self.n < 2 or self.candidates[0].contribution_sets is None:
            return None
        return similarity(self.candidates, self.early_stop)

    def set_sizes(self) -> Optional[np.ndarray]:
        """Neurons each candidate activated up to the decision (None for a race that kept no neuron sets)."""
        if self.candidates[0].contribution_sets is None:
            return None
        return set_sizes(self.candidates, self.early_stop)

    def keep(self, picks: Iterable[int]) -> None:
        """Stops every candidate but `picks` and continues those. One live pick is handed off (if
        the race was started for it): the race's context and the losers' cells are freed now.
        Call it once the race reached its decision (`advance()` returned)."""
        cands = self.candidates
        if self.decided:
            raise ValueError("the race was decided already")
        kept = sorted({int(i) for i in picks})
        if not kept or not all(0 <= i < self.n for i in kept):
            raise ValueError(f"picks must be candidate indices in [0, {self.n}), got {kept}")
        self._kept = kept
        if self.hand_off and len(kept) == 1 and cands[kept[0]].finish_reason == "":
            self._race_spent = self._run.tokens_sampled
            self._tail = self._run.continue_one(kept[0])
        else:
            self._run.keep(kept)

    def decide(self, method: str, *, k: int = 3, seed: Optional[int] = None) -> int:
        """Selects with `method` and keeps the pick alone (see `keep`); returns its index."""
        pick = self.select(method, k=k, seed=seed)
        self.keep([pick])
        return pick

    def sample(self, i: int) -> Sample:
        """Candidate i as it stands now (a handed-off winner with its whole record: the race's
        log-probabilities of its first tokens and its own after them)."""
        if self._tail is None or self._kept != [int(i)]:
            return self._run.sample(i)
        s, head = self._tail.sample(0), self.candidates[int(i)]
        s.index = int(i)
        tail_tokens = s.n_tokens - head.n_tokens  # the handed-off run records its own tokens only
        for name in _LOGPROB_FIELDS:
            a, b = getattr(head, name), getattr(s, name)
            if a is None or b is None:
                continue
            if len(b) != tail_tokens or b.shape[1:] != a.shape[1:]:
                raise RuntimeError(f"{name} of the handed-off sample has shape {b.shape} after the race's "
                                   f"{a.shape}: expected {tail_tokens} more rows")
            setattr(s, name, np.concatenate([a, b]))
        return s

    # -- lifetime ---------------------------------------------------------------------
    def close(self) -> None:
        """Stops what still runs and gives every context back (records stay readable)."""
        if self._tail is not None:
            self._tail.close()
        self._run.close()

    def __enter__(self) -> "NadRace":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = ["NadRace", "can_hand_off", "check_pick_method", "race_logprobs", "race_reducers"]
