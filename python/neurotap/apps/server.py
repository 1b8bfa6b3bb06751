"""`neurotap serve`: an OpenAI-compatible HTTP server on one model (FastAPI + uvicorn +
sse-starlette, as llama-cpp-python's server).

/v1/chat/completions, /v1/completions, /v1/models, /health. `n` samples decode as one parallel
batch; extra body fields add NAD best-of-N ("nad": {"n", "method", "early_stop", "k"}), NEAT
("neat": "default" or a calibration named at start), a reasoning budget ("reasoning_budget": N
tokens of thinking before "</think>" is forced) and "ignore_eos"; chat answers of models that
think in <think>...</think> come with "reasoning_content".

All native work runs on one worker thread, one request at a time, so no two runs ever share a
context; requests wait in a bounded queue (--max-queue) and get a 503 when it is full. A client
that disconnects cancels its request: a waiting one is dropped, a running one's native decode
loop is told to stop at its next step.
"""
from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from starlette.requests import Request  # module level: FastAPI reads the endpoints' annotations by name

from ..methods.nad import check_early_stop, decision_chunk, set_sizes, similarity
from ..methods.selection import METHODS, TOP_LOGPROBS, check_methods, pick_methods, select
from ..runtime.model import Model

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
FORCED_CLOSE = "\n</think>\n\n"  # what a spent reasoning budget appends
# OpenAI's finish reasons; neurotap's own are kept in the "neurotap" extension.
FINISH = {"eos": "stop", "stop": "stop", "stopped": "stop", "neat_exit": "stop", "length": "length",
          "cancelled": "stop"}
SLICE = 16  # tokens per native call outside streaming: bounds how late a cancel is seen
DEFAULTS = {"temperature": 0.8, "top_p": 0.95, "top_k": 40, "min_p": 0.05}  # llama-cpp-python's server's


class RequestError(ValueError):
    """A bad request: answered 400 in OpenAI's error format."""

    def __init__(self, message: str, param: Optional[str] = None, code: Optional[str] = None, status: int = 400):
        super().__init__(message)
        self.param, self.code, self.status = param, code, status


class QueueFull(Exception):
    pass


class Cancelled(Exception):
    pass


def error_body(message: str, kind: str, param: Optional[str] = None, code: Optional[str] = None) -> Dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# -- request parsing --------------------------------------------------------------------
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


