"""Loading models and generating with the FFN tap: the Python face of the native core."""
from __future__ import annotations

import ctypes
import os
import random
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from . import _native
from .progress import run_with_progress
from .registry import default_model, resolve

Messages = Sequence[Dict[str, str]]
_CAPTURE = {None: 0, "none": 0, "float32": 1, "f32": 1, "float16": 2, "f16": 2}


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

    @property
    def total_neurons(self) -> int:
        return self.n_layers * self.n_ff


@dataclass
class Generation:
    """One generated answer and its neuron record.

    Row j of `active_counts` / `activations` belongs to generated token j: it is the FFN state
    of the position that predicted token j (the prompt's last position for j = 0).
    """

    text: str
    tokens: List[int]
    prompt_tokens: List[int]
    finish_reason: str  # "eos", "length", "stop" or "cancelled"
    active_counts: Optional[np.ndarray]  # int32 [n_tokens, n_layers]; None when tap=False
    activations: Optional[np.ndarray] = None  # [n_tokens, n_layers, n_ff] when capture was asked
    norm_inputs: Optional[np.ndarray] = None  # [n_tokens, n_layers, n_embd] with debug_norm=True
    prompt_seconds: float = 0.0
    decode_seconds: float = 0.0
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

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


class Model:
    """A GGUF model with the FFN tap installed. Create it with `neurotap.load` or `neurotap.tap`."""

    def __init__(self, native: "_native.Model", *, name: str, n_ctx: int, n_threads: Optional[int],
                 keepalive: Any = None):
        self._native = native
        self._keepalive = keepalive  # the llama_cpp.Llama whose weights we share, if any
        self.n_threads = n_threads or default_threads()
        self._ctx = _native.Context(native, n_ctx=n_ctx, n_seq_max=1, n_threads=self.n_threads)
        self._lock = threading.Lock()
        i = native.info
        self.info = ModelInfo(
            name=name, path=i["path"], architecture=i["architecture"], description=i["description"],
            n_layers=i["n_layer"], n_ff=i["n_ff"], n_embd=i["n_embd"], n_vocab=i["n_vocab"],
            n_params=i["n_params"], size_bytes=i["size_bytes"], has_chat_template=i["has_chat_template"],
            tapped_tensors=list(self._ctx.tapped_tensors),
        )

    @property
    def n_ctx(self) -> int:
        return self._ctx.n_ctx

    def __repr__(self) -> str:
        i = self.info
        return f"<neurotap.Model {i.name} {i.architecture} layers={i.n_layers} n_ff={i.n_ff} n_ctx={self.n_ctx}>"

    # -- text <-> tokens ---------------------------------------------------------------
    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> List[int]:
        return self._native.tokenize(text, add_special, parse_special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self._native.detokenize(list(tokens)).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: Messages, add_generation_prompt: bool = True) -> str:
        pairs = []
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError("messages must be dicts with 'role' and 'content'")
            pairs.append((str(m["role"]), str(m["content"])))
        if not pairs:
            raise ValueError("messages is empty")
        return self._native.apply_chat_template(pairs, add_generation_prompt)

    def prompt_tokens(self, prompt: Union[str, Messages, Sequence[int]]) -> List[int]:
        """Token ids for a plain prompt, chat messages (chat template applied) or token ids."""
        if isinstance(prompt, str):
            return self.tokenize(prompt)
        seq = list(prompt)
        if seq and all(isinstance(t, (int, np.integer)) for t in seq):
            return [int(t) for t in seq]
        if seq and all(isinstance(m, dict) for m in seq):
            return self.tokenize(self.apply_chat_template(seq), add_special=False)
        raise TypeError("prompt must be a string, a list of chat messages ({'role', 'content'}) or token ids")

    # -- generation ----------------------------------------------------------------------
    def generate(self, prompt: Union[str, Messages, Sequence[int]], *, max_tokens: int = 128,
                 temperature: float = 0.8, top_p: float = 0.95, top_k: int = 40, min_p: float = 0.0,
                 seed: Optional[int] = None, stop: Optional[Union[str, Sequence[str]]] = None,
                 capture: Optional[str] = None, tap: bool = True, active_threshold: float = 0.0,
                 debug_norm: bool = False, progress: Optional[bool] = False) -> Generation:
        """Generate from a prompt (str), chat messages (list of dicts) or token ids.

        temperature <= 0 decodes greedily. capture="float32" or "float16" also returns the full
        activations [n_tokens, n_layers, n_ff]; active neuron counts are always returned while
        the tap is on. debug_norm=True also returns the normed FFN input of each layer.
        """
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)) or max_tokens <= 0:
            raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        key = capture.lower() if isinstance(capture, str) else capture
        if key not in _CAPTURE:
            raise ValueError(f"capture must be None, 'float32' or 'float16', got {capture!r}")
        if (key or debug_norm) and not tap:
            raise ValueError("capture and debug_norm need the tap on (tap=True)")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if seed is None:
            seed = random.SystemRandom().randrange(2**32)
        if not 0 <= int(seed) < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {seed}")
        ids = self.prompt_tokens(prompt)

        def call() -> Dict[str, Any]:
            return self._ctx.generate(ids, int(max_tokens), float(temperature), float(top_p), int(top_k),
                                      float(min_p), int(seed), stops, bool(tap), _CAPTURE[key],
                                      bool(debug_norm), float(active_threshold))

        with self._lock:
            r = run_with_progress(call, self._ctx.progress_tokens, self._ctx.cancel, total=int(max_tokens),
                                  desc="generating", enabled=progress)
        return Generation(
            text=r["text"].decode("utf-8", errors="replace"), tokens=list(r["tokens"]),
            prompt_tokens=list(r["prompt_tokens"]), finish_reason=r["finish_reason"],
            active_counts=r["active_counts"] if tap else None, activations=r["activations"],
            norm_inputs=r["norm_inputs"], prompt_seconds=r["prompt_seconds"], decode_seconds=r["decode_seconds"],
        )


def load(model: Union[str, os.PathLike, None] = None, *, n_threads: Optional[int] = None, n_gpu_layers: int = 0,
         n_ctx: int = 4096) -> Model:
    """Load a GGUF model by known name (see `neurotap info`) or path, with the tap installed.

    Raises FileNotFoundError, ModelNotInstalledError (with the pip command), ValueError for an
    unknown name, or ModelError for a corrupt, truncated or unsupported file.
    """
    name = str(model) if model is not None else default_model()
    path = resolve(name)
    if n_ctx < 8:
        raise ValueError(f"n_ctx must be at least 8, got {n_ctx}")
    native = _native.Model.load(str(path), int(n_gpu_layers))
    return Model(native, name=name if not str(name).endswith(".gguf") else Path(name).name, n_ctx=n_ctx,
                 n_threads=n_threads)


def tap(llm: Any, *, n_ctx: Optional[int] = None, n_threads: Optional[int] = None) -> Model:
    """Tap a model already loaded by llama_cpp.Llama: its weights are shared, not loaded again;
    a new context with the tap is created beside the Llama's own."""
    addr = ctypes.cast(llm.model, ctypes.c_void_p).value
    if not addr:
        raise ValueError("the llama_cpp.Llama has no loaded model")
    native = _native.Model.borrow(addr, str(llm.model_path))
    _native.set_verbose(False)  # importing llama_cpp installed its Python logger; keep Python out of decode
    return Model(native, name=Path(llm.model_path).name, n_ctx=n_ctx or llm.n_ctx(),
                 n_threads=n_threads or getattr(llm, "n_threads", None), keepalive=llm)
