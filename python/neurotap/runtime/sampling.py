"""Parallel sampling: N answers to one prompt decoded in one batch, each with its own neuron
record reduced natively as it streams (see cpp/run/run.h). A single generation is a run of one."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .. import _native
from ..core.errors import ContextError
from ..core.params import positive_int, seed_value, stop_list
from ..core.progress import run_with_progress
from .pool import Lease

#: What a run can keep per sample (see Sample for the arrays each fills).
REDUCERS = ("counts", "active_sets", "watch", "rows", "contributions", "routing")
#: Every reason a sample can end with (TokenRecord.finish_reason; "" while it is live), as the
#: native decode loop names them (cpp/runtime/decode_loop.h, Finish).
FINISH_REASONS = ("eos", "length", "stop", "stopped", "cancelled", "neat_exit", "neureasoner_exit")
CONTRIBUTION_VARIANTS = ("down", "gate")
#: TransformerLens-style names of what the tap can read, per layer l (blocks.{l}.<hook>).
HOOKS = {
    "mlp.hook_post": "activations",        # input of the down projection: act(gate) * up, [n_ff]
    "ln2.hook_normalized": "norm_inputs",  # the normed FFN input (ffn_norm), [n_embd]
    "hook_resid_post": "residuals",        # the residual stream after the block (l_out), [n_embd]
    "mlp.hook_router_probs": "router_probs",  # MoE: the router's output (ffn_moe_probs), [n_expert]
}
_ROWS = {None: 0, "float32": 1, "f32": 1, "float16": 2, "f16": 2}


def _pad256(n: int) -> int:
    return (n + 255) // 256 * 256


def rows_mode(capture: Optional[str]) -> int:
    key = capture.lower() if isinstance(capture, str) else capture
    if key not in _ROWS:
        raise ValueError(f"capture must be None, 'float32' or 'float16', got {capture!r}")
    return _ROWS[key]


def check_hooks(hooks: Sequence[str]) -> List[str]:
    out = []
    for h in hooks:
        name = h.split(".", 2)[2] if h.startswith("blocks.") and h.count(".") >= 2 else h
        if name.startswith("{l}."):
            name = name[4:]
        if name not in HOOKS:
            raise ValueError(f"unknown hook {h!r}; the tap reads: {', '.join('blocks.{l}.' + k for k in HOOKS)}")
        out.append(name)
    return out


class ActivationCache(dict):
    """Captured tensors by TransformerLens-style name: cache["blocks.3.mlp.hook_post"] is
    [n_tokens, n_ff] (row j: the position that predicts token j); cache.stack("mlp.hook_post")
    is [n_tokens, n_layers, width]."""

    def __init__(self, stacked: Dict[str, np.ndarray]):
        super().__init__()
        self._stacked = stacked
        for hook, arr in stacked.items():
            for layer in range(arr.shape[1]):
                self[f"blocks.{layer}.{hook}"] = arr[:, layer]

    def stack(self, hook: str) -> np.ndarray:
        if hook not in self._stacked:
            raise KeyError(f"{hook!r} was not captured (captured: {', '.join(self._stacked) or 'nothing'})")
        return self._stacked[hook]


def cache_of(d: Dict[str, Any]) -> ActivationCache:
    return ActivationCache({hook: d[field] for hook, field in HOOKS.items() if d.get(field) is not None})


@dataclass
class TokenRecord:
    """What every run records of one sequence: its tokens and text, why it ended, and the neuron
    record its reducers kept. Row j of the per-token arrays belongs to token j: the FFN state of the
    position that predicted it (the prompt's last position for j = 0)."""

    text: str = ""
    tokens: List[int] = field(default_factory=list)
    # The text's UTF-8 bytes as generated; `text` decodes them with errors="replace" (a run cut
    # short may end inside a character, and a live one usually does now and then).
    text_bytes: bytes = b""
    finish_reason: str = ""  # "eos", "length", "stop", "stopped", "cancelled", "neat_exit", "neureasoner_exit"; "" while live
    eog_token: int = -1  # the end-of-generation token that ended it (finish "eos" or "neat_exit")
    # Bytes of the UTF-8 text after each token (the text of tokens [0, j] is text_bytes[:piece_end[j]]).
    piece_end: Optional[np.ndarray] = None  # uint32 [n_tokens]
    # Neurons with activation > active_threshold, per token and layer ("counts"; generate: tap on).
    active_counts: Optional[np.ndarray] = None  # int32 [n_tokens, n_layers]
    # Full rows, with capture= / hooks= (see `cache`).
    activations: Optional[np.ndarray] = None  # [n_tokens, n_layers, n_ff]: blocks.{l}.mlp.hook_post
    norm_inputs: Optional[np.ndarray] = None  # float32 [n_tokens, n_layers, n_embd]: blocks.{l}.ln2.hook_normalized
    residuals: Optional[np.ndarray] = None  # float32 [n_tokens, n_layers, n_embd]: blocks.{l}.hook_resid_post
    # Mixture-of-experts models. hooks=["mlp.hook_router_probs"]: the router's output per expert
    # (softmax probabilities; gpt-oss: its biased logits, which it softmaxes over the selected).
    router_probs: Optional[np.ndarray] = None  # float32 [n_tokens, n_layers, n_expert]
    # The "routing" reducer: the experts each token's layer ran (the router's order, best first), the
    # gate weights their outputs were multiplied by, and the shared expert's gate (Qwen2-MoE).
    routing_ids: Optional[np.ndarray] = None  # int32 [n_tokens, n_layers, n_expert_used]
    routing_weights: Optional[np.ndarray] = None  # float32 [n_tokens, n_layers, n_expert_used]
    shexp_gate: Optional[np.ndarray] = None  # float32 [n_tokens, n_layers]
    # NEAT decisions, _native.NeatEvent records: .token, .action (0/1/2; .action_name continue/ban/exit),
    # .similarity, .magnitude (each also reads as that tuple: e[1] is the action).
    neat_events: list = field(default_factory=list)
    neat_exit_at: int = -1  # token index where NEAT ended the reasoning, -1 if it did not
    # NeuReasoner: detections and actions, _native.NeuReasonerEvent records: .token, .level (0/1/2;
    # .level_name intra/inter/instance), .action (0/1/2/3; .action_name none/resample/redirect/exit),
    # .probability, .rollback_to (tokens kept, or -1), .seed (the new seed after a rollback).
    neureasoner_events: list = field(default_factory=list)
    neureasoner_exit_at: int = -1  # tokens held when NeuReasoner ended the reasoning, -1 if it did not
    neureasoner_signals: Optional[np.ndarray] = None  # float32 [n_tokens, 3]: each level's MoN signal
    neureasoner_probs: Optional[np.ndarray] = None  # float32 [n_tokens, 3]: detector P(failure), NaN before a full window
    neureasoner_contributions: Optional[np.ndarray] = None  # float32 [n_tokens, n_ff + n_head] (calibration record)

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def last_token(self) -> int:
        """The newest token, -1 before the first."""
        return self.tokens[-1] if self.tokens else -1

    @property
    def cache(self) -> ActivationCache:
        """The captured tensors by TransformerLens-style name (blocks.{l}.mlp.hook_post, ...)."""
        return cache_of(self.__dict__)


@dataclass
class Sample(TokenRecord):
    """One answer of a parallel run and what its reducers kept.

    A set is over all n_layers x n_ff neurons (key layer * n_ff + i). `*_sets` are ChunkSets, kept
    compact (each chunk as the neurons it adds and those it shares with earlier chunks, Rice-coded
    or as bitmaps, whichever is smaller); `*_sets[c]` is chunk c (tokens c*chunk .. c*chunk+chunk-1)
    as a dense bitset, packed little-endian in uint64 words (bit layer * n_ff + i), `*_sets[a:b]` and
    np.asarray(*_sets) [chunks, n_words] of them; `keys(a, b)` gives each chunk's sorted keys and
    `union(k)` the first k chunks' union without the dense form per chunk. A dense uint64
    [n_chunks, n_words] array passed in is encoded (ChunkSets.from_dense).
    """

    index: int = 0
    # "active_sets": per chunk, the neurons with activation > active_threshold on any of its tokens.
    active_sets: Optional[_native.ChunkSets] = None  # [n_chunks] sets
    # "watch": the activations of the watched (layer, neuron) pairs.
    watched: Optional[np.ndarray] = None  # float32 [n_tokens, n_watched]
    # logprobs=k
    token_logprob: Optional[np.ndarray] = None  # float32 [n_tokens]
    top_ids: Optional[np.ndarray] = None  # int32 [n_tokens, k]
    top_logprobs: Optional[np.ndarray] = None  # float32 [n_tokens, k]
    mean_logprob: Optional[np.ndarray] = None  # float32 [n_tokens] mean log p over the vocabulary
    # "contributions" (NAD): per chunk, the neurons activated by contribution (c > eta within the
    # layer's top 64) on any of its tokens; per token eta and how many were activated.
    contribution_sets: Optional[_native.ChunkSets] = None  # [n_chunks] sets
    contribution_eta: Optional[np.ndarray] = None  # float32 [n_tokens]
    contribution_counts: Optional[np.ndarray] = None  # int32 [n_tokens]
    contribution_top_values: Optional[np.ndarray] = None  # float32 [n_tokens, n_layers, 64] with keep_top
    contribution_top_index: Optional[np.ndarray] = None  # int32 [n_tokens, n_layers, 64]
    chunk: int = 0  # tokens per chunk of the sets

    def __post_init__(self) -> None:
        for name in ("active_sets", "contribution_sets"):
            sets = getattr(self, name)
            if sets is not None and not isinstance(sets, _native.ChunkSets):
                setattr(self, name, _native.ChunkSets.from_dense(np.asarray(sets, dtype=np.uint64)))

    @staticmethod
    def _union(sets: Optional[_native.ChunkSets], chunks: Optional[int], reducer: str) -> np.ndarray:
        if sets is None:
            raise ValueError(f"this run did not keep these sets (reducers must include {reducer!r})")
        return sets.union(chunks)

    def active_set(self, chunks: Optional[int] = None) -> np.ndarray:
        """Neurons with activation > threshold on any of the first `chunks` chunks (all by default)."""
        return self._union(self.active_sets, chunks, "active_sets")

    def contribution_set(self, chunks: Optional[int] = None) -> np.ndarray:
        """NAD's activated neurons over the first `chunks` chunks (all by default): uint64 words."""
        return self._union(self.contribution_sets, chunks, "contributions")


def record_fields(cls: type, d: Dict[str, Any]) -> Dict[str, Any]:
    """The fields of record class `cls` found in a native run's sample dict (text decoded)."""
    out = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
    out["text"] = d["text"].decode("utf-8", errors="replace")
    if "text_bytes" in cls.__dataclass_fields__:
        out["text_bytes"] = bytes(d["text"])
    out["tokens"] = list(d["tokens"])
    return out


def sample_from(d: Dict[str, Any], chunk: int) -> Sample:
    return Sample(chunk=chunk, **record_fields(Sample, d))


@dataclass
class TextView:
    """A live sample as a stream reads it each step: its text and where it stands, none of its
    records (a Sample copies all of them; see stream_view)."""

    index: int
    text: str
    text_bytes: bytes  # as generated (text: decoded with errors="replace")
    n_tokens: int
    last_token: int  # -1 before the first
    finish_reason: str  # "" while live
    token_logprob: None = None  # none recorded: a run that records them is read as whole Samples


def stream_view(native: Any, i: int, chunk: int) -> Union[TextView, Sample]:
    """Sample i of a native run as a stream reads it: its TextView, or the whole Sample when the run
    records log-probabilities (a stream sends them with each token)."""
    text, n_tokens, last, finish, logprobs = native.stream_view(int(i))
    if logprobs:
        return sample_from(native.sample(int(i)), chunk)
    return TextView(int(i), text.decode("utf-8", errors="replace"), bytes(text), n_tokens, last, finish)


def _native_attr(name: str, doc: str) -> property:
    return property(lambda self: getattr(self._native, name), doc=doc)


class SampleRun:
    """A parallel sampling run that can be advanced, pruned and continued.

    run = model.start_sampling(prompt, n=16)
    run.advance(32)          # every live sample now holds 32 tokens (or has ended)
    run.keep([best])         # stop the others and free their KV cells
    run.advance()            # continue the kept sample to the end

    The run holds its context alone until every sample has ended (or `close()`), then gives it
    back to the model's pool, once. A run started with `kv_tokens=B` holds KV cells for B tokens per
    sample only; `continue_one(i)` then moves sample i into a context of its own for the rest.
    """

    def __init__(self, lease: Lease, native: Any, max_tokens: int, chunk: int = 32, *, pool: Any = None,
                 options: Any = None, on_start: Any = None):
        self._on_start = on_start  # called once with the prompt cells reused, when the run started
        self._lease = lease
        self._native = native
        self.chunk = chunk
        self.max_tokens = max_tokens
        self._pool = pool
        self._options = options

    @property
    def shares_prompt(self) -> bool:
        """Whether the samples share the prompt's KV cells (one stream) instead of each holding a copy."""
        return bool(self._lease.ctx.kv_unified) and self.n > 1

    n = _native_attr("n", "samples in the run")
    n_live = _native_attr("n_live", "samples still generating")
    n_prompt = _native_attr("n_prompt", "prompt tokens")
    n_reused = _native_attr("n_reused", "prompt tokens whose KV cells were reused instead of decoded")
    tokens_sampled = _native_attr("tokens_sampled", "tokens drawn by all samples, end-of-generation tokens included")
    decode_steps = _native_attr("decode_steps", "batched decode steps after the prompt")
    prompt_seconds = _native_attr("prompt_seconds", "seconds decoding the prompt")
    decode_seconds = _native_attr("decode_seconds", "seconds in the decode loop, sampling included")
    sample_seconds = _native_attr("sample_seconds", "the part of decode_seconds spent sampling")
    contribution_stats = _native_attr("contribution_stats", "the contribution pass: tokens, cache hits, seconds")

    def advance(self, until: Optional[int] = None, *, progress: Optional[bool] = False) -> int:
        """Decode until every live sample holds `until` tokens (default: max_tokens) or ends.
        Returns the number of samples still live."""
        until = self.max_tokens if until is None else int(until)
        if until <= 0:
            raise ValueError(f"until must be positive, got {until}")
        if self._lease.released:
            return 0  # ended or closed: nothing may decode in a context given back
        total = self.n_live * min(until, self.max_tokens)
        try:
            n_live = run_with_progress(lambda: self._native.advance(until), self._native.progress_tokens,
                                       total=max(total, 1), desc=f"sampling x{self.n}", enabled=progress,
                                       postfix=lambda: {"live": self._native.progress_live()})
        finally:
            if self._on_start is not None and self._native.started:
                on_start, self._on_start = self._on_start, None
                on_start(self._native.n_reused)
        if n_live == 0:
            self._lease.release()
        return n_live

    def stop(self, indices: Iterable[int]) -> None:
        """End these samples now and free their KV cells."""
        self._native.stop([int(i) for i in indices])
        if self._native.n_live == 0:
            self._lease.release()

    def keep(self, indices: Iterable[int]) -> None:
        """Stop every sample not in `indices`."""
        keep = {int(i) for i in indices}
        for i in keep:
            if not 0 <= i < self.n:
                raise ValueError(f"sample index out of range: {i}")
        self.stop(i for i in range(self.n) if i not in keep)

    def cancel(self) -> None:
        """Stop the decode loop in flight at its next step; safe from another thread (a server's
        client that went away). The next `advance` clears the flag: keep your own between calls."""
        self._native.cancel()

    def finish_live(self, reason: str = "cancelled") -> None:
        """End every live sample with this finish reason (only "cancelled"); records stay readable."""
        self._native.finish_live(reason)

    def close(self) -> None:
        """Stop every live sample and give the context back (records stay readable)."""
        if not self._lease.released:
            self._native.stop(list(range(self.n)))
            self._lease.release()

    def continue_one(self, i: int) -> "SampleRun":
        """Move live sample i into a context of its own, sized for its whole length, and end this
        run (its other samples stop; its context is freed, not kept for reuse: a race's cells are
        not needed again). The returned run of one continues sample i with the tap off and draws
        exactly the tokens it would have drawn here; its samples hold the tokens from the start."""
        if self._lease.released or self._pool is None:
            raise ValueError("this run has ended (or was not started by a model): nothing to continue")
        handoff = self._native.hand_off(int(i))
        # The race's context goes first (the handoff holds the winner's KV state): at reasoning
        # length the two contexts would otherwise be held together, the peak of both.
        self._native.stop(list(range(self.n)))
        self._lease.release(keep=False)
        lease = self._pool.acquire(1, self.n_prompt + self.max_tokens)
        try:
            native = _native.Run.continue_from(lease.ctx, handoff, self._options)  # its prompt is in the handoff
        except BaseException:
            lease.release()
            raise
        return SampleRun(lease, native, self.max_tokens, self.chunk, pool=self._pool, options=self._options)

    def __enter__(self) -> "SampleRun":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def sample(self, i: int) -> Sample:
        return sample_from(self._native.sample(int(i)), self.chunk)

    def stream_view(self, i: int) -> Union[TextView, Sample]:
        """Sample i as a stream reads it each step (see `stream_view`)."""
        return stream_view(self._native, i, self.chunk)

    def samples(self) -> List[Sample]:
        return [self.sample(i) for i in range(self.n)]


def run_options(*, n: int, max_tokens: int, temperature: float, top_p: float, top_k: int, min_p: float,
                seed: Optional[int], stop: Any, reducers: Sequence[str], chunk: int = 32,
                active_threshold: float = 0.0, watch: Optional[Sequence[Tuple[int, int]]] = None,
                capture: Optional[str] = None, hooks: Sequence[str] = (), logprobs: int = 0, tap: bool = True,
                ignore_eos: bool = False, contribution: str = "down", contribution_top: int = 64,
                eta_rank: int = 500, keep_top: bool = False, neat: Any = None, neureasoner: Any = None,
                forced: Sequence[int] = (), seed_per_sample: bool = True,
                logit_bias: Optional[Mapping[int, float]] = None) -> Any:
    """Checks a run's parameters and returns the native options (one place for generate and sample)."""
    o = _native.RunOptions()
    o.n = positive_int("n", n)
    o.max_tokens = positive_int("max_tokens", max_tokens)
    unknown = set(reducers) - set(REDUCERS)
    if unknown:
        raise ValueError(f"unknown reducers {sorted(unknown)}; available: {', '.join(REDUCERS)}")
    hook_names = check_hooks(hooks)
    rows = rows_mode(capture)
    if "mlp.hook_post" in hook_names and rows == 0:
        rows = 1
    if "rows" in reducers and rows == 0:
        rows = 1
    if "watch" in reducers and not watch:
        raise ValueError("the 'watch' reducer needs watch=[(layer, neuron), ...]")
    if ("active_sets" in reducers or "contributions" in reducers) and int(chunk) < 1:
        raise ValueError(f"chunk must be at least 1 token, got {chunk}")
    if "contributions" in reducers:
        o.contribution_chunk = int(chunk)
        o.contribution_variant = contribution
        o.contribution_top = positive_int("contribution_top", contribution_top)
        o.eta_rank = positive_int("eta_rank", eta_rank)
        o.keep_top = bool(keep_top)
    o.temperature, o.top_p, o.top_k, o.min_p = float(temperature), float(top_p), int(top_k), float(min_p)
    o.seed = seed_value(seed)
    o.seed_per_sample = bool(seed_per_sample)
    o.ignore_eos = bool(ignore_eos)
    o.logit_bias = sorted((int(t), float(b)) for t, b in (logit_bias or {}).items())  # ids checked natively
    o.stop = stop_list(stop)
    o.forced = [int(t) for t in forced]
    o.tap = bool(tap)
    o.top_logprobs = int(logprobs)
    o.counts = "counts" in reducers
    o.active_threshold = float(active_threshold)
    o.active_chunk = int(chunk) if "active_sets" in reducers else 0
    o.watch = [(int(layer), int(i)) for layer, i in (watch or [])] if "watch" in reducers else []
    o.mlp_post = rows
    o.ln2_normalized = "ln2.hook_normalized" in hook_names
    o.resid_post = "hook_resid_post" in hook_names
    o.routing = "routing" in reducers
    o.router_probs = "mlp.hook_router_probs" in hook_names
    o.neat = neat
    o.neureasoner = neureasoner
    o.validate()  # the one check of these options, native (the run checks them again)
    return o


def sample_cells(n: int, prompt: int, held: int, shared: bool = False) -> int:
    """KV cells of n samples of a `prompt`-token prompt that each hold `held` tokens beyond it:
    n per-sequence streams of prompt + held cells each, padded to 256, or with shared=True one
    stream holding the prompt's cells once, prompt + n x held, padded to 256."""
    return _pad256(prompt + n * held) if shared else n * _pad256(prompt + held)


def plan_cells(n: int, need: int, max_cells: int, *, prompt: int = 0, shared: bool = False) -> int:
    """Total KV cells for n samples of `need` tokens each, `prompt` of them the prompt's (see
    sample_cells; shared=True shares those); ContextError if over budget, naming what would fit."""
    held = need - prompt
    one_stream = sample_cells(n, prompt, held, shared=True)
    if shared:
        if one_stream > max_cells:
            fit_n = max(0, (max_cells // 256 * 256 - prompt) // max(held, 1))
            raise ContextError(
                f"n={n} samples sharing a prompt of {prompt} tokens, each holding {held} more, need {one_stream} KV "
                f"cells (prompt + n x {held}, padded to 256), beyond max_sample_cells={max_cells}: at most n={fit_n} "
                f"samples of this length fit; load with a larger max_sample_cells to allow more")
        return one_stream
    per_seq = _pad256(need)
    if n * per_seq > max_cells:
        fit_n = max_cells // per_seq
        fit_tokens = max_cells // n // 256 * 256
        hint = (f"; with share_prompt=True the samples share the prompt's cells and need {one_stream}"
                if prompt and n > 1 and one_stream <= max_cells else "")
        raise ContextError(
            f"n={n} samples x {need} tokens (prompt + max_tokens, {per_seq} cells each after padding to 256) "
            f"need {n * per_seq} KV cells, beyond max_sample_cells={max_cells}: at most n={fit_n} samples of "
            f"this length fit, or {fit_tokens} tokens (prompt + max_tokens) per sample at n={n}{hint}; "
            f"load with a larger max_sample_cells to allow more")
    return n * per_seq