class Server:
    """Request parsing, the worker thread and its bounded queue, on one model."""

    def __init__(self, model: Model, *, name: str, neat: Optional[Dict[str, Any]] = None, max_queue: int = 64):
        if max_queue < 0:
            raise ValueError(f"--max-queue must be >= 0, got {max_queue}")
        self.model, self.name, self.max_queue = model, name, int(max_queue)
        self.neat: Dict[str, Any] = dict(neat or {})
        self._queue: "queue.Queue[Optional[Job]]" = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0
        self.running: Optional[Job] = None
        self.stats = {"completed": 0, "cancelled": 0, "failed": 0, "rejected": 0, "completion_tokens": 0,
                      "last_cancelled": None}
        self._pieces: Dict[int, bytes] = {}
        self._thread: Optional[threading.Thread] = None
        self.created = int(time.time())

    # -- parsing ------------------------------------------------------------------------
    def parse(self, body: Any, kind: str) -> GenRequest:
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        model = self.model
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
            if body.get("suffix") or body.get("echo"):
                raise RequestError("'suffix' and 'echo' are not supported", "suffix" if body.get("suffix") else "echo")
        if not ids:
            raise RequestError("the prompt is empty", "prompt" if kind == "completion" else "messages")
        for key in ("presence_penalty", "frequency_penalty"):
            if body.get(key) not in (None, 0, 0.0):
                raise RequestError(f"'{key}' is not supported", key)
        if body.get("repeat_penalty") not in (None, 1, 1.0):
            raise RequestError("'repeat_penalty' is not supported (only 1.0)", "repeat_penalty")
        for key in ("tools", "functions", "response_format", "grammar", "logit_bias"):
            if body.get(key):
                raise RequestError(f"'{key}' is not supported", key)
        r = GenRequest(kind=kind, ids=ids, thinking=thinking)
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
        r.sampling = {"temperature": _number(body, "temperature", DEFAULTS["temperature"], 0, 2),
                      "top_p": _number(body, "top_p", DEFAULTS["top_p"], 0, 1),
                      "top_k": _number(body, "top_k", DEFAULTS["top_k"], 0, 2**31 - 1, integer=True),
                      "min_p": _number(body, "min_p", DEFAULTS["min_p"], 0, 1)}
        r.seed = _number(body, "seed", None, 0, 2**32 - 1, integer=True)
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
        if r.stream and r.n != 1:
            raise RequestError("'stream' needs n = 1", "stream")
        self._parse_methods(body, r)
        return r

    def _parse_methods(self, body: Dict[str, Any], r: GenRequest) -> None:
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
            if r.stream:
                raise RequestError("'stream' is not supported with 'nad'", "stream")
            r.nad = spec
        neat = body.get("neat")
        if neat is not None:
            if not isinstance(neat, str):
                raise RequestError("'neat' must be 'default' or the name of a calibration the server was started with",
                                   "neat")
            if neat not in self.neat and neat == "default":
                from ..methods.neat import load_calibration

                try:
                    self.neat["default"] = load_calibration("default", self.model)
                except (OSError, ValueError) as e:
                    raise RequestError(str(e), "neat") from None
            if neat not in self.neat:
                names = ", ".join(sorted(self.neat)) or "none"
                raise RequestError(f"unknown NEAT calibration {neat!r} (this server has: {names}; start it with "
                                   "--neat NAME=PATH)", "neat")
            r.neat_name, r.neat = neat, self.neat[neat]
        budget = body.get("reasoning_budget")
        if budget is not None:
            r.reasoning_budget = _number(body, "reasoning_budget", None, 0, 2**31 - 1, integer=True)
            if r.n != 1 or r.nad is not None:
                raise RequestError("'reasoning_budget' works with n = 1 and no 'nad'", "reasoning_budget")

    # -- queue --------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="neurotap-server", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            running = self.running
        if running is not None:
            running.cancel()
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, job: "Job") -> None:
        with self._lock:
            if self._waiting >= self.max_queue and (self.running is not None or self._waiting > 0):
                self.stats["rejected"] += 1
                raise QueueFull(f"server busy: {self._waiting} requests already wait (--max-queue {self.max_queue}); "
                                "retry later")
            self._waiting += 1
        self._queue.put(job)

    def health(self) -> Dict[str, Any]:
        with self._lock:
            return {"status": "ok", "model": self.name, "running": self.running.id if self.running else None,
                    "waiting": self._waiting, "max_queue": self.max_queue, **self.stats}

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                self._waiting -= 1
                self.running = job
            try:
                if job.cancelled:
                    raise Cancelled
                result = self._execute(job)
                with self._lock:
                    self.stats["completed"] += 1
                    self.stats["completion_tokens"] += result["usage"]["completion_tokens"]
                job.emit("done", result)
            except Cancelled:
                with self._lock:
                    self.stats["cancelled"] += 1
                    self.stats["last_cancelled"] = {"id": job.id, "tokens_sampled": job.spent,
                                                    "max_tokens": job.req.max_tokens}
                job.emit("error", RequestError("the request was cancelled", code="cancelled", status=499))
            except (ValueError, RequestError) as e:  # ContextError is a ValueError
                with self._lock:
                    self.stats["failed"] += 1
                job.emit("error", e if isinstance(e, RequestError) else RequestError(str(e)))
            except Exception as e:  # noqa: BLE001 - reported to the client, the worker goes on
                with self._lock:
                    self.stats["failed"] += 1
                job.emit("error", e)
            finally:
                with self._lock:
                    self.running = None

    # -- native work (worker thread) ----------------------------------------------------
    def _advance(self, job: "Job", run: Any, until: int, on_step: Any = None, step: int = SLICE,
                 start: int = 0) -> None:
        """Advances a run from `start` to `until` tokens in slices, so a cancel is seen within one
        slice even when it lands between two native calls (each call clears the native cancel flag)."""
        at = start
        while run.n_live and at < until:
            at = min(at + step, until)
            if job.cancelled:
                raise Cancelled
            job.attach(run._native)
            try:
                run._native.advance(at)
            finally:
                job.attach(None)
            job.spent = job.base_spent + run.tokens_sampled
            if job.cancelled:
                raise Cancelled
            if on_step is not None:
                on_step(run)

    def _start(self, job: "Job", ids: List[int], **kwargs: Any) -> Any:
        r = job.req
        return self.model.start_sampling(ids, seed=r.seed, stop=r.stop or None, ignore_eos=r.ignore_eos,
                                         neat=r.neat, **r.sampling, **kwargs)

    def _execute(self, job: "Job") -> Dict[str, Any]:
        r = job.req
        t0 = time.perf_counter()
        out = self._nad(job) if r.nad is not None else self._sample(job)
        out["usage"] = {"prompt_tokens": len(r.ids), "completion_tokens": job.spent,
                        "total_tokens": len(r.ids) + job.spent}
        out["seconds"] = time.perf_counter() - t0
        return out

    def _sample(self, job: "Job") -> Dict[str, Any]:
        r = job.req
        k = max(r.logprobs, 1) if r.want_logprobs else 0
        stream = _Streamer(job, r.stop) if r.stream else None
        step = 1 if stream else SLICE
        budget = r.reasoning_budget
        start = 0
        if budget == 0 and self._thinking_open(r, ""):  # no thinking at all: close the block at once
            return self._force_close(job, None, 0, stream, k)
        with self._start(job, r.ids, n=r.n, max_tokens=r.max_tokens, reducers=(), tap=r.neat is not None,
                         logprobs=k) as run:
            try:
                if budget:
                    start = min(budget, r.max_tokens)
                    self._advance(job, run, start, stream, step)
                    s = run.sample(0)
                    if run.n_live and self._thinking_open(r, s.text):  # budget spent mid-thought: force the close
                        run.close()
                        return self._force_close(job, s, run.tokens_sampled, stream, k)
                self._advance(job, run, r.max_tokens, stream, step, start)
            except Cancelled:
                run._native.finish_live("cancelled")
                raise
            samples = run.samples()
        if stream:
            stream.finish(samples[0].text.encode("utf-8"), samples[0])
        return {"choices": [self._choice(s, r) for s in samples]}

    @staticmethod
    def _thinking_open(r: GenRequest, text: str) -> bool:
        thinking = r.thinking or text.lstrip().startswith(THINK_OPEN)
        return thinking and THINK_CLOSE not in text

    def _force_close(self, job: "Job", first: Any, spent: int, stream: Optional["_Streamer"],
                     k: int) -> Dict[str, Any]:
        """Ends the thinking with FORCED_CLOSE after the budget and continues the answer in a run
        whose prompt holds the thoughts (the engine cannot inject tokens into a live run)."""
        r = job.req
        text1, tokens1 = (first.text, list(first.tokens)) if first is not None else ("", [])
        forced = self.model.tokenize(FORCED_CLOSE[1:] if text1.endswith("\n") or not text1 else FORCED_CLOSE,
                                     add_special=False)
        head_tokens = tokens1 + forced
        head_text = text1 + self.model.detokenize(forced)
        job.base_spent = job.spent = spent + len(forced)  # forced tokens are decoded, not sampled
        left = r.max_tokens - len(head_tokens)
        head = self._choice(first, r) if first is not None else {
            "index": 0, "logprobs": None, "neat_exit_at": -1, "neat_events": 0, "neat_bans": 0}
        if stream:
            stream.rebase(head_text.encode("utf-8"))
        if left <= 0:
            if stream:
                stream.finish(b"")
            return {"choices": [{**head, "text": head_text, "finish": "length", "tokens": len(head_tokens)}],
                    "forced_close": len(tokens1)}
        with self._start(job, r.ids + head_tokens, n=1, max_tokens=left, reducers=(), tap=r.neat is not None,
                         logprobs=k) as run:
            try:
                self._advance(job, run, left, stream, 1 if stream else SLICE)
            except Cancelled:
                run._native.finish_live("cancelled")
                raise
            s = run.sample(0)
        if stream:
            stream.finish(s.text.encode("utf-8"), s)
        choice = self._choice(s, r)
        choice.update(text=head_text + s.text, tokens=len(head_tokens) + s.n_tokens,
                      logprobs=(head["logprobs"] or []) + (choice["logprobs"] or []) if k else None)
        return {"choices": [choice], "forced_close": len(tokens1)}

    def _nad(self, job: "Job") -> Dict[str, Any]:
        r, spec = job.req, job.req.nad
        method, n, early = spec["method"], spec["n"], spec["early_stop"]
        k = max(r.logprobs, 1) if r.want_logprobs else 0
        lp = max(TOP_LOGPROBS if METHODS[method].needs_logprobs else 0, k)
        seed = r.seed if r.seed is not None else int.from_bytes(uuid.uuid4().bytes[:4], "little")
        r.seed = seed  # best_of_n's seeding: sample i from (seed, i), selection from seed
        with self._start(job, r.ids, n=n, max_tokens=r.max_tokens, reducers=("contributions",),
                         chunk=decision_chunk(early), logprobs=lp) as run:
            try:
                self._advance(job, run, early if early is not None else r.max_tokens)
                cands = run.samples()
                pick = select(cands, method, tokens=early, k=spec["k"], seed=seed, n_vocab=self.model.info.n_vocab)
                S = similarity(cands, early) if n >= 2 else None
                sizes = set_sizes(cands, early)
                pick = 0 if pick is None else pick  # majority with no majority: the first, as best_of_n
                run.keep([pick])
                self._advance(job, run, r.max_tokens, start=early or r.max_tokens)
            except Cancelled:
                run._native.finish_live("cancelled")
                raise
            winner = run.sample(pick)
        choice = self._choice(winner, r)
        choice["index"] = 0
        ext = {"method": method, "n": n, "early_stop": early, "pick": pick, "seed": seed,
               "similarity": S.round(6).tolist() if S is not None else None,
               "candidates": [{"index": c.index, "text": c.text, "tokens": c.n_tokens, "finish_reason": c.finish_reason,
                               "activated_neurons": int(sizes[i]),
                               "mean_similarity": float((S[i].sum() - S[i, i]) / (n - 1)) if S is not None else None}
                              for i, c in enumerate(cands)]}
        return {"choices": [choice], "nad": ext}

    def piece(self, token: int) -> bytes:
        p = self._pieces.get(token)
        if p is None:
            p = self._pieces[token] = self.model._native.detokenize([int(token)])
        return p

    @staticmethod
    def _choice(s: Any, r: GenRequest) -> Dict[str, Any]:
        lps = None
        if r.want_logprobs and s.token_logprob is not None:
            k = r.logprobs  # the run recorded at least one alternative: the token's own log-probability
            lps = [(t, float(s.token_logprob[j]), [(int(a), float(b)) for a, b in
                                                    zip(s.top_ids[j][:k], s.top_logprobs[j][:k])])
                   for j, t in enumerate(s.tokens)]
        return {"index": s.index, "text": s.text, "finish": s.finish_reason, "tokens": s.n_tokens, "logprobs": lps,
                "neat_exit_at": s.neat_exit_at, "neat_events": len(s.neat_events),
                "neat_bans": sum(1 for e in s.neat_events if e[1] == 1)}


