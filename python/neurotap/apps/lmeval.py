"""An lm-evaluation-harness backend: the model class `neurotap`.

lm-eval has no plugin discovery for models, so run its CLI through this module, which registers
the class first:

    python -m neurotap.apps.lmeval --model neurotap \\
        --model_args model=smollm2-135m,nad_n=16,method=knn,early_stop=32 --tasks ...

generate_until answers with NAD's pick when nad_n >= 1 (model_args, or per task in its
generation_kwargs), with plain sampling otherwise. The identical requests that a task's `repeats`
makes are grouped into one parallel run: plain sampling gives each repeat its own sample of an
n = repeats batch; NAD samples nad_n once and every repeat gets the pick. loglikelihood is exact
teacher forcing: the log-probability of each forced continuation token under the model's raw
distribution (llama.cpp's logits, full softmax), and whether it was the argmax.
"""
from __future__ import annotations

import sys
import zlib
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ..core.defaults import LMEVAL_GREEDY, SAMPLE
from ..methods.nad import best_of_n
from ..runtime.chat import read_metadata, special_ids
from ..runtime.model import load

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - the optional extra is missing
    raise ImportError("the lm-eval backend needs lm-eval: pip install 'neurotap[lmeval]'") from e

# generate_until options read from gen_kwargs; anything else lm-eval passes is ignored.
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p")
NAD_KEYS = ("nad_n", "method", "early_stop", "k")


def request_seed(seed: int, context: str) -> int:
    """The sampling seed of one request: fixed by the run's seed and the prompt, so a request is
    answered the same whatever else the run holds (and whatever the order)."""
    return (int(seed) * 1_000_003 + zlib.crc32(context.encode("utf-8"))) % 2**32


def _int_or_none(v: Any) -> Optional[int]:
    return None if v in (None, "", "none", "None") else int(v)


