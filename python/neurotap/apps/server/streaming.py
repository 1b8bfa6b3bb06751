"""Streaming: a run's growing text turned into deltas (Streamer, on the worker thread) and the
deltas into OpenAI's server-sent events (sse_events, on the event loop)."""
from __future__ import annotations

import json
from typing import Any, Dict, List

from .protocol import (FINISH, Piece, RequestError, chat_logprobs, completion_logprobs, error_body, pending_marker,
                       split_reasoning)


class Streamer:
    """Turns a run's growing text into stream deltas: never half a UTF-8 character, never the
    beginning of a stop string (the engine cuts a matched stop string from the text)."""

    def __init__(self, job: Any, stops: List[str]):
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
        self.update(run.sample(0))

    def update(self, sample: Any) -> None:
        """The streamed sample as it stands now: what it added goes out."""
        self._push(sample.text.encode("utf-8"), sample, False)

    def finish(self, data: bytes, sample: Any = None) -> None:
        self._push(data, sample, True)



def chunk(job: Any, name: str, choice: Dict[str, Any]) -> Dict[str, Any]:
    obj = "chat.completion.chunk" if job.req.kind == "chat" else "text_completion"
    return {"data": json.dumps({"id": job.id, "object": obj, "created": job.created, "model": name,
                                "choices": [{"index": 0, **choice}]})}

async def sse_events(job: Any, name: str, piece: Piece) -> Any:
    """The server-sent events of a streamed job: its deltas as they come (chat text split into
    reasoning and content), the finish, the usage if asked, [DONE]; an error event instead."""
    r = job.req
    text = ""  # all streamed text; chat splits it into reasoning and content
    sent_r = sent_c = 0
    try:
        if r.kind == "chat":
            yield chunk(job, name, {"delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None})
        while True:
            kind_, payload = await job.events.get()
            if kind_ == "delta":
                if r.kind == "completion":
                    yield chunk(job, name, {"text": payload["text"], "finish_reason": None,
                                      "logprobs": completion_logprobs(piece, payload["logprobs"], len(text))})
                    text += payload["text"]
                    continue
                text += payload["text"]
                if pending_marker(text, r.thinking):
                    continue
                reasoning, content = split_reasoning(text, r.thinking)
                delta: Dict[str, Any] = {}
                if reasoning is not None and len(reasoning) > sent_r:
                    delta["reasoning_content"] = reasoning[sent_r:]
                    sent_r = len(reasoning)
                if len(content) > sent_c:
                    delta["content"] = content[sent_c:]
                    sent_c = len(content)
                lps = chat_logprobs(piece, payload["logprobs"])
                if delta or lps:
                    yield chunk(job, name, {"delta": delta, "logprobs": lps, "finish_reason": None})
            elif kind_ == "done":
                c = payload["choices"][0]
                fin = FINISH[c["finish"]]
                if r.kind == "chat":
                    reasoning, content = split_reasoning(text, r.thinking)
                    delta = {}
                    if reasoning is not None and len(reasoning) > sent_r:
                        delta["reasoning_content"] = reasoning[sent_r:]
                    if len(content) > sent_c:
                        delta["content"] = content[sent_c:]
                    yield chunk(job, name, {"delta": delta, "logprobs": None, "finish_reason": fin})
                else:
                    yield chunk(job, name, {"text": "", "logprobs": None, "finish_reason": fin})
                if r.include_usage:
                    obj = "chat.completion.chunk" if r.kind == "chat" else "text_completion"
                    yield {"data": json.dumps({"id": job.id, "object": obj, "created": job.created,
                                               "model": name, "choices": [], "usage": payload["usage"]})}
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
