"""Neuron Agreement Decoding (arXiv 2510.26277): pick one of N sampled answers by the agreement of
their activated-neuron sets (kNN, medoid, DBSCAN) or by how few neurons they activate (MinAct),
optionally deciding after the first B tokens and dropping the other N - 1 samples.

The sets come from the native "contributions" reducer (cpp/reducers/contribution.h); this module compares
them and registers NAD's selectors in the selection registry (neurotap.methods.selection).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence

import numpy as np

from .. import _native
from ..core.defaults import SAMPLE
from ..runtime.model import Model, Prompt
from ..runtime.sampling import Sample
from ..scoring.answers import extract_answer
from ..scoring.selectors import select_dbscan, select_knn, select_medoid, select_minact
from .selection import Method, Options, register, select


#: What NAD's selectors need the run to record.
CONTRIBUTIONS = ("contributions",)


def _chunks_for(samples: Sequence[Sample], tokens: Optional[int]) -> Optional[int]:
    if samples[0].contribution_sets is None:
        raise ValueError("these samples carry no activated-neuron sets (sample with reducers=('contributions',))")
    if tokens is None:
        return None
    chunk = samples[0].chunk
    if tokens % chunk:
        raise ValueError(f"a decision after {tokens} tokens needs chunks that divide it; the run used {chunk}-token chunks")
    return tokens // chunk


def _sets(samples: Sequence[Sample], tokens: Optional[int]) -> np.ndarray:
    chunks = _chunks_for(samples, tokens)
    return np.stack([s.contribution_set(chunks) for s in samples])


def similarity(samples: Sequence[Sample], tokens: Optional[int] = None) -> np.ndarray:
    """N x N Jaccard similarity of the samples' activated-neuron sets over their first `tokens`
    tokens (all by default)."""
    return _native.jaccard(_sets(samples, tokens))


def set_sizes(samples: Sequence[Sample], tokens: Optional[int] = None) -> np.ndarray:
    """Per sample, the number of neurons activated (by contribution) on any of its first `tokens` tokens."""
    return _native.popcount(_sets(samples, tokens))


register(Method("knn", "NAD: highest sum of the k largest neuron-set similarities to other samples",
                lambda s, o: select_knn(similarity(s, o.tokens), o.k), early=True, min_samples=2, reducers=CONTRIBUTIONS))
register(Method("medoid", "NAD: global medoid, highest total neuron-set similarity to all other samples",
                lambda s, o: select_medoid(similarity(s, o.tokens)), early=True, min_samples=2, reducers=CONTRIBUTIONS))
register(Method("dbscan", "NAD: medoid of the largest DBSCAN cluster of neuron-set distances 1 - S",
                lambda s, o: select_dbscan(similarity(s, o.tokens), o.eps_percentile, o.min_samples),
                early=True, min_samples=2, reducers=CONTRIBUTIONS))
register(Method("minact", "NAD: fewest activated neurons",
                lambda s, o: select_minact(set_sizes(s, o.tokens)), early=True, reducers=CONTRIBUTIONS))


def sampled_tokens(sample: Sample) -> int:
    """Tokens the sampler drew for this sample, its end-of-generation token included."""
    return sample.n_tokens + (sample.finish_reason in ("eos", "neat_exit"))


@dataclass
class BestOfN:
    """The answer NAD chose and what it cost."""

    text: str
    index: int
    method: str
    sample: Sample
    n: int
    early_stop: Optional[int]
    tokens_generated: int  # every token sampled by the run, all samples, end tokens included
    seconds: float
    similarity: Optional[np.ndarray] = None
    candidates: List[Sample] = field(default_factory=list)  # the N samples as they were at the decision

    @property
    def answer(self) -> Optional[str]:
        return extract_answer(self.text)


def check_early_stop(early_stop: Optional[int], max_tokens: int) -> None:
    if early_stop is None:
        return
    if early_stop < 1:
        raise ValueError(f"early_stop must be a positive number of tokens, got {early_stop}")
    if early_stop > max_tokens:
        raise ValueError(f"early_stop={early_stop} is longer than max_tokens={max_tokens}")


def decision_chunk(early_stop: Optional[int]) -> int:
    """Set chunk length that lets a decision after `early_stop` tokens read whole chunks."""
    return 32 if early_stop is None or early_stop % 32 == 0 else early_stop


def best_of_n(model: Model, prompt: Prompt, *, n: int = 16, method: str = "knn", early_stop: Optional[int] = 32,
              max_tokens: int = 256, seed: Optional[int] = SAMPLE.seed, k: int = 3, progress: Optional[bool] = False,
              **sampling: Any) -> BestOfN:
    """Sample n answers in parallel and keep the one `method` picks. With early_stop=B the pick
    is made after B tokens, the other n - 1 samples are stopped (their KV cells freed) and only
    the winner runs to the end; early_stop=None decides on complete answers."""
    from .race import NadRace, check_pick_method, race_logprobs, race_reducers  # race.py builds on this module

    check_pick_method(method, n, early_stop, max_tokens)
    t0 = time.perf_counter()
    with NadRace(model, prompt, n=n, early_stop=early_stop, max_tokens=max_tokens, seed=seed,
                 logprobs=race_logprobs([method], sampling.pop("logprobs", 0)), reducers=race_reducers([method]),
                 **sampling) as race:
        race.advance(progress=progress)
        pick = race.decide(method, k=k)
        race.advance(progress=progress)
        winner = race.sample(pick)
        S = race.similarity()
    return BestOfN(text=winner.text, index=pick, method=method, sample=winner, n=n, early_stop=early_stop,
                   tokens_generated=race.tokens_sampled, seconds=time.perf_counter() - t0, similarity=S,
                   candidates=race.candidates)


def early_stop_tokens(prefix: Sequence[Sample], final: Sequence[Sample], winner: int, early_stop: int) -> int:
    """Exact tokens an early-stopped run spends: every sample's first `early_stop` draws (fewer
    for samples that ended sooner) plus the winner's remaining draws."""
    first = sum(min(sampled_tokens(s), early_stop) for s in final)
    w = sampled_tokens(final[winner])
    return first + w - min(w, early_stop)


__all__ = ["select", "similarity", "set_sizes", "best_of_n", "BestOfN", "early_stop_tokens", "sampled_tokens",
           "check_early_stop", "decision_chunk", "Options"]
