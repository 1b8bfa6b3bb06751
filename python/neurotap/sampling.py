"""Parallel sampling: N answers to one prompt decoded in one batch, each with its own neuron
record reduced natively as it streams (see cpp/parallel_sampler.h)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from . import _native
from .errors import ContextError
from .params import positive_int, seed_value, stop_list
from .progress import run_with_progress

if TYPE_CHECKING:
    from .model import Model

REDUCERS = ("counts", "bitsets", "watch", "rows", "contributions")
CONTRIBUTION_VARIANTS = ("down", "gate")
_ROWS = {None: 0, "float32": 1, "float16": 2}


def _pad256(n: int) -> int:
    return (n + 255) // 256 * 256


@dataclass
class Sample:
    """One answer of a parallel run and what its reducers kept.

    Row j of the per-token arrays belongs to token j (the position that predicted it).
    `chunk_bitsets[c]` is the set of neurons (bit layer * n_ff + i) activated on any token of
    chunk c (tokens c*chunk .. c*chunk+chunk-1), packed little-endian in uint64 words.
    """

    index: int
    text: str
    tokens: List[int]
    finish_reason: str  # "eos", "length", "stop", "stopped", or "" while the sample is live
    active_counts: Optional[np.ndarray] = None  # int32 [n_tokens, n_layers]
    chunk_bitsets: Optional[np.ndarray] = None  # uint64 [n_chunks, n_words]
    watched: Optional[np.ndarray] = None  # float32 [n_tokens, n_watched]
    activations: Optional[np.ndarray] = None  # [n_tokens, n_layers, n_ff] with capture=
    token_logprob: Optional[np.ndarray] = None  # float32 [n_tokens] with logprobs=k
    top_ids: Optional[np.ndarray] = None  # int32 [n_tokens, k]
    top_logprobs: Optional[np.ndarray] = None  # float32 [n_tokens, k]
    mean_logprob: Optional[np.ndarray] = None  # float32 [n_tokens] mean log p over the vocabulary
    # NAD (reducer "contributions"): per chunk, the neurons activated by contribution (c > eta
    # within the layer's top 64) on any token of the chunk; per token eta and the number activated.
    nad_bitsets: Optional[np.ndarray] = None  # uint64 [n_chunks, n_words]
    nad_eta: Optional[np.ndarray] = None  # float32 [n_tokens]
    nad_active: Optional[np.ndarray] = None  # int32 [n_tokens]
    top_contrib_values: Optional[np.ndarray] = None  # float32 [n_tokens, n_layers, 64] with keep_top
    top_contrib_index: Optional[np.ndarray] = None  # int32 [n_tokens, n_layers, 64]
    nad_chunk: int = 0  # tokens per chunk of nad_bitsets
    neat_events: Optional[list] = None  # with neat=: (token, action 0/1/2 = continue/ban/exit, similarity, magnitude)
    neat_exit_at: int = -1  # token index where NEAT ended the reasoning, -1 if it did not

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def activated(self, chunks: Optional[int] = None) -> np.ndarray:
        """Union of the first `chunks` chunk bitsets (all by default): uint64 words."""
        if self.chunk_bitsets is None:
            raise ValueError("this run did not keep bitsets (reducers must include 'bitsets')")
        b = self.chunk_bitsets if chunks is None else self.chunk_bitsets[:chunks]
        return np.bitwise_or.reduce(b, axis=0) if len(b) else np.zeros(self.chunk_bitsets.shape[1], np.uint64)

    def n_activated(self, chunks: Optional[int] = None) -> int:
        return int(np.unpackbits(self.activated(chunks).view(np.uint8)).sum())

    def nad_set(self, chunks: Optional[int] = None) -> np.ndarray:
        """NAD's activated-neuron set over the first `chunks` chunks (all by default): uint64 words."""
        if self.nad_bitsets is None:
            raise ValueError("this run did not compute contributions (reducers must include 'contributions')")
        b = self.nad_bitsets if chunks is None else self.nad_bitsets[:chunks]
        return np.bitwise_or.reduce(b, axis=0) if len(b) else np.zeros(self.nad_bitsets.shape[1], np.uint64)