class _Streamer:
    """Turns a run's growing text into stream deltas: never half a UTF-8 character, never the
    beginning of a stop string (the engine cuts a matched stop string from the text)."""

    def __init__(self, job: "Job", stops: List[str]):
        self.job = job
        self.stops = [s.encode("utf-8") for s in stops]
        self.base = b""  # text before the current run's (thoughts and a forced close)
        self.sent = 0  # bytes sent
        self.run_sent = 0  # tokens of the current run whose logprobs were sent

    def rebase(self, text: bytes) -> None:
        """A new run continues after `text`; its newly seen part goes out now."""
        self.base, self.run_sent = text, 0
        self._push(b"", None, False)

    def _safe_end(self, data: bytes) -> int:
        end = len(data)
        for s in self.stops:
            for n in range(min(len(s) - 1, len(data)), 0, -1):
                if data.endswith(s[:n]):
                    end = min(end, len(data) - n)
                    break
        i = end  # back off an incomplete UTF-8 sequence at the end
        while i > 0 and end - i < 3 and (data[i - 1] & 0xC0) == 0x80:
            i -= 1
        if i > 0 and data[i - 1] >= 0xC0:
            lead = data[i - 1]
            need = 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
            if end - (i - 1) < need:
                end = i - 1
        return end

    def _push(self, data: bytes, sample: Any, final: bool) -> None:
        full = self.base + data
        end = len(full) if final else self._safe_end(full)
        text = full[self.sent:end].decode("utf-8", errors="replace") if end > self.sent else ""
        self.sent = max(self.sent, end)
        lps = None
        if sample is not None and sample.token_logprob is not None and sample.n_tokens > self.run_sent:
            k = self.job.req.logprobs
            lps = [(sample.tokens[j], float(sample.token_logprob[j]),
                    [(int(a), float(b)) for a, b in zip(sample.top_ids[j][:k], sample.top_logprobs[j][:k])])
                   for j in range(self.run_sent, sample.n_tokens)]
            self.run_sent = sample.n_tokens
        if text or lps:
            self.job.emit("delta", {"text": text, "logprobs": lps})

    def __call__(self, run: Any) -> None:
        s = run.sample(0)
        self._push(s.text.encode("utf-8"), s, False)

    def finish(self, data: bytes, sample: Any = None) -> None:
        self._push(data, sample, True)


