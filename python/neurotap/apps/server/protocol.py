"""The OpenAI side of the server: request bodies checked and parsed into GenRequest, errors in
OpenAI's format, finish reasons mapped, and responses (with logprobs and reasoning content) built."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from ...core.defaults import SERVER
from ...methods.nad import check_early_stop
from ...methods.selection import METHODS, check_methods, pick_methods
from ...runtime.model import Model

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
FORCED_CLOSE = "\n</think>\n\n"  # what a spent reasoning budget appends
# OpenAI's finish reason of each the runtime reports (FINISH_REASONS); neurotap's own are kept in
# the "neurotap" extension. Only a spent token budget is "length": NEAT's and NeuReasoner's exits
# end the answer as an end-of-generation token would.
FINISH = {"eos": "stop", "stop": "stop", "stopped": "stop", "cancelled": "stop", "neat_exit": "stop",
          "neureasoner_exit": "stop", "length": "length"}
Piece = Callable[[int], bytes]  # a token's bytes


class RequestError(ValueError):
    """A bad request: answered 400 in OpenAI's error format."""

    def __init__(self, message: str, param: Optional[str] = None, code: Optional[str] = None, status: int = 400):
        super().__init__(message)
        self.param, self.code, self.status = param, code, status


def error_body(message: str, kind: str, param: Optional[str] = None, code: Optional[str] = None) -> Dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# -- request parsing --------------------------------------------------------------------
MAX_DEPTH = 64  # JSON nesting a request may have (a chat body needs 5)


