"""Loading models and generating with the FFN tap: the Python face of the native core."""
from __future__ import annotations

import ctypes
import inspect
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .. import _native
from ..core.defaults import GENERATE, SAMPLE
from ..core.errors import ContextError
from ..core.params import int_in
from ..core.progress import run_with_progress
from .chat import ChatTemplate, check_chat_template, check_messages, load_template
from .memory import GIB, available_bytes, check_fits, record_bytes_per_token, run_parts
from .pool import ContextPool
from .registry import default_model, registry_chat_template, resolve
from .sampling import Sample, SampleRun, TokenRecord, plan_cells, record_fields, run_options, sample_cells

Messages = Sequence[Dict[str, str]]
#: The renderer `load` and `tap` give a model when chat_template is not named: "jinja" or "builtin".
#: A process-wide setting for code that loads models itself (rank-models' --chat-template).
DEFAULT_CHAT_TEMPLATE = "jinja"
Prompt = Union[str, Messages, Sequence[int]]


#: Prompt reuse modes (Model.reuse_prompt, `neurotap serve --prompt-reuse`): see docs/server.md.
PROMPT_REUSE_MODES = ("exact", "prefix", "off")


def prompt_reuse_mode(mode: Union[bool, str]) -> str:
    """The prompt reuse mode `mode` names: "exact" (True), "prefix" or "off" (False)."""
    if mode is True or mode is False:
        return "exact" if mode else "off"
    if isinstance(mode, str) and mode in PROMPT_REUSE_MODES:
        return mode
    raise ValueError(f"prompt reuse must be 'exact' (True), 'prefix' or 'off' (False), got {mode!r}")


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: str
    architecture: str
    description: str
    n_layers: int
    n_ff: int
    n_embd: int
    n_vocab: int
    n_params: int
    size_bytes: int
    has_chat_template: bool
    tapped_tensors: List[str]
    kv_bytes_per_cell: int = 0  # K and V of one KV cell, all layers (f16)
    n_head: int = 0  # attention (query) heads per layer
    head_dim_v: int = 0  # each head's output width (before the output projection)
    # Weights of a type llama.cpp's CPU backend may repack (Q4_0, Q4_K, MXFP4, ...): a row's values
    # then depend on its index in the batch mod 4 (what exact prompt reuse keeps follows it).
    repackable_weights: bool = False
    # Mixture-of-experts layers (0 for a dense model): a neuron is (layer, expert, unit), flat index
    # expert * n_ff_exp + unit within its layer; the shared expert's units (n_ff_shexp) come after
    # the routed ones, as expert number n_expert. n_ff = n_expert * n_ff_exp + n_ff_shexp.
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0
    n_ff_shexp: int = 0

    @property
    def total_neurons(self) -> int:
        return self.n_layers * self.n_ff

    @property
    def is_moe(self) -> bool:
        return self.n_expert > 0

    def expert_of(self, index: Any) -> Tuple[Any, Any]:
        """(expert, unit) of a flat neuron index within a layer (int or numpy array); the shared
        expert is expert n_expert. For a dense model every neuron is unit `index` of expert 0."""
        idx = np.asarray(index)
        if not self.is_moe:
            return (0, int(index)) if idx.ndim == 0 else (np.zeros_like(idx), idx)
        if np.any((idx < 0) | (idx >= self.n_ff)):
            raise ValueError(f"neuron index out of range [0, {self.n_ff})")
        routed = self.n_expert * self.n_ff_exp
        expert = np.where(idx < routed, idx // self.n_ff_exp, self.n_expert)
        unit = np.where(idx < routed, idx % self.n_ff_exp, idx - routed)
        if isinstance(index, (int, np.integer)):
            return int(expert), int(unit)
        return expert, unit

    def expert_neuron(self, expert: int, unit: int) -> int:
        """The flat index within a layer of `unit` of `expert` (n_expert: the shared expert)."""
        if not self.is_moe:
            if expert != 0 or not 0 <= unit < self.n_ff:
                raise ValueError(f"a dense model has expert 0 with units [0, {self.n_ff})")
            return unit
        if 0 <= expert < self.n_expert and 0 <= unit < self.n_ff_exp:
            return expert * self.n_ff_exp + unit
        if expert == self.n_expert and 0 <= unit < self.n_ff_shexp:
            return self.n_expert * self.n_ff_exp + unit
        raise ValueError(f"no unit {unit} of expert {expert} (n_expert={self.n_expert}, n_ff_exp={self.n_ff_exp}, "
                         f"n_ff_shexp={self.n_ff_shexp})")


@dataclass
class Generation(TokenRecord):
    """One generated answer and its neuron record (a run of one; see TokenRecord for the record)."""

    prompt_tokens: List[int] = field(default_factory=list)
    prompt_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        """Decode rate: tokens after the first (each one llama_decode) per second of decoding."""
        steps = max(self.n_tokens - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds > 0 and steps else 0.0

    @property
    def mean_active_per_token(self) -> float:
        """Mean number of active neurons (activation > threshold) per token, over all layers."""
        if self.active_counts is None or self.n_tokens == 0:
            return 0.0
        return float(self.active_counts.sum(axis=1).mean())


def native_config(value: Any, model: "Model", native_type: type, param: str, name: str, how: str) -> Any:
    """The native form of an already-resolved method configuration (neat=, neureasoner=): the
    native struct itself, or an object with native_config(model) (a calibration object). The
    runtime does not read files or look up shipped calibrations: the methods' load_calibration does."""
    if value is None or isinstance(value, native_type):
        return value
    if hasattr(value, "native_config"):
        return value.native_config(model)
    raise TypeError(f"{param}= takes a {name} calibration object, not {type(value).__name__}; {how}")


def native_neat(neat: Any, model: "Model") -> Any:
    return native_config(neat, model, _native.NeatConfig, "neat", "NEAT",
                         "resolve a path or 'default' with neurotap.neat.load_calibration(source, model)")


def native_neureasoner(neureasoner: Any, model: "Model") -> Any:
    return native_config(neureasoner, model, _native.NeuReasonerConfig, "neureasoner", "NeuReasoner",
                         "resolve a path with neurotap.neureasoner.load_calibration(source, model)")


class Model:
    """A GGUF model with the FFN tap installed. Create it with `neurotap.load` or `neurotap.tap`."""

    def __init__(self, native: "_native.Model", *, name: str, n_ctx: int, n_threads: Optional[int],
                 flash_attn: bool = True, max_sample_cells: int = 32768, keepalive: Any = None,
                 chat_template: str = "jinja", chat_template_kwargs: Optional[Dict[str, Any]] = None,
                 fallback_chat_template: Optional[str] = None):
        self._native = native
        # The registry's template for a known model whose file carries none (Gemma 3 270M's).
        self._fallback_template = fallback_chat_template
        #: How chat messages become a prompt: "jinja" (the GGUF's template) or "builtin" (llama.cpp's).
        self.chat_template = check_chat_template(chat_template)
        #: Variables every Jinja rendering sees (e.g. {"enable_thinking": False}); per call ones win.
        self.chat_template_kwargs: Dict[str, Any] = dict(chat_template_kwargs or {})
        self._jinja: Optional[ChatTemplate] = None
        self._jinja_lock = threading.Lock()
        self._keepalive = keepalive  # the llama_cpp.Llama whose weights we share, if any
        self.n_threads = n_threads or default_threads()
        self.flash_attn = bool(flash_attn)
        # generate()'s single-sequence context, made on first use: a model that only samples in
        # parallel (best_of_n, the server's n > 1) never holds its KV (1 GiB at an 8B shape, n_ctx 8,704).
        self._n_ctx = int(n_ctx)
        self._ctx: Optional[_native.Context] = None
        self._lock = threading.Lock()  # generate() uses the one single-sequence context
        self.max_sample_cells = int(max_sample_cells)
        self._pool = ContextPool(self._new_sampling_context)
        self.reuse_prompt = "exact"
        self._reused = 0
        self._reused_lock = threading.Lock()
        i = native.info
        self.info = ModelInfo(
            name=name, path=i["path"], architecture=i["architecture"], description=i["description"],
            n_layers=i["n_layers"], n_ff=i["n_ff"], n_embd=i["n_embd"], n_vocab=i["n_vocab"],
            n_params=i["n_params"], size_bytes=i["size_bytes"], has_chat_template=i["has_chat_template"],
            tapped_tensors=[f"{i['act_name']}-{il}" for il in range(i["n_layers"])],
            kv_bytes_per_cell=i["kv_bytes_per_cell"],
            n_head=i["n_head"], head_dim_v=i["head_dim_v"], repackable_weights=i["repackable_weights"],
            n_expert=i["n_expert"], n_expert_used=i["n_expert_used"], n_ff_exp=i["n_ff_exp"],
            n_ff_shexp=i["n_ff_shexp"],
        )

    @property
    def n_ctx(self) -> int:
        """Tokens of generate()'s context (per sequence, the bound of every run): the n_ctx given
        at load, padded by llama.cpp to a multiple of 256."""
        return self._ctx.n_ctx if self._ctx is not None else (self._n_ctx + 255) // 256 * 256

    def _generate_context(self) -> "_native.Context":
        """generate()'s context, made on first use; call with self._lock held."""
        if self._ctx is None:
            self._ctx = _native.Context(self._native, n_ctx=self._n_ctx, n_seq_max=1, n_threads=self.n_threads,
                                        flash_attn=self.flash_attn)
        return self._ctx

    def close(self) -> None:
        """Frees the contexts (after a decode in flight ends) and, for a model loaded by
        `neurotap.load`, the weights. Every later call raises a clear error. Runs in progress
        fail at their next step; their finished records stay readable."""
        self._pool.clear()
        self._native.close()

    @property
    def reuse_prompt(self) -> str:
        """Reuse the KV cells of a prompt's prefix already in a context (the previous turns of a
        chat, a shared system prompt) instead of decoding it again. The cells are those the context
        holds anyway (generate's one sequence, the first sequence of the idle sampling context):
        reuse costs no memory. "exact" (or True, the default): only cells that decoding the prompt
        computes bit for bit the same, so the tokens are those of a run without reuse; "prefix":
        the whole common prefix, generated tokens' cells included, as llama-cpp-python's Llama
        and llama-server do (the tokens may differ from a run without reuse); "off" (or False):
        every prompt is decoded whole. Reads back as the mode's name."""
        return self._reuse_prompt

    @reuse_prompt.setter
    def reuse_prompt(self, mode: Union[bool, str]) -> None:
        self._reuse_prompt = prompt_reuse_mode(mode)

    @property
    def reused_cells(self) -> int:
        """Prompt tokens whose KV cells runs of this model reused instead of decoding them."""
        return self._reused

    def _count_reused(self, n: int) -> None:
        with self._reused_lock:
            self._reused += int(n)

    @property
    def closed(self) -> bool:
        return bool(self._native.closed)

    def memory(self) -> Dict[str, int]:
        """Bytes held now, by part: the weights (llama.cpp's buffers), the KV cells of every
        context (generate's, once it ran, and the sampling pool's, idle or in use), and the model
        file mapped for contributions (shared with the page cache: it costs no private memory)."""
        kvb = self.info.kv_bytes_per_cell
        held = (self._ctx.n_ctx if self._ctx is not None else 0) + self._pool.cells()
        return {"weights": int(self.info.size_bytes), "kv": int(held * kvb),
                "contribution_weights_mapped": int(self._native.contribution_weights_mapped)}

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        i = self.info
        return f"<neurotap.Model {i.name} {i.architecture} layers={i.n_layers} n_ff={i.n_ff} n_ctx={self.n_ctx}>"

    # -- text <-> tokens ---------------------------------------------------------------
    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> List[int]:
        return self._native.tokenize(text, add_special, parse_special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self._native.detokenize(list(tokens)).decode("utf-8", errors="replace")

    def token_text(self, token: int) -> str:
        """The vocabulary entry of one token id (special tokens by name)."""
        return self._native.token_text(int(token)).decode("utf-8", errors="replace")

    def token_piece(self, token: int) -> bytes:
        """The bytes one token adds to generated text (a piece of a UTF-8 character, possibly)."""
        return self._native.token_piece(int(token))

    def is_eog(self, token: int) -> bool:
        """Whether the token ends generation (end of sequence or of turn)."""
        return bool(self._native.is_eog(int(token)))

    def _jinja_template(self) -> ChatTemplate:
        with self._jinja_lock:  # read and compiled once, on first use
            if self._jinja is None:
                tmpl = load_template(self.info.path, self.info.n_vocab, self.token_text, self._fallback_template)
                if tmpl is None:
                    raise ValueError("model has no chat template: pass a plain prompt instead of messages")
                self._jinja = tmpl
            return self._jinja

    def apply_chat_template(self, messages: Messages, add_generation_prompt: bool = True, *,
                            chat_template: Optional[str] = None,
                            chat_template_kwargs: Optional[Dict[str, Any]] = None) -> str:
        """The prompt text of chat messages. chat_template="jinja" (default: the model's
        `chat_template` attribute) renders the GGUF's `tokenizer.chat_template` with Jinja as
        llama-cpp-python and llama-server do, with chat_template_kwargs as template variables;
        "builtin" uses llama.cpp's own renderer (roles and string contents only)."""
        mode = check_chat_template(chat_template or self.chat_template)
        msgs = check_messages(messages)
        if mode == "builtin":
            if chat_template_kwargs:
                raise ValueError("chat_template_kwargs need the Jinja renderer (chat_template='jinja')")
            return self._native.apply_chat_template([(str(m["role"]), str(m["content"])) for m in msgs],
                                                    add_generation_prompt)
        kwargs = {**self.chat_template_kwargs, **(chat_template_kwargs or {})}
        return self._jinja_template().render(msgs, add_generation_prompt, kwargs)

    def prompt_tokens(self, prompt: Prompt, *, chat_template: Optional[str] = None,
                      chat_template_kwargs: Optional[Dict[str, Any]] = None) -> List[int]:
        """Token ids for a plain prompt, chat messages (chat template applied) or token ids.
        A rendered chat prompt is tokenized as llama-cpp-python's create_chat_completion does:
        no BOS added (the template writes it), special tokens parsed."""
        if isinstance(prompt, str):
            return self.tokenize(prompt)
        if not isinstance(prompt, (list, tuple, np.ndarray)):
            raise TypeError("prompt must be a string, a list of chat messages ({'role', 'content'}) or token ids, "
                            f"not {type(prompt).__name__}")
        seq = list(prompt)
        if seq and all(isinstance(t, (int, np.integer)) for t in seq):
            V = self.info.n_vocab
            return [int_in("prompt token id", t, 0, V) for t in seq]
        if seq and all(isinstance(m, dict) for m in seq):
            text = self.apply_chat_template(seq, chat_template=chat_template, chat_template_kwargs=chat_template_kwargs)
            return self.tokenize(text, add_special=False)
        raise TypeError("prompt must be a string, a list of chat messages ({'role', 'content'}) or token ids")

    # -- generation ----------------------------------------------------------------------
    def generate(self, prompt: Prompt, *, max_tokens: int = 128, temperature: float = GENERATE.temperature,
                 top_p: float = GENERATE.top_p, top_k: int = GENERATE.top_k, min_p: float = GENERATE.min_p,
                 seed: Optional[int] = GENERATE.seed,
                 stop: Optional[Union[str, Sequence[str]]] = None, capture: Optional[str] = None,
                 hooks: Sequence[str] = (), tap: bool = True, active_threshold: float = 0.0,
                 progress: Optional[bool] = False, forced: Optional[Sequence[int]] = None,
                 prefix: Optional[Sequence[int]] = None, neat: Any = None, neureasoner: Any = None,
                 logit_bias: Optional[Mapping[int, float]] = None) -> Generation:
        """Generate from a prompt (str), chat messages (list of dicts) or token ids.

        temperature <= 0 decodes greedily; otherwise the sampler draws with `seed` itself.
        Active neuron counts are returned while the tap is on. capture="float32" or "float16"
        also returns the activations [n_tokens, n_layers, n_ff] in that type; hooks= names more
        of what the tap reads ("mlp.hook_post", "ln2.hook_normalized", "hook_resid_post", or
        "blocks.{l}.<hook>"), all in `Generation.cache`. forced=token ids feeds those tokens
        instead of sampling (teacher forcing; see `trace`); prefix=token ids are fed the same
        way (one per step, as generation decodes them: not as part of the prompt, whose batched
        decoding differs in the last bits) and sampling goes on after them, up to max_tokens
        tokens in all. neat= a NEAT calibration
        (neurotap.neat.load_calibration) ends the reasoning when its neurons say it is done.
        neureasoner= a NeuReasoner calibration (neurotap.neureasoner.load_calibration) watches its
        detectors and corrects the failures they flag (see Generation.neureasoner_events).
        logit_bias={token id: bias} adds each bias to its token's logit before sampling (OpenAI's
        logit_bias: -100 all but bans a token, 100 all but forces it; log-probabilities stay the raw ones).
        """
        forced_ids = [int(t) for t in forced] if forced is not None else []
        if forced is not None:
            if prefix is not None:
                raise ValueError("give forced= (every token) or prefix= (the first tokens), not both")
            if not forced_ids:
                raise ValueError("forced must hold at least one token")
            max_tokens = len(forced_ids)
        elif prefix is not None:
            forced_ids = [int(t) for t in prefix]
            if len(forced_ids) >= max_tokens:
                raise ValueError(f"prefix holds {len(forced_ids)} tokens: max_tokens ({max_tokens}) must be larger")
        opts = run_options(n=1, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                           min_p=min_p, seed=seed, stop=stop, reducers=("counts",) if tap else (),
                           active_threshold=active_threshold, capture=capture, hooks=hooks, tap=tap,
                           neat=native_neat(neat, self), neureasoner=native_neureasoner(neureasoner, self),
                           forced=forced_ids, seed_per_sample=False, logit_bias=logit_bias)
        ids = self.prompt_tokens(prompt)
        # Full-row captures of long answers, and generate's own context the first time.
        parts = self.run_memory(opts, len(ids), new_context=False)
        if self._ctx is None:
            parts["kv"] = self.n_ctx * self.info.kv_bytes_per_cell
        check_fits(parts, f"a run of n=1 x {opts.max_tokens} tokens", 1)
        opts.prompt_reuse = self.reuse_prompt
        with self._lock:
            run = _native.Run(self._generate_context(), ids, opts)
            try:
                run_with_progress(lambda: run.advance(opts.max_tokens), run.progress_tokens,
                                  total=opts.max_tokens, desc="generating", enabled=progress)
            finally:
                self._count_reused(run.n_reused)
            run.finish_live("cancelled")  # a cancelled run's sample ends here
            d = run.sample(0)
        return Generation(prompt_tokens=ids, prompt_seconds=run.prompt_seconds, decode_seconds=run.decode_seconds,
                          **record_fields(Generation, d))

    def trace(self, prompt: Prompt, tokens: Sequence[int], *, capture: Optional[str] = "float32",
              hooks: Sequence[str] = ()) -> Generation:
        """The neuron record of a given continuation: row j is the FFN state of the position
        that predicts tokens[j] after the prompt (teacher forcing; nothing is sampled)."""
        return self.generate(prompt, forced=tokens, capture=capture, hooks=hooks, temperature=0)

    def forced_logprobs(self, prompt: Prompt, tokens: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
        """log p(tokens[j] | prompt + tokens[:j]) under the model's raw distribution (llama.cpp's
        logits, full softmax) for each j, and the argmax token at each position (float64, int32):
        one teacher-forced run in generate's context, nothing sampled (lm-eval's loglikelihood)."""
        lp, top_ids, _ = self.forced_top_logprobs(prompt, tokens, 1)
        return lp, top_ids[:, 0]

    def forced_top_logprobs(self, prompt: Prompt, tokens: Sequence[int],
                            k: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """As `forced_logprobs`, with the k most likely tokens at each position: (log p of each
        given token [T] float64, top ids [T, k], their log-probabilities [T, k])."""
        forced = [int(t) for t in tokens]
        if not forced:
            raise ValueError("tokens must hold at least one token")
        opts = run_options(n=1, max_tokens=len(forced), temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, seed=0,
                           stop=None, reducers=(), tap=False, logprobs=k, forced=forced, seed_per_sample=False)
        ids = self.prompt_tokens(prompt)
        opts.prompt_reuse = self.reuse_prompt
        with self._lock:
            run = _native.Run(self._generate_context(), ids, opts)
            run.advance(len(forced))
            self._count_reused(run.n_reused)
            d = run.sample(0)
        return np.asarray(d["token_logprob"], np.float64), np.asarray(d["top_ids"]), np.asarray(d["top_logprobs"])

    def run_memory(self, opts: Any, n_prompt: int, new_context: bool = True,
                   share_prompt: bool = False) -> Dict[str, int]:
        """Bytes a run with these native options will need at its peak, by part (the KV cells of
        the context it takes when `new_context`: n x (prompt + held), or with share_prompt
        prompt + n x held, each padded to 256; held is max_tokens, or kv_tokens + 1 in a race)."""
        per_token = record_bytes_per_token(
            self.info, counts=opts.counts, active_chunk=opts.active_chunk, contribution_chunk=opts.contribution_chunk,
            keep_top=opts.keep_top, rows=opts.mlp_post, norm_inputs=opts.ln2_normalized, residuals=opts.resid_post,
            logprobs=opts.top_logprobs, routing=opts.routing, router_probs=opts.router_probs)
        held = opts.kv_tokens + 1 if opts.kv_tokens else opts.max_tokens
        parts = run_parts(self.info, n=opts.n, kv_cells=sample_cells(opts.n, n_prompt, held, share_prompt),
                          max_tokens=opts.kv_tokens or opts.max_tokens, per_token_record=per_token,
                          contributions=opts.contribution_chunk > 0, file_bytes=os.path.getsize(self.info.path))
        if not new_context:
            del parts["kv"]
        return parts

    def _check_memory(self, opts: Any, n_prompt: int, new_context: bool = True, share_prompt: bool = False) -> None:
        what = f"a run of n={opts.n} x {opts.max_tokens} tokens" + (" sharing the prompt's cells" if share_prompt else "")
        try:
            check_fits(self.run_memory(opts, n_prompt, new_context, share_prompt), what, opts.n)
        except ContextError as e:
            if share_prompt or opts.n == 1 or not new_context:
                raise
            shared = sum(self.run_memory(opts, n_prompt, new_context, True).values())
            avail = available_bytes()
            if avail is None or shared > avail:
                raise
            raise ContextError(f"{e}; with share_prompt=True the samples share the prompt's KV cells and the run "
                               f"needs about {shared / GIB:.2f} GiB, which fits") from None

    # -- parallel sampling ------------------------------------------------------------
    def batch_context(self, n_seq: int) -> Any:
        """A context of n_seq sequence slots of n_ctx cells each (per-sequence streams), for runs
        decoded together by a _native.Batcher (the server's continuous batching)."""
        cells = plan_cells(n_seq, self.n_ctx, max(self.max_sample_cells, n_seq * self.n_ctx))
        check_fits({"kv": cells * self.info.kv_bytes_per_cell}, f"a batch of {n_seq} sequences x {self.n_ctx} tokens",
                   n_seq)
        return _native.Context(self._native, n_ctx=cells, n_batch=max(512, n_seq), n_seq_max=n_seq,
                               n_threads=self.n_threads, kv_unified=False, flash_attn=self.flash_attn)

    def _new_sampling_context(self, n: int, need: int, shared_cells: int = 0) -> Any:
        """A context with n per-sequence KV streams of at least `need` cells each, or with
        shared_cells one stream of that many cells (planned by the caller) for n sequences."""
        cells = shared_cells or plan_cells(n, need, self.max_sample_cells)
        return _native.Context(self._native, n_ctx=cells, n_batch=max(512, n), n_seq_max=n,
                               n_threads=self.n_threads, kv_unified=bool(shared_cells), flash_attn=self.flash_attn)

    def sampling_options(self, **options: Any) -> Any:
        """The native options of a parallel sampling run, checked, from start_sampling's keyword
        options (its defaults for those not given): what start_sampling runs, and what the server's
        batched runs use (the same run either way). share_prompt chooses start_sampling's context,
        not an option of the run: batched runs decode in the slots of their batch context."""
        bound = inspect.signature(self.start_sampling).bind(None, **options)
        bound.apply_defaults()
        o = bound.arguments
        n, max_tokens, temperature, top_p, top_k, min_p, seed, stop = (
            o["n"], o["max_tokens"], o["temperature"], o["top_p"], o["top_k"], o["min_p"], o["seed"], o["stop"])
        reducers, chunk, active_threshold, watch, capture, logprobs, tap, ignore_eos = (
            o["reducers"], o["chunk"], o["active_threshold"], o["watch"], o["capture"], o["logprobs"], o["tap"],
            o["ignore_eos"])
        contribution, contribution_top, eta_rank, keep_top, neat, neureasoner, kv_tokens, forced = (
            o["contribution"], o["contribution_top"], o["eta_rank"], o["keep_top"], o["neat"], o["neureasoner"],
            o["kv_tokens"], o["forced"])
        opts = run_options(n=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                           min_p=min_p, seed=seed, stop=stop, reducers=tuple(reducers), chunk=chunk,
                           active_threshold=active_threshold, watch=watch, capture=capture, hooks=o["hooks"],
                           logprobs=logprobs, tap=tap, ignore_eos=ignore_eos, contribution=contribution,
                           contribution_top=contribution_top, eta_rank=eta_rank, keep_top=keep_top,
                           neat=native_neat(neat, self), neureasoner=native_neureasoner(neureasoner, self),
                           logit_bias=o["logit_bias"])
        if forced is not None:
            streams = [[int(t) for t in f] for f in forced]
            if len(streams) != opts.n:
                raise ValueError(f"forced holds {len(streams)} token streams for n={opts.n} samples: give one per sample")
            opts.forced_per_sample = streams
        if kv_tokens:
            opts.kv_tokens = int_in("kv_tokens", kv_tokens, 1, opts.max_tokens + 1)
        opts.prompt_reuse = self.reuse_prompt
        return opts

    def start_sampling(self, prompt: Prompt, *, n: int = 16, max_tokens: int = 256,
                       temperature: float = SAMPLE.temperature, top_p: float = SAMPLE.top_p,
                       top_k: int = SAMPLE.top_k, min_p: float = SAMPLE.min_p, seed: Optional[int] = SAMPLE.seed,
                       stop: Optional[Union[str, Sequence[str]]] = None,
                       reducers: Sequence[str] = ("counts", "active_sets"), chunk: int = 32,
                       active_threshold: float = 0.0, watch: Optional[Sequence[Tuple[int, int]]] = None,
                       capture: Optional[str] = None, logprobs: int = 0, tap: bool = True,
                       ignore_eos: bool = False, contribution: str = "down", contribution_top: int = 64,
                       eta_rank: int = 500, keep_top: bool = False, neat: Any = None,
                       neureasoner: Any = None, kv_tokens: int = 0,
                       forced: Optional[Sequence[Sequence[int]]] = None, hooks: Sequence[str] = (),
                       logit_bias: Optional[Mapping[int, float]] = None, share_prompt: bool = False) -> SampleRun:
        """Start N samples of one prompt, decoded in parallel; advance them with `run.advance()`.

        Sample i draws from its own RNG seeded by (seed, i). Reducers keep, per sample:
        "counts" active neurons per token and layer; "active_sets" the neurons with activation >
        active_threshold in each `chunk`-token chunk; "watch" the activations of the `watch`
        neurons per token; "rows" (or capture="float16"/"float32") every activation row, for
        small runs; "contributions" NAD's exact neuron contributions to each sampled token and the
        activated set of every `chunk`-token chunk (contribution="gate" uses act(gate) as the
        activation, like the paper's code; keep_top=True also keeps each token's per-layer top
        `contribution_top` values; eta is the `eta_rank`-th largest of those). logprobs=k also
        records the top-k log-probabilities of each sampled position. ignore_eos=True bans
        end-of-generation tokens (fixed-length runs, as llama.cpp's --ignore-eos). kv_tokens=B
        holds KV cells for the first B tokens of each sample only (a race decided after B tokens;
        `run.continue_one(i)` moves the winner into a context of its own). neat= and neureasoner=
        steer every sample as in `generate`. forced=[tokens of sample 0, ..., of sample n-1]
        teacher-forces each sample with its own token stream (then it samples up to max_tokens):
        real text fed through a model, as `generate(forced=)` does for one sequence. logit_bias= as
        in `generate`. On a mixture-of-experts model, "routing" keeps each token's experts and gate
        weights per layer (Sample.routing_ids, routing_weights, shexp_gate) and
        hooks=["mlp.hook_router_probs"] the router's output over every expert; hooks= takes
        generate's hook names.

        share_prompt=True puts the samples in one KV stream where they share the prompt's cells:
        the run holds prompt + n x held cells (held: max_tokens, or kv_tokens + 1) instead of
        n x (prompt + held), each padded to 256, so best-of-64 of a long prompt fits where 64
        copies of it would not. A sample's attention then skips the other samples' cells (a mask
        check each), and an ended sample's cells are freed when the run ends. Its tokens equal
        the per-sequence streams' (the default) while fewer than 64 samples decode in a step and
        no sample decodes alone over 512 cells or more; otherwise llama.cpp's flash attention
        takes another path in one layout than in the other (tiled, or split over the cells) and
        its f16 accumulator rounds differently, so samples drawn with the same seeds can differ:
        equally valid, not the same. NeuReasoner's rollbacks need per-sequence streams.
        """
        options = {k: v for k, v in locals().items() if k not in ("self", "prompt")}  # every option, as given
        opts = self.sampling_options(**options)
        shared = bool(share_prompt) and opts.n > 1  # one sample: one stream either way
        ids = self.prompt_tokens(prompt)
        if len(ids) + opts.max_tokens > self.n_ctx:  # the same bound as generate(): n_ctx per sequence
            raise ContextError(f"the prompt ({len(ids)} tokens) plus max_tokens ({opts.max_tokens}) exceeds the context "
                               f"of {self.n_ctx} tokens; at most {max(0, self.n_ctx - len(ids))} new tokens fit. "
                               "Load with a larger n_ctx or lower max_tokens.")
        self._check_memory(opts, len(ids), share_prompt=shared)
        # A race decided after kv_tokens holds cells for those only (plus the token in flight).
        need = len(ids) + (opts.kv_tokens + 1 if opts.kv_tokens else opts.max_tokens)
        cells = plan_cells(opts.n, need, self.max_sample_cells, prompt=len(ids), shared=shared)
        lease = self._pool.acquire(opts.n, need, cells if shared else 0)
        try:
            native = _native.Run(lease.ctx, ids, opts)
        except BaseException:
            lease.release()
            raise
        return SampleRun(lease, native, opts.max_tokens, int(chunk), pool=self._pool, options=opts,
                         on_start=self._count_reused)

    def sample(self, prompt: Prompt, *, n: int = 16, max_tokens: int = 256, progress: Optional[bool] = False,
               **kwargs: Any) -> List[Sample]:
        """N complete samples of one prompt (see start_sampling for the options)."""
        with self.start_sampling(prompt, n=n, max_tokens=max_tokens, **kwargs) as run:
            run.advance(progress=progress)
            return run.samples()


def devices() -> List[Dict[str, Any]]:
    """The devices of the installed llama.cpp build, as `load(device=)` names them: dicts with
    name ("CPU", "Vulkan0", "CUDA0", "MTL0"), description, type ("cpu", "gpu", "igpu", "accel"),
    memory_free and memory_total (bytes, as the backend reports them)."""
    return list(_native.devices())


def load(model: Union[str, os.PathLike, None] = None, *, n_threads: Optional[int] = None, n_gpu_layers: int = 0,
         device: Optional[str] = None, n_ctx: int = 4096, flash_attn: bool = True, max_sample_cells: int = 32768,
         chat_template: Optional[str] = None, chat_template_kwargs: Optional[Dict[str, Any]] = None) -> Model:
    """Load a GGUF model by known name (see `neurotap models`) or path, with the tap installed.

    max_sample_cells bounds the KV cells a parallel sampling run may allocate (n samples x
    (prompt + max_tokens), each padded to 256; prompt + n x max_tokens, padded, with
    share_prompt=True); a larger request fails before decoding.
    flash_attn=True lets llama.cpp use flash attention where the backend has it (faster; its
    results differ from the plain attention path in the last bits, like llama.cpp's own -fa).
    chat_template="jinja" (the default, DEFAULT_CHAT_TEMPLATE) renders chat messages with the GGUF's
    Jinja template (as llama-cpp-python and llama-server), "builtin" with llama.cpp's built-in
    renderer (the model's `chat_template` attribute, changeable later); chat_template_kwargs are
    variables every Jinja rendering sees (e.g. {"enable_thinking": False}).
    n_gpu_layers=k puts the last k layers on the GPU of a GPU build of llama-cpp-python (n_layers + 1
    also the output layer; -1 everything); device= names the one device to use (see `devices()`).

    Raises FileNotFoundError, ModelNotInstalledError (with the pip command), ValueError for an
    unknown name or more GPU layers than the model has, or ModelError for a corrupt, truncated or
    unsupported file, or GPU layers (or a device) that this llama.cpp build has no device for.
    """
    name = str(model) if model is not None else default_model()
    path = resolve(name)
    if n_ctx < 8:
        raise ValueError(f"n_ctx must be at least 8, got {n_ctx}")
    chat_template = check_chat_template(chat_template or DEFAULT_CHAT_TEMPLATE)
    native = _native.Model.load(str(path), int(n_gpu_layers), device or "")
    return Model(native, name=name if not str(name).endswith(".gguf") else Path(name).name, n_ctx=n_ctx,
                 n_threads=n_threads, flash_attn=flash_attn, max_sample_cells=max_sample_cells,
                 chat_template=chat_template, chat_template_kwargs=chat_template_kwargs,
                 fallback_chat_template=registry_chat_template(name))


def tap(llm: Any, *, n_ctx: Optional[int] = None, n_threads: Optional[int] = None,
        chat_template: Optional[str] = None, chat_template_kwargs: Optional[Dict[str, Any]] = None) -> Model:
    """Tap a model already loaded by llama_cpp.Llama: its weights are shared, not loaded again;
    a new context with the tap (and the Llama's flash-attention setting) is created beside the
    Llama's own."""
    stack = getattr(llm, "_stack", None)
    if not hasattr(llm, "model_path") or not hasattr(stack, "callback"):
        raise TypeError(f"neurotap.tap takes a llama_cpp.Llama, not {type(llm).__name__}")
    addr = ctypes.cast(llm.model, ctypes.c_void_p).value if llm._model.model is not None else None
    if not addr:
        raise ValueError("the llama_cpp.Llama has no loaded model (was it closed?)")
    chat_template = check_chat_template(chat_template or DEFAULT_CHAT_TEMPLATE)
    native = _native.Model.borrow(addr, str(llm.model_path))
    _native.set_verbose(False)  # importing llama_cpp installed its Python logger; keep Python out of decode
    model = Model(native, name=Path(llm.model_path).name, n_ctx=n_ctx or llm.n_ctx(),
                  n_threads=n_threads or getattr(llm, "n_threads", None),
                  flash_attn=int(llm.context_params.flash_attn_type) != 0, keepalive=llm,
                  chat_template=chat_template, chat_template_kwargs=chat_template_kwargs)
    # Llama.close() frees the weights through its exit stack, last registered first: this runs
    # before that, so our contexts go while the weights still exist, and later calls raise.
    stack.callback(native.close)
    return model