class Job:
    """One request between the event loop and the worker thread."""

    def __init__(self, req: GenRequest, loop: asyncio.AbstractEventLoop):
        self.req = req
        self.id = ("chatcmpl-" if req.kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.loop = loop
        self.events: "asyncio.Queue[Tuple[str, Any]]" = asyncio.Queue()
        self.cancelled = False
        self.finished = False
        self.spent = 0  # tokens sampled so far, all samples
        self.base_spent = 0
        self._native: Any = None
        self._lock = threading.Lock()

    def emit(self, kind: str, payload: Any) -> None:
        if kind in ("done", "error"):
            self.finished = True
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the event loop is gone (shutdown)
            pass

    def attach(self, native: Any) -> None:
        with self._lock:
            self._native = native
            cancel = native is not None and self.cancelled
        if cancel:
            native.cancel()

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            native = self._native
        if native is not None:
            native.cancel()


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


def _pending_marker(text: str, thinking: bool) -> bool:
    """Whether the end of a streamed text may still turn into a <think> or </think> marker."""
    t = text.lstrip()
    if not thinking and t and THINK_OPEN.startswith(t) and t != THINK_OPEN:
        return True
    return any(text.endswith(THINK_CLOSE[:n]) for n in range(1, len(THINK_CLOSE))) and THINK_CLOSE not in text


def _lp_token(srv: Server, t: int, lp: float) -> Dict[str, Any]:
    b = srv.piece(t)
    return {"token": b.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(b)}


def chat_logprobs(srv: Server, lps: Optional[list]) -> Optional[Dict[str, Any]]:
    if lps is None:
        return None
    return {"content": [{**_lp_token(srv, t, lp), "top_logprobs": [_lp_token(srv, a, b) for a, b in top]}
                        for t, lp, top in lps]}


def completion_logprobs(srv: Server, lps: Optional[list], offset: int = 0) -> Optional[Dict[str, Any]]:
    if lps is None:
        return None
    tokens, offsets, pos = [], [], offset
    for t, _, _ in lps:
        s = srv.piece(t).decode("utf-8", errors="replace")
        tokens.append(s)
        offsets.append(pos)
        pos += len(s)
    return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in lps], "text_offset": offsets,
            "top_logprobs": [{srv.piece(a).decode("utf-8", errors="replace"): b for a, b in top} for _, _, top in lps]}