class SampleRun:
    """A parallel sampling run that can be advanced, pruned and continued.

    run = model.start_sampling(prompt, n=16)
    run.advance(32)          # every live sample now holds 32 tokens (or has ended)
    run.keep([best])         # stop the others and free their KV cells
    run.advance()            # continue the kept sample to the end
    """

    def __init__(self, model: "Model", ctx: Any, native: Any, max_tokens: int, chunk: int = 32):
        self._model = model
        self.chunk = chunk
        self._ctx = ctx
        self._native = native
        self.max_tokens = max_tokens

    @property
    def n(self) -> int:
        return self._native.n

    @property
    def n_live(self) -> int:
        return self._native.n_live

    @property
    def tokens_sampled(self) -> int:
        """Tokens sampled by all samples so far (end-of-generation tokens included)."""
        return self._native.tokens_sampled

    @property
    def decode_seconds(self) -> float:
        return self._native.decode_seconds

    @property
    def prompt_seconds(self) -> float:
        return self._native.prompt_seconds

    @property
    def decode_steps(self) -> int:
        return self._native.decode_steps


    def advance(self, until: Optional[int] = None, *, progress: Optional[bool] = False) -> int:
        """Decode until every live sample holds `until` tokens (default: max_tokens) or ends.
        Returns the number of samples still live."""
        until = self.max_tokens if until is None else int(until)
        if until <= 0:
            raise ValueError(f"until must be positive, got {until}")
        total = self.n_live * min(until, self.max_tokens)
        n_live = run_with_progress(lambda: self._native.advance(until), self._native.progress_tokens,
                                   self._native.cancel, total=max(total, 1), desc=f"sampling x{self.n}",
                                   enabled=progress, postfix=lambda: {"live": self._native.progress_live()})
        if n_live == 0:
            self._model._release_sampling_context(self._ctx)
        return n_live

    def stop(self, indices: Iterable[int]) -> None:
        """End these samples now and free their KV cells."""
        self._native.stop([int(i) for i in indices])

    def keep(self, indices: Iterable[int]) -> None:
        """Stop every sample not in `indices`."""
        keep = {int(i) for i in indices}
        for i in keep:
            if not 0 <= i < self.n:
                raise ValueError(f"sample index out of range: {i}")
        self.stop(i for i in range(self.n) if i not in keep)

    def sample(self, i: int) -> Sample:
        d = self._native.sample(int(i))
        return Sample(
            index=d["index"], text=d["text"].decode("utf-8", errors="replace"), tokens=list(d["tokens"]),
            finish_reason=d["finish_reason"], active_counts=d["active_counts"], chunk_bitsets=d["chunk_bitsets"],
            watched=d["watched"], activations=d["activations"], token_logprob=d.get("token_logprob"),
            top_ids=d.get("top_ids"), top_logprobs=d.get("top_logprobs"), mean_logprob=d.get("mean_logprob"),
            nad_bitsets=d.get("contrib_bitsets"), nad_eta=d.get("contrib_eta"), nad_active=d.get("contrib_active"),
            top_contrib_values=d.get("contrib_top_values"), top_contrib_index=d.get("contrib_top_index"),
            nad_chunk=self.chunk if d.get("contrib_bitsets") is not None else 0,
            neat_events=d.get("neat_events"), neat_exit_at=d.get("neat_exit_at", -1),
        )

    def samples(self) -> List[Sample]:
        return [self.sample(i) for i in range(self.n)]


def start(model: "Model", prompt: Any, *, n: int, max_tokens: int, temperature: float, top_p: float, top_k: int,
          min_p: float, seed: Optional[int], stop: Optional[Sequence[str]], reducers: Sequence[str], chunk: int,
          active_threshold: float, watch: Optional[Sequence[Tuple[int, int]]], capture: Optional[str],
          logprobs: int, tap: bool, ignore_eos: bool = False, contribution: str = "down",
          contribution_top: int = 64, eta_rank: int = 500, keep_top: bool = False, neat: Any = None) -> SampleRun:
    n = positive_int("n", n)
    max_tokens = positive_int("max_tokens", max_tokens)
    unknown = set(reducers) - set(REDUCERS)
    if unknown:
        raise ValueError(f"unknown reducers {sorted(unknown)}; available: {', '.join(REDUCERS)}")
    if "watch" in reducers and not watch:
        raise ValueError("the 'watch' reducer needs watch=[(layer, neuron), ...]")
    if capture not in _ROWS:
        raise ValueError(f"capture must be None, 'float32' or 'float16', got {capture!r}")
    if capture is not None and "rows" not in reducers:
        reducers = (*reducers, "rows")
    if "bitsets" in reducers and chunk < 1:
        raise ValueError(f"chunk must be at least 1 token, got {chunk}")
    if "contributions" in reducers:
        if contribution not in CONTRIBUTION_VARIANTS:
            raise ValueError(f"contribution must be one of {CONTRIBUTION_VARIANTS}, got {contribution!r}")
        if chunk < 1:
            raise ValueError(f"chunk must be at least 1 token, got {chunk}")
        positive_int("contribution_top", contribution_top)
        positive_int("eta_rank", eta_rank)
    if not 0 <= logprobs <= 100:
        raise ValueError(f"logprobs must be in [0, 100], got {logprobs}")
    stops = stop_list(stop)
    seed = seed_value(seed)
    ids = model.prompt_tokens(prompt)
    ctx = model._sampling_context(int(n), len(ids) + int(max_tokens))
    native = _native.SamplingRun(
        ctx, ids, int(n), int(max_tokens), float(temperature), float(top_p), int(top_k), float(min_p), int(seed),
        stops, bool(tap), "counts" in reducers, int(chunk) if "bitsets" in reducers else 0, float(active_threshold),
        [(int(layer), int(i)) for layer, i in (watch or [])] if "watch" in reducers else [],
        _ROWS[capture] if "rows" in reducers else 0, int(logprobs), bool(ignore_eos),
        int(chunk) if "contributions" in reducers else 0, str(contribution), bool(keep_top), int(contribution_top),
        int(eta_rank), neat)
    return SampleRun(model, ctx, native, int(max_tokens), int(chunk))


def plan_cells(n: int, need: int, max_cells: int) -> int:
    """Total KV cells for n per-sequence streams of `need` tokens; ContextError if over budget."""
    per_seq = _pad256(need)
    if n * per_seq > max_cells:
        fit_n = max_cells // per_seq
        fit_tokens = max_cells // n // 256 * 256
        raise ContextError(
            f"n={n} samples x {need} tokens (prompt + max_tokens, {per_seq} cells each after padding to 256) "
            f"need {n * per_seq} KV cells, beyond max_sample_cells={max_cells}: at most n={fit_n} samples of "
            f"this length fit, or {fit_tokens} tokens (prompt + max_tokens) per sample at n={n}; "
            f"load with a larger max_sample_cells to allow more")
    return n * per_seq
