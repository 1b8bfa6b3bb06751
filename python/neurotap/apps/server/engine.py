"""The server's engine: one worker thread runs every request's native work, one at a time (no two
runs ever share a context), from a bounded queue; plain runs, reasoning budgets and NAD races
(neurotap.methods.race.NadRace), each advanced in slices so a cancel is seen soon."""
from __future__ import annotations

import asyncio
import queue
import threading
import time
import uuid
from typing import Any, Dict, List, Optional, Tuple

from ...methods.race import NadRace, race_logprobs, race_reducers
from ...runtime.model import Model
from .protocol import FORCED_CLOSE, THINK_CLOSE, THINK_OPEN, GenRequest, RequestError, parse_request, rolls_back
from .streaming import Streamer, Streamers

SLICE = 16  # tokens per native call outside streaming: bounds how late a cancel is seen


class QueueFull(Exception):
    pass


class Cancelled(Exception):
    pass


class Server:
    """The worker thread, its bounded queue and the runs it makes, on one model."""

    def __init__(self, model: Model, *, name: str, neat: Optional[Dict[str, Any]] = None, max_queue: int = 64,
                 neureasoner: Optional[Dict[str, Any]] = None):
        if max_queue < 0:
            raise ValueError(f"--max-queue must be >= 0, got {max_queue}")
        self.model, self.name, self.max_queue = model, name, int(max_queue)
        self.neat: Dict[str, Any] = dict(neat or {})
        self.neureasoner: Dict[str, Any] = dict(neureasoner or {})
        self._queue: "queue.Queue[Optional[Job]]" = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0
        self.running: Optional[Job] = None
        self.stats = {"completed": 0, "cancelled": 0, "failed": 0, "rejected": 0, "completion_tokens": 0,
                      "prompt_tokens": 0, "nad_decisions": 0, "last_cancelled": None}
        self._pieces: Dict[int, bytes] = {}
        self._thread: Optional[threading.Thread] = None
        self.created = int(time.time())

    def parse(self, body: Any, kind: str) -> GenRequest:
        return parse_request(body, kind, self.model, self.neat, self.neureasoner)

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

    def stats_snapshot(self) -> Dict[str, Any]:
        """A consistent copy of the counters (/metrics)."""
        with self._lock:
            return dict(self.stats)

    def queue_depth(self) -> int:
        """Requests waiting for the worker (/metrics)."""
        with self._lock:
            return self._waiting

    def sequences_in_flight(self) -> int:
        """Sequences decoding now, all requests (/metrics): the running job's live samples."""
        with self._lock:
            return self.running.live if self.running is not None else 0

    def health(self) -> Dict[str, Any]:
        with self._lock:
            return {"status": "ok", "model": self.name, "running": self.running.id if self.running else None,
                    "waiting": self._waiting, "max_queue": self.max_queue, **self.stats,
                    "memory": self.model.memory()}

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
                    self.stats["prompt_tokens"] += result["usage"]["prompt_tokens"]
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
        """Advances a run (or a NAD race) from `start` to `until` tokens in slices, so a cancel is
        seen within one slice even when it lands between two native calls (each call clears the
        native cancel flag)."""
        at = start
        while run.n_live and at < until:
            at = min(at + step, until)
            if job.cancelled:
                raise Cancelled
            job.attach(run)
            try:
                run.advance(at)
            finally:
                job.attach(None)
            job.spent = job.base_spent + run.tokens_sampled
            job.live = run.n_live
            if job.cancelled:
                raise Cancelled
            if on_step is not None:
                on_step(run)

    def _start(self, job: "Job", ids: List[int], **kwargs: Any) -> Any:
        r = job.req
        return self.model.start_sampling(ids, seed=r.seed, stop=r.stop or None, ignore_eos=r.ignore_eos,
                                         neat=r.neat, neureasoner=r.neureasoner, logit_bias=r.logit_bias,
                                         **r.sampling, **kwargs)

    def _execute(self, job: "Job") -> Dict[str, Any]:
        r = job.req
        t0 = time.perf_counter()
        out = self._nad(job) if r.nad is not None else self._sample(job)
        if r.echo and r.want_logprobs:
            out["prompt_logprobs"] = self._prompt_logprobs(r)
        out["usage"] = {"prompt_tokens": len(r.ids), "completion_tokens": job.spent,
                        "total_tokens": len(r.ids) + job.spent}
        out["seconds"] = time.perf_counter() - t0
        return out

    def _sample(self, job: "Job") -> Dict[str, Any]:
        r = job.req
        k = max(r.logprobs, 1) if r.want_logprobs else 0
        held = self.piece if r.neureasoner is not None and rolls_back(r.neureasoner) else None
        streams = Streamers(job, r.stop, r.n, held) if r.stream else None
        stream = streams.streams[0] if streams else None  # a reasoning budget's (n = 1)
        step = 1 if stream else SLICE
        budget = r.reasoning_budget
        start = 0
        if budget == 0 and self._thinking_open(r, ""):  # no thinking at all: close the block at once
            return self._force_close(job, None, 0, stream, k)
        with self._start(job, r.ids, n=r.n, max_tokens=r.max_tokens, reducers=(), tap=self._taps(r),
                         logprobs=k) as run:
            try:
                if budget:
                    start = min(budget, r.max_tokens)
                    self._advance(job, run, start, streams, step)
                    s = run.sample(0)
                    if run.n_live and self._thinking_open(r, s.text):  # budget spent mid-thought: force the close
                        run.close()
                        return self._force_close(job, s, run.tokens_sampled, stream, k)
                self._advance(job, run, r.max_tokens, streams, step, start)
            except Cancelled:
                run.finish_live("cancelled")
                raise
            samples = run.samples()
        if streams:
            streams.finish(samples)
        return {"choices": [self._choice(s, r) for s in samples]}

    @staticmethod
    def _taps(r: GenRequest) -> bool:
        return r.neat is not None or r.neureasoner is not None  # both read the neurons

    def _prompt_logprobs(self, r: GenRequest) -> List[Any]:
        """echo with logprobs: each prompt token's log-probability given the ones before it (the
        first has none), teacher-forced in generate's context."""
        first: List[Any] = [(r.ids[0], None, None)]
        if len(r.ids) == 1:
            return first
        k = max(r.logprobs, 1)
        lp, top_ids, top_lp = self.model.forced_top_logprobs(r.ids[:1], r.ids[1:], k)
        return first + [(t, float(lp[j]), [(int(a), float(b)) for a, b in zip(top_ids[j][:r.logprobs],
                                                                               top_lp[j][:r.logprobs])])
                        for j, t in enumerate(r.ids[1:])]

    @staticmethod
    def _thinking_open(r: GenRequest, text: str) -> bool:
        thinking = r.thinking or text.lstrip().startswith(THINK_OPEN)
        return thinking and THINK_CLOSE not in text

    def _force_close(self, job: "Job", first: Any, spent: int, stream: Optional["Streamer"],
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
        with self._start(job, r.ids + head_tokens, n=1, max_tokens=left, reducers=(), tap=self._taps(r),
                         logprobs=k) as run:
            try:
                self._advance(job, run, left, stream, 1 if stream else SLICE)
            except Cancelled:
                run.finish_live("cancelled")
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
        seed = r.seed if r.seed is not None else int.from_bytes(uuid.uuid4().bytes[:4], "little")
        r.seed = seed  # best_of_n's seeding: sample i from (seed, i), selection from seed
        # best_of_n's race: decided at early_stop, the winner handed off and the losers' cells freed;
        # not when the answer's top log-probabilities are asked for (a handed-off sample's are not
        # kept whole yet: NadRace.sample), the winner then goes on in the race's context.
        with NadRace(self.model, r.ids, n=n, early_stop=early, max_tokens=r.max_tokens, seed=seed,
                     logprobs=race_logprobs([method], k), reducers=race_reducers([method]),
                     stop=r.stop or None, ignore_eos=r.ignore_eos,
                     neat=r.neat, logit_bias=r.logit_bias, **r.sampling) as race:
            # Streamed from the decision on: the winner's first tokens at once, then token by token.
            stream = Streamer(job, r.stop) if r.stream else None
            try:
                self._advance(job, race, race.decision_at)
                pick = race.decide(method, k=spec["k"])
                with self._lock:
                    self.stats["nad_decisions"] += 1
                on_step = (lambda _: stream.update(race.sample(pick))) if stream else None
                if on_step is not None:
                    on_step(race)
                self._advance(job, race, r.max_tokens, on_step, 1 if stream else SLICE, start=race.decision_at)
            except Cancelled:
                race.finish_live("cancelled")
                raise
            winner = race.sample(pick)
            if stream:
                stream.finish(winner.text.encode("utf-8"), winner)
            cands, S, sizes = race.candidates, race.similarity(), race.set_sizes()
        choice = self._choice(winner, r)
        choice["index"] = 0
        ext = {"method": method, "n": n, "early_stop": early, "pick": pick, "seed": seed,
               "similarity": S.round(6).tolist() if S is not None else None,
               "candidates": [{"index": c.index, "text": c.text, "tokens": c.n_tokens, "finish_reason": c.finish_reason,
                               "activated_neurons": int(sizes[i]) if sizes is not None else None,
                               "mean_similarity": float((S[i].sum() - S[i, i]) / (n - 1)) if S is not None else None}
                              for i, c in enumerate(cands)]}
        return {"choices": [choice], "nad": ext}

    def piece(self, token: int) -> bytes:
        p = self._pieces.get(token)
        if p is None:
            p = self._pieces[token] = self.model.token_piece(int(token))
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
                "neat_bans": sum(1 for e in s.neat_events if e[1] == 1),
                "neureasoner_exit_at": s.neureasoner_exit_at,
                "neureasoner_events": [{"token": e.token, "level": e.level_name, "action": e.action_name,
                                        "probability": round(float(e.probability), 6), "rollback_to": e.rollback_to}
                                       for e in s.neureasoner_events]}


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
        self.live = req.nad["n"] if req.nad is not None else req.n  # its sequences decoding (/metrics)
        self.base_spent = 0
        self._run: Any = None
        self._lock = threading.Lock()

    def emit(self, kind: str, payload: Any) -> None:
        if kind in ("done", "error"):
            self.finished = True
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the event loop is gone (shutdown)
            pass

    def attach(self, run: Any) -> None:
        """The run (or race) decoding for this job now, which `cancel` stops; None between calls."""
        with self._lock:
            self._run = run
            cancel = run is not None and self.cancelled
        if cancel:
            run.cancel()

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            run = self._run
        if run is not None:
            run.cancel()