def format_response(srv: Server, job: Job, result: Dict[str, Any]) -> Dict[str, Any]:
    r = job.req
    choices = []
    for c in result["choices"]:
        if r.kind == "chat":
            reasoning, content = split_reasoning(c["text"], r.thinking)
            msg: Dict[str, Any] = {"role": "assistant", "content": content}
            if reasoning is not None:
                msg["reasoning_content"] = reasoning
            choices.append({"index": c["index"], "message": msg, "logprobs": chat_logprobs(srv, c["logprobs"]),
                            "finish_reason": FINISH.get(c["finish"], "stop")})
        else:
            choices.append({"index": c["index"], "text": c["text"], "logprobs": completion_logprobs(srv, c["logprobs"]),
                            "finish_reason": FINISH.get(c["finish"], "stop")})
    ext: Dict[str, Any] = {"finish_reasons": [c["finish"] for c in result["choices"]],
                           "seconds": round(result["seconds"], 4)}
    if "nad" in result:
        ext["nad"] = result["nad"]
    if r.neat is not None:
        ext["neat"] = {"calibration": r.neat_name,
                       "samples": [{"exit_at": c["neat_exit_at"], "decisions": c["neat_events"], "bans": c["neat_bans"]}
                                   for c in result["choices"]]}
    if "forced_close" in result:
        ext["reasoning_budget"] = {"forced_after": result["forced_close"]}
    return {"id": job.id, "object": "chat.completion" if r.kind == "chat" else "text_completion",
            "created": job.created, "model": srv.name, "choices": choices, "usage": result["usage"],
            "neurotap": ext}


