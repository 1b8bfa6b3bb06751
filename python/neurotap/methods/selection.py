"""The one registry of selection methods: every way to pick one of N samples, by name.

Each method reads one kind of evidence from the samples (neuron sets, logprobs, per-token sets
for NEX, the answers' text) and says whether it can decide on a prefix (early stopping). NAD's
selectors register from neurotap.methods.nad; the baselines and NEX are registered here from the
pure scoring functions. `avg` is an evaluation baseline (the mean accuracy of the N), listed so
that an evaluation can name it, but it picks nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..runtime.sampling import Sample
from ..scoring.answers import extract_answer, majority_index
from ..scoring.confidence import select_deepconf, select_selfcert
from ..scoring.nex import select_nex
from ..scoring.routing import WINDOW

TOP_LOGPROBS = 20  # DeepConf's k: what logprob methods need recorded


@dataclass(frozen=True)
class Options:
    """What a pick may use besides the samples."""

    tokens: Optional[int] = None  # decide on each sample's first `tokens` tokens (None: all)
    k: int = 3  # kNN's k
    eps_percentile: float = 30.0  # DBSCAN
    min_samples: int = 3  # DBSCAN
    window: int = 32  # DeepConf's sliding window
    route_window: int = WINDOW  # RAD: routing tokens read from the answer-opening anchor on
    seed: int = 0  # random
    n_vocab: Optional[int] = None  # self-certainty


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    pick: Optional[Callable[[Sequence[Sample], Options], Optional[int]]]  # None: avg, no pick
    early: bool = False  # can decide on a prefix of the samples
    needs_logprobs: bool = False  # the run must record logprobs=TOP_LOGPROBS
    min_samples: int = 1  # agreement methods compare samples: 2
    reducers: Tuple[str, ...] = ()  # what the run must record for it (a race adds NAD's sets anyway)


METHODS: Dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"selection method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def pick_methods() -> Tuple[str, ...]:
    """Methods that pick one sample (every one but avg)."""
    return tuple(m for m, spec in METHODS.items() if spec.pick is not None)


def early_methods() -> Tuple[str, ...]:
    """Methods that can decide on a prefix (early stopping)."""
    return tuple(m for m, spec in METHODS.items() if spec.early)


def check_methods(methods: Sequence[str], n: int) -> List[str]:
    """The methods, deduplicated in order, after checking they exist and fit n samples."""
    if isinstance(methods, str):
        methods = [methods]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(map(repr, unknown))}; available: {', '.join(METHODS)}")
    if not methods:
        raise ValueError(f"no selection method given; available: {', '.join(METHODS)}")
    for m in methods:
        if n < METHODS[m].min_samples:
            raise ValueError(f"method '{m}' needs at least {METHODS[m].min_samples} samples to measure agreement, got {n}")
    return list(dict.fromkeys(methods))


def select(samples: Sequence[Sample], method: str = "knn", *, tokens: Optional[int] = None, **options: Any
           ) -> Optional[int]:
    """Index of the sample `method` picks, looking only at each sample's first `tokens` tokens.

    Options: k (knn), eps_percentile and min_samples (dbscan), window (deepconf), seed (random),
    n_vocab (selfcert). majority returns None on a tie or when no sample has an answer.
    """
    check_methods([method], len(samples))
    spec = METHODS[method]
    if spec.pick is None:
        raise ValueError(f"'{method}' is an evaluation baseline (mean accuracy of all samples), not a pick")
    if len(samples) == 0:
        raise ValueError("no samples to select from")
    if tokens is not None and not spec.early:
        raise ValueError(f"'{method}' decides on complete answers; it cannot decide early")
    return spec.pick(samples, Options(tokens=tokens, **options))


def nex_input(sample: Sample, row: int = 32) -> Tuple[np.ndarray, np.ndarray]:
    """NEX's input from a sample's per-token activated sets (sampled with chunk=1): per 32-token
    row, each neuron's mass = the number of the row's tokens on which it was activated."""
    if sample.contribution_sets is None or sample.chunk != 1:
        raise ValueError("nex needs per-token activated sets: sample with reducers=('contributions',), chunk=1")
    T = sample.n_tokens
    keys = sample.contribution_sets.keys(0, T)  # per token, its sorted neuron keys
    R = (T + row - 1) // row
    mass = np.zeros((R, 64 * sample.contribution_sets.n_words), np.float32)  # N: the dense width
    for r in range(R):
        if keys[r * row:(r + 1) * row]:
            mass[r] = np.bincount(np.concatenate(keys[r * row:(r + 1) * row]), minlength=mass.shape[1])
    return mass, np.array([min(row, T - r * row) for r in range(R)], dtype=np.int64)


def _logprobs(samples: Sequence[Sample], method: str, o: Options, field: str) -> List[np.ndarray]:
    if any(getattr(s, field) is None for s in samples):
        raise ValueError(f"method '{method}' needs logprobs: sample with logprobs={TOP_LOGPROBS}")
    cut = slice(None) if o.tokens is None else slice(0, o.tokens)
    return [getattr(s, field)[cut] for s in samples]


def _selfcert(samples: Sequence[Sample], o: Options) -> int:
    if o.n_vocab is None:
        raise ValueError("selfcert needs n_vocab (the model's vocabulary size)")
    return select_selfcert(_logprobs(samples, "selfcert", o, "mean_logprob"), o.n_vocab)


register(Method("nex", "NEX: highest Good-Mass Fraction of explore/exploit neuron credit",
                lambda s, o: select_nex([nex_input(x) for x in s])))
register(Method("random", "baseline: a uniformly random sample",
                lambda s, o: int(np.random.default_rng(o.seed).integers(len(s))), early=True))
register(Method("deepconf", "baseline: highest lowest-group token confidence (DeepConf)",
                lambda s, o: select_deepconf(_logprobs(s, "deepconf", o, "top_logprobs"), o.window),
                early=True, needs_logprobs=True))
register(Method("selfcert", "baseline: highest self-certainty, mean KL(uniform || p) per token", _selfcert,
                early=True, needs_logprobs=True))
register(Method("majority", "baseline: majority vote over extracted answers (ties count as failures)",
                lambda s, o: majority_index([extract_answer(x.text) for x in s])))
register(Method("avg", "baseline: mean accuracy over all samples (expected accuracy of one sample)", None))

__all__ = ["Method", "Options", "METHODS", "register", "select", "check_methods", "pick_methods", "early_methods",
           "nex_input", "TOP_LOGPROBS"]
