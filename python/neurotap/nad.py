"""Neuron Agreement Decoding (arXiv 2510.26277): pick one of N sampled answers by the agreement of
their activated-neuron sets (kNN, medoid, DBSCAN) or by how few neurons they activate (MinAct),
optionally deciding after the first B tokens and dropping the other N - 1 samples.

The sets come from the native "contributions" reducer (cpp/contribution.h); this module only
compares them. Logprob baselines (DeepConf, self-certainty) and a seeded random pick share the
same interface so an evaluation can put them side by side.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, List, Optional, Sequence

import numpy as np

from . import _native
from .answers import majority_index, extract_answer
from .confidence import select_deepconf, select_selfcert
from .selectors import METHODS, check_methods, select_dbscan, select_knn, select_medoid, select_minact

if TYPE_CHECKING:
    from .model import Model
    from .sampling import Sample

#: Methods that pick one sample (avg is an evaluation baseline, not a pick).
PICK_METHODS = tuple(m for m in METHODS if m != "avg")
#: Methods that can decide on a prefix of the samples (early stopping).
EARLY_METHODS = ("knn", "medoid", "dbscan", "minact", "random", "deepconf", "selfcert")
LOGPROB_METHODS = ("deepconf", "selfcert")
TOP_LOGPROBS = 20  # DeepConf's k


def _chunks_for(samples: Sequence["Sample"], tokens: Optional[int]) -> Optional[int]:
    if tokens is None:
        return None
    chunk = samples[0].nad_chunk
    if samples[0].nad_bitsets is None:
        raise ValueError("these samples carry no activated-neuron sets (sample with reducers=('contributions',))")
    if tokens % chunk:
        raise ValueError(f"a decision after {tokens} tokens needs chunks that divide it; the run used {chunk}-token chunks")
    return tokens // chunk


def _sets(samples: Sequence["Sample"], tokens: Optional[int]) -> np.ndarray:
    chunks = _chunks_for(samples, tokens)
    return np.stack([s.nad_set(chunks) for s in samples])


def similarity(samples: Sequence["Sample"], tokens: Optional[int] = None) -> np.ndarray:
    """N x N Jaccard similarity of the samples' activated-neuron sets over their first `tokens`
    tokens (all by default)."""
    return _native.jaccard(_sets(samples, tokens))


def n_activated(samples: Sequence["Sample"], tokens: Optional[int] = None) -> np.ndarray:
    """Per sample, the number of neurons activated on any of its first `tokens` tokens."""
    return _native.popcount(_sets(samples, tokens))


def select(samples: Sequence["Sample"], method: str = "knn", *, tokens: Optional[int] = None, k: int = 3,
           eps_percentile: float = 30.0, min_samples: int = 3, window: int = 32, seed: int = 0,
           n_vocab: Optional[int] = None) -> Optional[int]:
    """Index of the sample `method` picks, looking only at each sample's first `tokens` tokens.

    knn / medoid / dbscan / minact use the activated-neuron sets; deepconf / selfcert the
    recorded logprobs (sample with logprobs=20); random a seeded draw; majority the first sample
    carrying the most frequent extracted answer (None on a tie or when no sample has an answer).
    """
    if method == "avg":
        raise ValueError("'avg' is an evaluation baseline (mean accuracy of all samples), not a pick")
    check_methods([method], len(samples))
    n = len(samples)
    if n == 0:
        raise ValueError("no samples to select from")
    if method in ("knn", "medoid", "dbscan"):
        S = similarity(samples, tokens)
        if method == "knn":
            return select_knn(S, k)
        if method == "medoid":
            return select_medoid(S)
        return select_dbscan(S, eps_percentile, min_samples)
    if method == "minact":
        return select_minact(n_activated(samples, tokens))
    if method == "random":
        return int(np.random.default_rng(seed).integers(n))
    if method in LOGPROB_METHODS:
        if any(s.top_logprobs is None for s in samples):
            raise ValueError(f"method '{method}' needs logprobs: sample with logprobs={TOP_LOGPROBS}")
        cut = slice(None) if tokens is None else slice(0, tokens)
        if method == "deepconf":
            return select_deepconf([s.top_logprobs[cut] for s in samples], window)
        if n_vocab is None:
            raise ValueError("selfcert needs n_vocab (the model's vocabulary size)")
        return select_selfcert([s.mean_logprob[cut] for s in samples], n_vocab)
    if method == "nex":
        if tokens is not None:
            raise ValueError("nex scores complete responses; it cannot decide early")
        from .nex import select_nex

        return select_nex([nex_response(s) for s in samples])
    if method == "majority":
        if tokens is not None:
            raise ValueError("majority votes on complete answers; it cannot decide early")
        return majority_index([extract_answer(s.text) for s in samples])
    raise AssertionError(method)


def nex_response(sample: "Sample", row: int = 32):
    """NEX's input from a sample's per-token activated sets (sampled with chunk=1): per 32-token
    row, each neuron's mass = the number of the row's tokens on which it was activated."""
    if sample.nad_bitsets is None or sample.nad_chunk != 1:
        raise ValueError("nex needs per-token activated sets: sample with reducers=('contributions',), chunk=1")
    T = sample.n_tokens
    bits = np.unpackbits(sample.nad_bitsets[:T].view(np.uint8), axis=1, bitorder="little")  # [T, N]
    R = (T + row - 1) // row
    mass = np.zeros((R, bits.shape[1]), np.float32)
    for r in range(R):
        mass[r] = bits[r * row:(r + 1) * row].sum(axis=0)
    return mass, np.array([min(row, T - r * row) for r in range(R)], dtype=np.int64)


def sampled_tokens(sample: "Sample") -> int:
    """Tokens the sampler drew for this sample, its end-of-generation token included."""
    return sample.n_tokens + (sample.finish_reason == "eos")


@dataclass
class BestOfN:
    """The answer NAD chose and what it cost."""

    text: str
    index: int
    method: str
    sample: "Sample"
    n: int
    early_stop: Optional[int]
    tokens_generated: int  # every token sampled by the run, all samples, end tokens included
    seconds: float
    similarity: Optional[np.ndarray] = None
    candidates: List["Sample"] = field(default_factory=list)  # the N samples as they were at the decision

    @property
    def answer(self) -> Optional[str]:
        return extract_answer(self.text)


def best_of_n(model: "Model", prompt: Any, *, n: int = 16, method: str = "knn", early_stop: Optional[int] = 32,
              max_tokens: int = 256, seed: Optional[int] = 0, k: int = 3, progress: Optional[bool] = False,
              **sampling: Any) -> BestOfN:
    """Sample n answers in parallel and keep the one `method` picks. With early_stop=B the pick
    is made after B tokens, the other n - 1 samples are stopped (their KV cells freed) and only
    the winner runs to the end; early_stop=None decides on complete answers."""
    if method == "avg":
        raise ValueError("'avg' is an evaluation baseline, not a pick; choose one of " + ", ".join(PICK_METHODS))
    check_methods([method], n)
    if early_stop is not None:
        if early_stop < 1:
            raise ValueError(f"early_stop must be a positive number of tokens, got {early_stop}")
        if early_stop > max_tokens:
            raise ValueError(f"early_stop={early_stop} is longer than max_tokens={max_tokens}")
        if method not in EARLY_METHODS:
            raise ValueError(f"method '{method}' cannot decide early; early-stopping methods: {', '.join(EARLY_METHODS)}")
    chunk = 32 if early_stop is None or early_stop % 32 == 0 else early_stop
    t0 = time.perf_counter()
    run = model.start_sampling(prompt, n=n, max_tokens=max_tokens, seed=seed, reducers=("contributions",),
                               chunk=chunk, logprobs=TOP_LOGPROBS if method in LOGPROB_METHODS else 0, **sampling)
    run.advance(early_stop, progress=progress)
    candidates = run.samples()
    pick = select(candidates, method, tokens=early_stop, k=k, seed=seed or 0, n_vocab=model.info.n_vocab)
    S = similarity(candidates, early_stop) if n >= 2 else None
    if pick is None:  # majority with no majority: the first sample, flagged by the caller's answer check
        pick = 0
    run.keep([pick])
    run.advance(progress=progress)
    winner = run.sample(pick)
    return BestOfN(text=winner.text, index=pick, method=method, sample=winner, n=n, early_stop=early_stop,
                   tokens_generated=run.tokens_sampled, seconds=time.perf_counter() - t0, similarity=S,
                   candidates=candidates)


def early_stop_tokens(prefix: Sequence["Sample"], final: Sequence["Sample"], winner: int, early_stop: int) -> int:
    """Exact tokens an early-stopped run spends: every sample's first `early_stop` draws (fewer
    for samples that ended sooner) plus the winner's remaining draws."""
    first = sum(min(sampled_tokens(s), early_stop) for s in final)
    w = sampled_tokens(final[winner])
    return first + w - min(w, early_stop)


__all__ = ["select", "similarity", "n_activated", "best_of_n", "BestOfN", "PICK_METHODS", "EARLY_METHODS",
           "early_stop_tokens", "sampled_tokens"]