def create_app(srv: Server) -> Any:
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from sse_starlette.sse import EventSourceResponse
    from starlette.exceptions import HTTPException

    @asynccontextmanager
    async def lifespan(app: Any) -> Any:
        srv.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, srv.stop)

    app = FastAPI(title="neurotap", lifespan=lifespan)

    def err(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> Any:
        kind = "invalid_request_error" if status < 500 else "server_error"
        headers = {"Retry-After": "1"} if status == 503 else None
        return JSONResponse(error_body(message, kind, param, code), status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Any, exc: Any) -> Any:
        return err(400, str(exc))

    @app.exception_handler(HTTPException)
    async def _http(request: Any, exc: Any) -> Any:
        return err(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)

    @app.get("/health")
    async def health() -> Any:
        return srv.health()

    @app.get("/v1/models")
    async def models() -> Any:
        i = srv.model.info
        return {"object": "list", "data": [{"id": srv.name, "object": "model", "created": srv.created,
                                            "owned_by": "neurotap",
                                            "meta": {"path": i.path, "architecture": i.architecture,
                                                     "n_ctx": srv.model.n_ctx, "n_layers": i.n_layers, "n_ff": i.n_ff,
                                                     "n_vocab": i.n_vocab, "n_params": i.n_params,
                                                     "chat_template": srv.model.chat_template,
                                                     "neat": sorted(srv.neat)}}]}

    async def handle(request: Request, kind: str) -> Any:
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as e:
            return err(400, f"the request body is not valid JSON: {e}")
        try:
            req = srv.parse(body, kind)
        except RequestError as e:
            return err(e.status, str(e), e.param, e.code)
        job = Job(req, asyncio.get_running_loop())
        try:
            srv.submit(job)
        except QueueFull as e:
            return err(503, str(e), code="queue_full")
        if req.stream:
            return EventSourceResponse(stream(job), sep="\n", ping=15)
        try:
            while True:
                try:
                    kind_, payload = await asyncio.wait_for(job.events.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        job.cancel()
                        return err(499, "client disconnected", code="cancelled")
                    continue
                if kind_ == "done":
                    return format_response(srv, job, payload)
                if kind_ == "error":
                    if isinstance(payload, RequestError):
                        return err(payload.status, str(payload), payload.param, payload.code)
                    return err(500, f"{type(payload).__name__}: {payload}")
        finally:
            if not job.finished:
                job.cancel()

    def chunk(job: Job, choice: Dict[str, Any]) -> Dict[str, Any]:
        obj = "chat.completion.chunk" if job.req.kind == "chat" else "text_completion"
        return {"data": json.dumps({"id": job.id, "object": obj, "created": job.created, "model": srv.name,
                                    "choices": [{"index": 0, **choice}]})}

    async def stream(job: Job) -> Any:
        r = job.req
        text = ""  # all streamed text; chat splits it into reasoning and content
        sent_r = sent_c = 0
        try:
            if r.kind == "chat":
                yield chunk(job, {"delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None})
            while True:
                kind_, payload = await job.events.get()
                if kind_ == "delta":
                    if r.kind == "completion":
                        yield chunk(job, {"text": payload["text"], "finish_reason": None,
                                          "logprobs": completion_logprobs(srv, payload["logprobs"], len(text))})
                        text += payload["text"]
                        continue
                    text += payload["text"]
                    if _pending_marker(text, r.thinking):
                        continue
                    reasoning, content = split_reasoning(text, r.thinking)
                    delta: Dict[str, Any] = {}
                    if reasoning is not None and len(reasoning) > sent_r:
                        delta["reasoning_content"] = reasoning[sent_r:]
                        sent_r = len(reasoning)
                    if len(content) > sent_c:
                        delta["content"] = content[sent_c:]
                        sent_c = len(content)
                    lps = chat_logprobs(srv, payload["logprobs"])
                    if delta or lps:
                        yield chunk(job, {"delta": delta, "logprobs": lps, "finish_reason": None})
                elif kind_ == "done":
                    c = payload["choices"][0]
                    fin = FINISH.get(c["finish"], "stop")
                    if r.kind == "chat":
                        reasoning, content = split_reasoning(text, r.thinking)
                        delta = {}
                        if reasoning is not None and len(reasoning) > sent_r:
                            delta["reasoning_content"] = reasoning[sent_r:]
                        if len(content) > sent_c:
                            delta["content"] = content[sent_c:]
                        yield chunk(job, {"delta": delta, "logprobs": None, "finish_reason": fin})
                    else:
                        yield chunk(job, {"text": "", "logprobs": None, "finish_reason": fin})
                    if r.include_usage:
                        obj = "chat.completion.chunk" if r.kind == "chat" else "text_completion"
                        yield {"data": json.dumps({"id": job.id, "object": obj, "created": job.created,
                                                   "model": srv.name, "choices": [], "usage": payload["usage"]})}
                    yield {"data": "[DONE]"}
                    return
                else:
                    e = payload
                    status = e.status if isinstance(e, RequestError) else 500
                    yield {"data": json.dumps(error_body(str(e), "invalid_request_error" if status < 500
                                                         else "server_error", getattr(e, "param", None),
                                                         getattr(e, "code", None)))}
                    return
        finally:
            if not job.finished:
                job.cancel()  # the client went away: stop the run

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await handle(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await handle(request, "completion")

    return app


def parse_neat_args(items: List[str], model: Model) -> Dict[str, Any]:
    """--neat NAME=PATH (or 'default'): calibrations resolved for the model at start."""
    from ..methods.neat import load_calibration

    out: Dict[str, Any] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:  # a bare path (or 'default') names itself
            path = name
        if not name or not path:
            raise ValueError(f"--neat takes NAME=PATH, got {item!r}")
        out[name] = load_calibration(path, model)
    return out


def serve(model: Model, *, host: str = "127.0.0.1", port: int = 8080, name: Optional[str] = None,
          neat: Optional[Dict[str, Any]] = None, max_queue: int = 64, log_level: str = "warning") -> None:
    import sys

    import uvicorn

    srv = Server(model, name=name or model.info.name, neat=neat, max_queue=max_queue)
    app = create_app(srv)
    print(f"neurotap serve: {srv.name} on http://{host}:{port}/v1 (max queue {max_queue}"
          f"{', NEAT: ' + ', '.join(sorted(srv.neat)) if srv.neat else ''})", file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
