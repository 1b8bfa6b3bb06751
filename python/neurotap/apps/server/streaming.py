"""Streaming: a run's growing text turned into deltas (Streamer, on the worker thread) and the
deltas into OpenAI's server-sent events (sse_events, on the event loop)."""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

from .protocol import (FINISH, Piece, RequestError, chat_logprobs, completion_logprobs, error_body, extension,
                       pending_marker, split_reasoning)


class Streamer:
    """Turns a run's growing text into stream deltas of choice `index`: never half a UTF-8
    character, never the beginning of a stop string (the engine cuts a matched stop string from
    the text). `piece` given: only whole lines before the newest token go out until the end (text
    that NeuReasoner's rollbacks, which go back to the start of the current line, cannot take back)."""

    def __init__(self, job: Any, stops: List[str], index: int = 0, piece: Optional[Piece] = None):
        self.job, self.index, self.piece = job, index, piece
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
        if self.piece is not None and not final:
            last = len(self.piece(sample.last_token)) if sample is not None and sample.n_tokens else 0
            end = min(end, full.rfind(b"\n", 0, max(len(full) - last, 0)) + 1)
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
            self.job.emit("delta", {"index": self.index, "text": text, "logprobs": lps})

    def __call__(self, run: Any) -> None:
        self.update(run.stream_view(0))

    def update(self, sample: Any) -> None:
        """The streamed sample as it stands now (a Sample or its TextView): what it added goes out."""
        self._push(sample.text_bytes, sample, False)

    def finish(self, data: bytes, sample: Any = None) -> None:
        self._push(data, sample, True)


class Streamers:
    """The streams of a run's n samples (OpenAI's indexed choices): each step, what every live
    sample added goes out under its index; a sample that ended sends the rest of its text once."""

    def __init__(self, job: Any, stops: List[str], n: int, piece: Optional[Piece] = None):
        self.streams = [Streamer(job, stops, i, piece) for i in range(n)]
        self.done = [False] * n

    def __call__(self, run: Any) -> None:
        for i, st in enumerate(self.streams):
            if not self.done[i]:
                s = run.stream_view(i)
                self.done[i] = s.finish_reason != ""
                (st.finish(s.text_bytes, s) if self.done[i] else st.update(s))

    def finish(self, samples: List[Any]) -> None:
        for i, s in enumerate(samples):
            if not self.done[i]:
                self.done[i] = True
                self.streams[i].finish(s.text_bytes, s)



def event(data: str) -> bytes:
    """A server-sent event of one data line, encoded as sse_starlette would (sep "\\n") but
    without its per-event objects; `data` holds no line break (json.dumps escapes them)."""
    return b"data: " + data.encode("utf-8") + b"\n\n"


def chunk(job: Any, name: str, choices: List[Dict[str, Any]], **extra: Any) -> bytes:
    obj = "chat.completion.chunk" if job.req.kind == "chat" else "text_completion"
    return event(json.dumps({"id": job.id, "object": obj, "created": job.created, "model": name,
                             "choices": choices, **extra}))


class _Choice:
    """What one streamed choice has sent: its text (chat: split into reasoning and content)."""

    def __init__(self) -> None:
        self.text, self.sent_r, self.sent_c = "", 0, 0

    def delta(self, thinking: bool) -> Dict[str, Any]:
        reasoning, content = split_reasoning(self.text, thinking)
        d: Dict[str, Any] = {}
        if reasoning is not None and len(reasoning) > self.sent_r:
            d["reasoning_content"] = reasoning[self.sent_r:]
            self.sent_r = len(reasoning)
        if len(content) > self.sent_c:
            d["content"] = content[self.sent_c:]
            self.sent_c = len(content)
        return d


async def sse_events(job: Any, name: str, piece: Piece) -> Any:
    """The server-sent events of a streamed job: each choice's deltas as they come under its index
    (chat text split into reasoning and content), every choice's finish, the usage if asked,
    [DONE]; the last chunk before [DONE] carries the "neurotap" extension (NAD's candidates, NEAT's
    and NeuReasoner's events); an error event instead."""
    r = job.req
    n = 1 if r.nad is not None else r.n
    choices = [_Choice() for _ in range(n)]
    try:
        if r.kind == "chat":
            for i in range(n):
                yield chunk(job, name, [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                         "finish_reason": None}])
        elif r.echo:  # the prompt first, as OpenAI's legacy completions stream it
            for i in range(n):
                yield chunk(job, name, [{"index": i, "text": r.prompt_text, "logprobs": None, "finish_reason": None}])
        while True:
            kind_, payload = await job.events.get()
            if kind_ == "delta":
                i = payload["index"]
                c = choices[i]
                if r.kind == "completion":
                    yield chunk(job, name, [{"index": i, "text": payload["text"], "finish_reason": None,
                                             "logprobs": completion_logprobs(piece, payload["logprobs"], len(c.text))}])
                    c.text += payload["text"]
                    continue
                c.text += payload["text"]
                if pending_marker(c.text, r.thinking):
                    continue
                delta = c.delta(r.thinking)
                lps = chat_logprobs(piece, payload["logprobs"])
                if delta or lps:
                    yield chunk(job, name, [{"index": i, "delta": delta, "logprobs": lps, "finish_reason": None}])
            elif kind_ == "done":
                ext = extension(job, payload)
                final = payload["choices"]
                for i, c in enumerate(final):
                    fin = FINISH[c["finish"]]
                    one = ({"delta": choices[i].delta(r.thinking)} if r.kind == "chat" else {"text": ""})
                    # The extension goes on the last chunk: this one, or the usage after it.
                    extra = {"neurotap": ext} if not r.include_usage and i == len(final) - 1 else {}
                    yield chunk(job, name, [{"index": i, **one, "logprobs": None, "finish_reason": fin}], **extra)
                if r.include_usage:
                    yield chunk(job, name, [], usage=payload["usage"], neurotap=ext)
                yield event("[DONE]")
                return
            else:
                e = payload
                status = e.status if isinstance(e, RequestError) else 500
                yield event(json.dumps(error_body(str(e), "invalid_request_error" if status < 500
                                                  else "server_error", getattr(e, "param", None),
                                                  getattr(e, "code", None))))
                return
    finally:
        if not job.finished:
            job.cancel()  # the client went away: stop the run