def decode_body(raw: bytes) -> Any:
    """The JSON of a request body, or a RequestError: not JSON, not UTF-8, NaN or Infinity,
    numbers too long to read, nesting too deep for json's recursion (RecursionError)."""
    def no_constant(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON number")

    try:
        body = json.loads(raw, parse_constant=no_constant)
    except RecursionError:
        raise RequestError(f"the request body is nested too deeply (more than {MAX_DEPTH} levels)") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, bad UTF-8, over-long integers
        raise RequestError(f"the request body is not valid JSON: {e}") from None
    return body  # parse_request checks the rest (check_json)


def check_json(body: Any) -> None:
    """RequestError for what JSON can hold and a request cannot: nesting deeper than MAX_DEPTH, a
    string (or key) that is not valid Unicode (a lone surrogate such as "\\ud800" decodes to a str
    that UTF-8 cannot encode). Iterative: no recursion on the client's nesting."""
    stack: List[Tuple[Any, str, int]] = [(body, "", 0)]
    while stack:
        v, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise RequestError(f"the request body is nested too deeply (more than {MAX_DEPTH} levels)", path or None)
        if isinstance(v, str):
            _unicode(v, path)
        elif isinstance(v, dict):
            for k, x in v.items():
                _unicode(k, path)
                stack.append((x, f"{path}.{k}" if path else k, depth + 1))
        elif isinstance(v, list):
            stack.extend((x, f"{path}[{i}]", depth + 1) for i, x in enumerate(v))


def _unicode(text: str, path: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(f"{path or 'the request body'} holds {text[e.start:e.end]!r} at character {e.start}, "
                           "which is not valid Unicode (a lone surrogate)", path or None) from None


def _number(body: Dict[str, Any], key: str, default: Any, lo: float, hi: float, integer: bool = False) -> Any:
    v = body.get(key)
    if v is None:
        return default
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or not lo <= v <= hi:
        kind = "an integer" if integer else "a number"
        raise RequestError(f"'{key}' must be {kind} in [{lo}, {hi}], got {v!r}", key)
    return int(v) if integer else float(v)


def _flag(body: Dict[str, Any], key: str, default: bool = False) -> bool:
    v = body.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise RequestError(f"'{key}' must be true or false, got {v!r}", key)
    return v


def _content(m: Dict[str, Any], i: int) -> str:
    c = m.get("content")
    if c is None:
        return ""
    if isinstance(c, str):
        return c
    if isinstance(c, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                   for p in c):
        return "".join(p["text"] for p in c)
    raise RequestError(f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")


@dataclass
class GenRequest:
    kind: str  # "chat" or "completion"
    ids: List[int]
    n: int = 1
    max_tokens: int = 16
    sampling: Dict[str, Any] = field(default_factory=dict)  # temperature, top_p, top_k, min_p
    seed: Optional[int] = None
    stop: List[str] = field(default_factory=list)
    logprobs: int = 0  # top alternatives to return per token (chat: with logprobs=true)
    want_logprobs: bool = False
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False
    thinking: bool = False  # the prompt opens a <think> block
    nad: Optional[Dict[str, Any]] = None
    neat_name: Optional[str] = None
    neat: Any = None
    reasoning_budget: Optional[int] = None
    logit_bias: Dict[int, float] = field(default_factory=dict)
    echo: bool = False
    prompt_text: str = ""  # what echo prepends (completions)
    neureasoner_name: Optional[str] = None
    neureasoner: Any = None


def parse_request(body: Any, kind: str, model: Model, neat: Dict[str, Any],
                  neureasoner: Optional[Dict[str, Any]] = None) -> GenRequest:
    """A request body checked and turned into a GenRequest (RequestError names what is wrong).
    `neat`: the calibrations requests may name ('default' is loaded into it on first use);
    `neureasoner`: the NeuReasoner calibrations the server was started with, by name."""
    check_json(body)
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    thinking = False
    if kind == "chat":
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise RequestError("'messages' must be a non-empty list", "messages")
        clean = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise RequestError(f"messages[{i}] must be an object with a 'role'", f"messages[{i}]")
            clean.append({**m, "content": _content(m, i)})
        kwargs = body.get("chat_template_kwargs")
        if kwargs is not None and not isinstance(kwargs, dict):
            raise RequestError("'chat_template_kwargs' must be an object", "chat_template_kwargs")
        try:
            text = model.apply_chat_template(clean, chat_template_kwargs=kwargs or None)
        except ValueError as e:
            raise RequestError(str(e), "messages") from None
        ids = model.tokenize(text, add_special=False)  # as Model.prompt_tokens and llama-cpp-python
        thinking = text.rstrip().endswith(THINK_OPEN)
    else:
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
            p = p[0]
        if isinstance(p, str):
            ids = model.tokenize(p)
        elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            if not all(0 <= t < model.info.n_vocab for t in p):
                raise RequestError("'prompt' holds a token id outside the vocabulary", "prompt")
            ids = list(p)
        else:
            raise RequestError("'prompt' must be a string, a list of one string or a list of token ids", "prompt")
        if body.get("suffix"):
            raise RequestError("'suffix' is not supported", "suffix")
        echo_text = p if isinstance(p, str) else model.detokenize(ids)
    if not ids:
        raise RequestError("the prompt is empty", "prompt" if kind == "completion" else "messages")
    for key in ("presence_penalty", "frequency_penalty"):
        if body.get(key) not in (None, 0, 0.0):
            raise RequestError(f"'{key}' is not supported", key)
    if body.get("repeat_penalty") not in (None, 1, 1.0):
        raise RequestError("'repeat_penalty' is not supported (only 1.0)", "repeat_penalty")
    for key in ("tools", "functions", "response_format", "grammar"):
        if body.get(key):
            raise RequestError(f"'{key}' is not supported", key)
    r = GenRequest(kind=kind, ids=ids, thinking=thinking)
    if kind == "completion":
        r.echo, r.prompt_text = _flag(body, "echo"), echo_text
    r.logit_bias = _logit_bias(body.get("logit_bias"), model.info.n_vocab)
    room = model.n_ctx - len(ids)
    if room <= 0:
        raise RequestError(f"the prompt ({len(ids)} tokens) fills the context of {model.n_ctx} tokens",
                           "messages" if kind == "chat" else "prompt", "context_length_exceeded")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    default = room if kind == "chat" else 16
    r.max_tokens = _number(body, key, default, 1, 2**31 - 1, integer=True)
    if r.max_tokens > room:
        raise RequestError(f"the prompt ({len(ids)} tokens) plus {key}={r.max_tokens} exceeds the context of "
                           f"{model.n_ctx} tokens; at most {room} fit", key, "context_length_exceeded")
    r.n = _number(body, "n", 1, 1, 256, integer=True)
    r.sampling = {"temperature": _number(body, "temperature", SERVER.temperature, 0, 2),
                  "top_p": _number(body, "top_p", SERVER.top_p, 0, 1),
                  "top_k": _number(body, "top_k", SERVER.top_k, 0, 2**31 - 1, integer=True),
                  "min_p": _number(body, "min_p", SERVER.min_p, 0, 1)}
    r.seed = _number(body, "seed", SERVER.seed, 0, 2**32 - 1, integer=True)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
        raise RequestError("'stop' must be a string or a list of non-empty strings", "stop")
    r.stop = list(stop or [])
    if kind == "chat":
        r.want_logprobs = _flag(body, "logprobs")
        r.logprobs = _number(body, "top_logprobs", 0, 0, 20, integer=True)
        if r.logprobs and not r.want_logprobs:
            raise RequestError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    else:
        r.logprobs = _number(body, "logprobs", 0, 0, 20, integer=True) if body.get("logprobs") is not None else 0
        r.want_logprobs = body.get("logprobs") is not None
    r.stream = _flag(body, "stream")
    so = body.get("stream_options")
    if so is not None:
        if not isinstance(so, dict):
            raise RequestError("'stream_options' must be an object", "stream_options")
        r.include_usage = _flag(so, "include_usage")
    r.ignore_eos = _flag(body, "ignore_eos")
    if r.echo and r.stream and r.want_logprobs:
        raise RequestError("'echo' with 'logprobs' is not streamed: ask without 'stream' (the prompt's "
                           "log-probabilities come in the whole answer)", "echo")
    _parse_methods(body, r, model, neat, neureasoner or {})
    return r


def _logit_bias(v: Any, n_vocab: int) -> Dict[int, float]:
    """OpenAI's logit_bias: {"token id": bias in [-100, 100]}."""
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise RequestError("'logit_bias' must be an object of token ids (as strings) to biases in [-100, 100]",
                           "logit_bias")
    out: Dict[int, float] = {}
    for k, b in v.items():
        t = int(k) if isinstance(k, str) and k.isascii() and k.isdigit() and len(k) <= 10 else -1
        if not 0 <= t < n_vocab:
            raise RequestError(f"'logit_bias' key {k!r} is not a token id in [0, {n_vocab})", "logit_bias")
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not -100 <= b <= 100:
            raise RequestError(f"'logit_bias' of token {k} must be a number in [-100, 100], got {b!r}", "logit_bias")
        out[t] = float(b)
    return out


def _parse_methods(body: Dict[str, Any], r: GenRequest, model: Model, neat_cals: Dict[str, Any],
                   nr_cals: Dict[str, Any]) -> None:
    nad = body.get("nad")
    if nad is not None:
        if not isinstance(nad, dict):
            raise RequestError("'nad' must be an object: {\"n\", \"method\", \"early_stop\", \"k\"}", "nad")
        unknown = set(nad) - {"n", "method", "early_stop", "k"}
        if unknown:
            raise RequestError(f"unknown 'nad' fields: {', '.join(sorted(unknown))}", "nad")
        spec = {"n": _number(nad, "n", 16, 1, 256, integer=True), "method": nad.get("method", "knn"),
                "early_stop": _number(nad, "early_stop", None, 1, 2**31 - 1, integer=True),
                "k": _number(nad, "k", 3, 1, 256, integer=True)}
        m = spec["method"]
        if not isinstance(m, str) or m not in METHODS or METHODS[m].pick is None:
            raise RequestError(f"'nad.method' must be one of {', '.join(pick_methods())}, got {m!r}", "nad.method")
        try:
            check_methods([m], spec["n"])
            check_early_stop(spec["early_stop"], r.max_tokens)
        except ValueError as e:
            raise RequestError(str(e), "nad") from None
        if spec["early_stop"] is not None and not METHODS[m].early:
            raise RequestError(f"method '{m}' cannot decide early (nad.early_stop)", "nad.early_stop")
        if r.n != 1:
            raise RequestError("'n' must be 1 with 'nad' (nad.n sets the samples)", "n")
        r.nad = spec
    neat = body.get("neat")
    if neat is not None:
        if not isinstance(neat, str):
            raise RequestError("'neat' must be 'default' or the name of a calibration the server was started with",
                               "neat")
        if neat not in neat_cals and neat == "default":
            from ...methods.neat import load_calibration

            try:
                neat_cals["default"] = load_calibration("default", model)
            except (OSError, ValueError) as e:
                raise RequestError(str(e), "neat") from None
        if neat not in neat_cals:
            names = ", ".join(sorted(neat_cals)) or "none"
            raise RequestError(f"unknown NEAT calibration {neat!r} (this server has: {names}; start it with "
                               "--neat NAME=PATH)", "neat")
        r.neat_name, r.neat = neat, neat_cals[neat]
    budget = body.get("reasoning_budget")
    if budget is not None:
        r.reasoning_budget = _number(body, "reasoning_budget", None, 0, 2**31 - 1, integer=True)
        if r.n != 1 or r.nad is not None:
            raise RequestError("'reasoning_budget' works with n = 1 and no 'nad'", "reasoning_budget")
    _parse_neureasoner(body.get("neureasoner"), r, nr_cals)


def _parse_neureasoner(v: Any, r: GenRequest, cals: Dict[str, Any]) -> None:
    """"neureasoner": "NAME" or {"calibration": "NAME", "actions": {"intra": "none", ...}}: a
    calibration the server was started with (--neureasoner NAME=PATH), its actions overridden."""
    if v is None:
        return
    from ...methods.neureasoner import ACTIONS, LEVELS

    actions: Any = {}
    if isinstance(v, dict):
        unknown = set(v) - {"calibration", "actions"}
        if unknown:
            raise RequestError(f"unknown 'neureasoner' fields: {', '.join(sorted(unknown))}", "neureasoner")
        v, actions = v.get("calibration"), v.get("actions") or {}
        if not isinstance(actions, dict) or not all(
                k in LEVELS and isinstance(a, str) and a in ACTIONS for k, a in actions.items()):
            raise RequestError(f"'neureasoner.actions' must map levels ({', '.join(LEVELS)}) to actions "
                               f"({', '.join(ACTIONS)})", "neureasoner.actions")
    if not isinstance(v, str) or v not in cals:
        names = ", ".join(sorted(cals)) or "none"
        raise RequestError(f"unknown NeuReasoner calibration {v!r} (this server has: {names}; start it with "
                           "--neureasoner NAME=PATH)", "neureasoner")
    if r.nad is not None:
        raise RequestError("'neureasoner' does not run inside a NAD race ('nad'): its rollbacks rewrite the "
                           "neuron records the race decides on", "neureasoner")
    if r.reasoning_budget is not None:
        raise RequestError("'neureasoner' and 'reasoning_budget' both end the reasoning: give one", "neureasoner")
    cal = cals[v].with_actions(**actions) if actions else cals[v]
    if r.stream and r.want_logprobs and rolls_back(cal):
        raise RequestError("a streamed answer's log-probabilities cannot follow NeuReasoner's rollbacks: ask "
                           "without 'stream', or with actions that do not roll back (none, exit)", "neureasoner")
    r.neureasoner_name, r.neureasoner = v, cal


def rolls_back(cal: Any) -> bool:
    """Whether a NeuReasoner calibration may take back generated text (resample, redirect)."""
    return any(d.enabled and d.action in ("resample", "redirect") for d in cal.levels.values())


# -- response formatting ----------------------------------------------------------------
def split_reasoning(text: str, thinking: bool) -> Tuple[Optional[str], str]:
    """(reasoning_content, content) of a reply that thinks in <think>...</think> (the prompt may
    have opened the block); (None, text) for one that does not."""
    t = text
    if not thinking:
        if not t.lstrip().startswith(THINK_OPEN):
            return None, text
        t = t.lstrip()[len(THINK_OPEN):]
    i = t.find(THINK_CLOSE)
    if i < 0:
        return t.lstrip(), ""
    return t[:i].lstrip(), t[i + len(THINK_CLOSE):].lstrip()


def pending_marker(text: str, thinking: bool) -> bool:
    """Whether the end of a streamed text may still turn into a <think> or </think> marker."""
    t = text.lstrip()
    if not thinking and t and THINK_OPEN.startswith(t) and t != THINK_OPEN:
        return True
    return text.endswith(_CLOSE_HEADS) and THINK_CLOSE not in text


_CLOSE_HEADS = tuple(THINK_CLOSE[:n] for n in range(1, len(THINK_CLOSE)))  # a close marker's proper beginnings


def _lp_token(piece: Piece, t: int, lp: float) -> Dict[str, Any]:
    b = piece(t)
    return {"token": b.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(b)}


def chat_logprobs(piece: Piece, lps: Optional[list]) -> Optional[Dict[str, Any]]:
    if lps is None:
        return None
    return {"content": [{**_lp_token(piece, t, lp), "top_logprobs": [_lp_token(piece, a, b) for a, b in top]}
                        for t, lp, top in lps]}


def completion_logprobs(piece: Piece, lps: Optional[list], offset: int = 0) -> Optional[Dict[str, Any]]:
    """The legacy logprobs object; an entry (token, None, None) is a prompt's first token (echo),
    which has no log-probability."""
    if lps is None:
        return None
    tokens, offsets, pos = [], [], offset
    for t, _, _ in lps:
        s = piece(t).decode("utf-8", errors="replace")
        tokens.append(s)
        offsets.append(pos)
        pos += len(s)
    return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in lps], "text_offset": offsets,
            "top_logprobs": [None if top is None else {piece(a).decode("utf-8", errors="replace"): b for a, b in top}
                             for _, _, top in lps]}


def extension(job: Any, result: Dict[str, Any]) -> Dict[str, Any]:
    """The "neurotap" extension of a finished job's response (or its stream's last chunk): finish
    reasons, seconds, and what NAD, NEAT, NeuReasoner and a reasoning budget did."""
    r = job.req
    ext: Dict[str, Any] = {"finish_reasons": [c["finish"] for c in result["choices"]],
                           "seconds": round(result["seconds"], 4)}
    if "nad" in result:
        ext["nad"] = result["nad"]
    if r.neat is not None:
        ext["neat"] = {"calibration": r.neat_name,
                       "samples": [{"exit_at": c["neat_exit_at"], "decisions": c["neat_events"], "bans": c["neat_bans"]}
                                   for c in result["choices"]]}
    if r.neureasoner is not None:
        ext["neureasoner"] = {"calibration": r.neureasoner_name,
                              "samples": [{"exit_at": c["neureasoner_exit_at"], "events": c["neureasoner_events"]}
                                          for c in result["choices"]]}
    if "forced_close" in result:
        ext["reasoning_budget"] = {"forced_after": result["forced_close"]}
    return ext


def format_response(job: Any, result: Dict[str, Any], name: str, piece: Piece) -> Dict[str, Any]:
    """The OpenAI response body of a finished job (its `req`, `id`, `created`)."""
    r = job.req
    choices = []
    for c in result["choices"]:
        if r.kind == "chat":
            reasoning, content = split_reasoning(c["text"], r.thinking)
            msg: Dict[str, Any] = {"role": "assistant", "content": content}
            if reasoning is not None:
                msg["reasoning_content"] = reasoning
            choices.append({"index": c["index"], "message": msg, "logprobs": chat_logprobs(piece, c["logprobs"]),
                            "finish_reason": FINISH[c["finish"]]})
        else:
            lps = c["logprobs"]
            if r.echo and lps is not None:  # the prompt's tokens first (the engine computed them)
                lps = result["prompt_logprobs"] + lps
            choices.append({"index": c["index"], "text": (r.prompt_text if r.echo else "") + c["text"],
                            "logprobs": completion_logprobs(piece, lps), "finish_reason": FINISH[c["finish"]]})
    return {"id": job.id, "object": "chat.completion" if r.kind == "chat" else "text_completion",
            "created": job.created, "model": name, "choices": choices, "usage": result["usage"],
            "neurotap": extension(job, result)}