@register_model("neurotap")
class NeurotapLM(LM):
    """model_args: model (known name or .gguf path), nad_n (0: plain sampling), method, early_stop
    (tokens; none: decide on complete answers), k, temperature (sampling default 0.6), top_p,
    top_k, min_p, seed, max_gen_toks, threads, n_ctx, chat_template (jinja|builtin)."""

    def __init__(self, model: str = "smollm2-135m", nad_n: int = 0, method: str = "knn", early_stop: Any = 32,
                 k: int = 3, temperature: float = SAMPLE.temperature, top_p: float = SAMPLE.top_p,
                 top_k: int = SAMPLE.top_k, min_p: float = SAMPLE.min_p, seed: int = SAMPLE.seed, max_gen_toks: int = 256, threads: Optional[int] = None, n_ctx: int = 4096,
                 chat_template: str = "jinja", **ignored: Any):
        super().__init__()
        self.model = load(str(model), n_threads=_int_or_none(threads), n_ctx=int(n_ctx), chat_template=chat_template)
        self.defaults: Dict[str, Any] = {"nad_n": int(nad_n), "method": str(method),
                                         "early_stop": _int_or_none(early_stop), "k": int(k),
                                         "temperature": float(temperature), "top_p": float(top_p),
                                         "top_k": int(top_k), "min_p": float(min_p)}
        self.seed = int(seed)
        self.max_gen_toks = int(max_gen_toks)
        self.chat_applied = False  # lm-eval rendered the contexts with apply_chat_template
        meta = read_metadata(self.model.info.path, ("tokenizer.ggml.model", "tokenizer.ggml.bos_token_id",
                                                    "tokenizer.ggml.eos_token_id"))
        bos, eos = special_ids(meta, self.model.info.n_vocab)
        self.prefix_token = bos if bos is not None else (eos if eos is not None else 0)
        self.tokens_generated = 0  # every token sampled by generate_until, all samples

    # -- lm-eval's chat support ---------------------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        return f"neurotap-{self.model.info.name}-{self.model.chat_template}"

    def chat_template(self, chat_template: Any = False) -> str:
        return self.model.chat_template

    def apply_chat_template(self, chat_history: List[Dict[str, str]], add_generation_prompt: bool = True) -> str:
        self.chat_applied = True
        return self.model.apply_chat_template(chat_history, add_generation_prompt)

    def _encode(self, text: str) -> List[int]:
        # A rendered chat prompt writes its own BOS, as in Model.prompt_tokens.
        return self.model.tokenize(text, add_special=not self.chat_applied) if text else []

    # -- generation ---------------------------------------------------------------------
    def _options(self, gen_kwargs: Dict[str, Any]) -> Dict[str, Any]:
        o = dict(self.defaults)
        for key in SAMPLING_KEYS + NAD_KEYS:
            if key in gen_kwargs:
                o[key] = gen_kwargs[key]
        o["nad_n"] = int(o["nad_n"] or 0)
        o["early_stop"] = _int_or_none(o["early_stop"])
        until = gen_kwargs.get("until") or []
        o["stop"] = [until] if isinstance(until, str) else [s for s in until if s]
        o["max_tokens"] = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
        if o["nad_n"] == 0 and not gen_kwargs.get("do_sample", False) and "temperature" not in gen_kwargs:
            o["temperature"] = LMEVAL_GREEDY.temperature  # lm-eval's default: greedy
        return o

    def _generate(self, context: str, gen_kwargs: Dict[str, Any], repeats: int) -> List[str]:
        o = self._options(gen_kwargs)
        ids = self._encode(context)
        room = self.model.n_ctx - o["max_tokens"]
        if room < 1:
            raise ValueError(f"max_gen_toks={o['max_tokens']} leaves no room for a prompt in n_ctx={self.model.n_ctx}")
        ids = ids[-room:]  # lm-eval's convention: the prompt is cut from the left
        seed = request_seed(self.seed, context)
        sampling = {key: o[key] for key in SAMPLING_KEYS}
        if o["nad_n"] >= 1:
            early = o["early_stop"] if o["early_stop"] is not None and o["early_stop"] <= o["max_tokens"] else None
            best = best_of_n(self.model, ids, n=o["nad_n"], method=o["method"], early_stop=early,
                             max_tokens=o["max_tokens"], seed=seed, k=int(o["k"]), stop=o["stop"] or None,
                             **sampling)
            self.tokens_generated += best.tokens_generated
            return [best.text] * repeats
        with self.model.start_sampling(ids, n=repeats, max_tokens=o["max_tokens"], seed=seed,
                                       stop=o["stop"] or None, reducers=(), tap=False, **sampling) as run:
            run.advance()
            self.tokens_generated += run.tokens_sampled
            return [s.text for s in run.samples()]

    def generate_until(self, requests: List[Any], disable_tqdm: bool = False) -> List[str]:
        from tqdm.auto import tqdm

        groups: Dict[Tuple[str, str], List[int]] = {}
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            groups.setdefault((context, repr(sorted(gen_kwargs.items()))), []).append(i)
        out: List[Optional[str]] = [None] * len(requests)
        for positions in tqdm(groups.values(), desc="neurotap generate_until", disable=disable_tqdm):
            context, gen_kwargs = requests[positions[0]].args
            for p, text in zip(positions, self._generate(context, dict(gen_kwargs), len(positions))):
                out[p] = text
                self.cache_hook.add_partial("generate_until", requests[p].args, text)
        return out  # type: ignore[return-value]

    # -- scoring ------------------------------------------------------------------------
    def _pair(self, context: str, continuation: str) -> Tuple[List[int], List[int]]:
        """Context and continuation tokens as lm-eval's HF backend splits them: trailing spaces
        of the context go to the continuation, and the continuation is what the whole text adds."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = self._encode(context + continuation)
        ctx = self._encode(context)
        if whole[:len(ctx)] != ctx:  # the join merged across the boundary: tokenize apart
            return ctx, self.model.tokenize(continuation, add_special=False)
        return ctx, whole[len(ctx):]

    def _score(self, ctx: List[int], cont: List[int]) -> Tuple[float, bool]:
        if not cont:
            return 0.0, True
        if not ctx:
            ctx = [self.prefix_token]
        keep = self.model.n_ctx - len(cont)
        if keep < 1:
            raise ValueError(f"a continuation of {len(cont)} tokens does not fit n_ctx={self.model.n_ctx}")
        lp, top = self.model.forced_logprobs(ctx[-keep:], cont)
        return float(lp.sum()), bool((top == np.asarray(cont)).all())

    def loglikelihood(self, requests: List[Any], disable_tqdm: bool = False) -> List[Tuple[float, bool]]:
        from tqdm.auto import tqdm

        out = []
        for req in tqdm(requests, desc="neurotap loglikelihood", disable=disable_tqdm):
            context, continuation = req.args
            res = self._score(*self._pair(context, continuation))
            self.cache_hook.add_partial("loglikelihood", req.args, res)
            out.append(res)
        return out

    def loglikelihood_rolling(self, requests: List[Any], disable_tqdm: bool = False) -> List[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
        from tqdm.auto import tqdm

        out = []
        for req in tqdm(requests, desc="neurotap loglikelihood_rolling", disable=disable_tqdm):
            (text,) = req.args
            tokens = self.model.tokenize(text, add_special=False)
            total = 0.0
            for ctx, pred in map(make_disjoint_window, get_rolling_token_windows(
                    tokens, self.prefix_token, self.model.n_ctx - 1, 1)):
                total += self._score(list(ctx), list(pred))[0]
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
            out.append(total)
        return out


def main(argv: Optional[List[str]] = None) -> None:
    """lm-eval's own command line, with the `neurotap` model registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()
