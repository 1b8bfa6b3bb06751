"""The server's engine: one worker thread runs every request's native work, from a bounded queue.

Continuous batching (cpp/runtime/batcher.h): every request's samples are sequences ("slots") of
one shared context of --parallel slots, decoded together, one llama_decode per step over every
request's rows; requests join and leave between steps, each with its own reducers, NAD race,
NEAT, stop strings, streaming and cancel, and each draws exactly what it draws alone. Joining
requests' prompts are decoded before the next shared step (the others wait for them; untapped
ones together in one llama_decode where that leaves every row's values as alone), reusing the
cells of the longest prompt prefix a slot still holds, or cells a slot held before and the
prompt cache (prompt_cache.py, --cache-ram) saved aside. Requests are admitted in arrival order
(FIFO: one that waits for slots is not overtaken); those needing more slots than --parallel, and
reasoning budgets (which restart a run with the thoughts in its prompt), run alone between
batches, as before batching (plain runs and NadRace, advanced in slices so a cancel is seen soon)."""
from __future__ import annotations

import asyncio
import collections
import queue
import threading
import time
import uuid
from typing import Any, Deque, Dict, List, Optional, Tuple

from ...methods.nad import decision_chunk, set_sizes, similarity
from ...methods.race import NadRace, race_logprobs, race_reducers
from ...methods.selection import select
from ...runtime.batch import Batch
from ...runtime.model import Model, prompt_reuse_mode
from ...runtime.sampling import sample_from, stream_view
from .prompt_cache import PromptCache
from .protocol import FORCED_CLOSE, THINK_CLOSE, THINK_OPEN, GenRequest, RequestError, parse_request, rolls_back
from .streaming import Streamer, Streamers

SLICE = 16  # tokens per native call outside streaming: bounds how late a cancel is seen


class QueueFull(Exception):
    pass


class Cancelled(Exception):
    pass


class _Batched:
    """A request decoding in the shared batch: its run, slots and where it stands."""

    def __init__(self, job: "Job", run: Any, slots: List[int], until: int, chunk: int, stream: Any):
        self.job, self.run, self.slots, self.until, self.chunk, self.stream = job, run, list(slots), until, chunk, stream
        self.t0 = time.perf_counter()
        self.counted = False  # its reused prompt cells are in the stats
        # A NAD race: the decision's figures once it was taken.
        self.seed: Optional[int] = None
        self.pick: Optional[int] = None
        self.cands: Any = None
        self.S: Any = None
        self.sizes: Any = None

    def sample(self, i: int) -> Any:
        return sample_from(self.run.sample(i), self.chunk)

    def stream_view(self, i: int) -> Any:
        return stream_view(self.run, i, self.chunk)


class _Outbox:
    """The events of the requests in the batch, handed to the event loop once per step (one
    wake-up of the loop for every request's delta, not one each); the worker's only."""

    def __init__(self) -> None:
        self.items: List[Tuple["Job", str, Any]] = []

    def flush(self) -> None:
        if not self.items:
            return
        items, self.items = self.items, []
        by_loop: Dict[Any, List[Tuple["Job", str, Any]]] = {}
        for item in items:
            by_loop.setdefault(item[0].loop, []).append(item)
        for loop, its in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, its)
            except RuntimeError:  # the event loop is gone (shutdown)
                pass


def _deliver(items: List[Tuple["Job", str, Any]]) -> None:
    for job, kind, payload in items:
        job.events.put_nowait((kind, payload))


class _Waker:
    """What a job in the batch attaches: its cancel wakes the batcher (the worker then ends it)."""

    def __init__(self, server: "Server"):
        self.server = server

    def cancel(self) -> None:
        self.server.wake()


class Server:
    """The worker thread, its bounded queue and the runs it makes, on one model."""

    def __init__(self, model: Model, *, name: str, neat: Optional[Dict[str, Any]] = None, max_queue: int = 64,
                 neureasoner: Optional[Dict[str, Any]] = None, parallel: int = 4, reuse_prompt: Any = "exact",
                 cache_ram: int = 2048):
        if max_queue < 0:
            raise ValueError(f"--max-queue must be >= 0, got {max_queue}")
        if not isinstance(parallel, int) or parallel < 1 or parallel > 256:
            raise ValueError(f"--parallel must be in [1, 256], got {parallel}")
        self.model, self.name, self.max_queue = model, name, int(max_queue)
        #: Sequence slots decoded together (each request takes n of them, a NAD race nad.n).
        self.parallel = parallel
        #: Reuse the cells of a prompt prefix a slot still holds: "exact", "prefix" or "off"
        #: (Model.reuse_prompt's modes, per server).
        self.reuse_prompt = prompt_reuse_mode(reuse_prompt)
        if not isinstance(cache_ram, int) or cache_ram < 0:
            raise ValueError(f"--cache-ram must be >= 0 MiB, got {cache_ram}")
        #: Host memory (MiB) for slots' cells saved aside (PromptCache; 0: none, as with reuse off).
        self.cache_ram = cache_ram if self.reuse_prompt != "off" else 0
        self._cache: Optional[PromptCache] = None
        self._batch: Optional[Batch] = None  # the shared context and its batcher, made by the worker on first use
        self._free: List[int] = list(range(parallel))
        self._active: List[_Batched] = []
        self._pending: Deque[Job] = collections.deque()  # taken from the queue, waiting for slots
        self._demand = 0  # slots the requests not yet in the batch will take
        self._alone = False  # a request runs alone: nothing joins until it ends
        self._waker = _Waker(self)
        self._outbox = _Outbox()
        self.neat: Dict[str, Any] = dict(neat or {})
        self.neureasoner: Dict[str, Any] = dict(neureasoner or {})
        self._queue: "queue.Queue[Optional[Job]]" = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0
        self.running: Optional[Job] = None
        self.stats = {"completed": 0, "cancelled": 0, "failed": 0, "rejected": 0, "completion_tokens": 0,
                      "prompt_tokens": 0, "nad_decisions": 0, "reused_cells": 0, "batch_steps": 0, "batch_rows": 0,
                      "joint_prompt_decodes": 0, "prompt_cache_restores": 0, "prompt_cache_bytes": 0,
                      "last_cancelled": None}
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
        self.wake()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def wake(self) -> None:
        """Makes the batch in flight return to the worker after its current step (a request came
        or was cancelled); safe from any thread."""
        b = self._batch
        if b is not None:
            b.wake()

    def submit(self, job: "Job") -> None:
        need = self._demand_of(job.req)
        with self._lock:
            # A request that joins the batch at once never waits; the others may fill the queue.
            fits = need and not self._alone and len(self._free) - self._demand >= need
            if not fits and self._waiting >= self.max_queue and (self.running is not None or self._waiting > 0):
                self.stats["rejected"] += 1
                raise QueueFull(f"server busy: {self._waiting} requests already wait (--max-queue {self.max_queue}); "
                                "retry later")
            self._waiting += 1
            self._demand += need
        self._queue.put(job)
        self.wake()  # a batch in flight lets it join after its current step

    def stats_snapshot(self) -> Dict[str, Any]:
        """A consistent copy of the counters (/metrics)."""
        with self._lock:
            return dict(self.stats)

    def queue_depth(self) -> int:
        """Requests waiting for the worker (/metrics)."""
        with self._lock:
            return self._waiting

    def sequences_in_flight(self) -> int:
        """Sequences decoding now, all requests (/metrics): the batch's taken slots, or the live
        samples of a request that runs alone."""
        with self._lock:
            if self._alone and self.running is not None:
                return self.running.live
            return self.parallel - len(self._free)

    def health(self) -> Dict[str, Any]:
        with self._lock:
            kv = self._batch.kv_cells * self.model.info.kv_bytes_per_cell if self._batch is not None else 0
            return {"status": "ok", "model": self.name, "running": self.running.id if self.running else None,
                    "waiting": self._waiting, "max_queue": self.max_queue, "parallel": self.parallel,
                    "prompt_reuse": self.reuse_prompt, "cache_ram_mib": self.cache_ram,
                    "requests_in_batch": len(self._active),
                    "sequences_in_flight": self.parallel - len(self._free), **self.stats,
                    "memory": {**self.model.memory(), "batch_kv": kv}}

    def _end(self, job: "Job", result: Any = None, error: Optional[BaseException] = None) -> None:
        """Reports a request's outcome (a result, or the error that ended it) and counts it."""
        if error is None:
            with self._lock:
                self.stats["completed"] += 1
                self.stats["completion_tokens"] += result["usage"]["completion_tokens"]
            job.emit("done", result)
        elif isinstance(error, Cancelled):
            with self._lock:
                self.stats["cancelled"] += 1
                self.stats["last_cancelled"] = {"id": job.id, "tokens_sampled": job.spent,
                                                "max_tokens": job.req.max_tokens}
            job.emit("error", RequestError("the request was cancelled", code="cancelled", status=499))
        elif isinstance(error, (ValueError, RequestError)):  # ContextError is a ValueError
            with self._lock:
                self.stats["failed"] += 1
            job.emit("error", error if isinstance(error, RequestError) else RequestError(str(error)))
        else:  # reported to the client, the worker goes on
            with self._lock:
                self.stats["failed"] += 1
            job.emit("error", error)

    def _work(self) -> None:
        while True:
            if not self._take(block=not self._active and not self._pending):
                for b in list(self._active):  # shutting down: what runs is cancelled
                    self._leave(b, error=Cancelled())
                self._outbox.flush()
                return
            self._admit()
            if self._active:
                self._step()
            with self._lock:
                self.running = self._active[0].job if self._active else None

    def _take(self, block: bool) -> bool:
        """Moves what the queue holds to the pending line (waiting for it when `block`); False on
        the shutdown sentinel."""
        try:
            item = self._queue.get() if block else self._queue.get_nowait()
        except queue.Empty:
            return True
        while True:
            if item is None:
                return False
            self._pending.append(item)
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return True

    @staticmethod
    def _slots_needed(r: GenRequest) -> int:
        return r.nad["n"] if r.nad is not None else r.n

    def _demand_of(self, r: GenRequest) -> int:
        """Slots a request will take in the batch (0: it runs alone)."""
        need = self._slots_needed(r)
        return need if need <= self.parallel and r.reasoning_budget is None else 0

    def _admit(self) -> None:
        """Admits pending requests in arrival order while slots are free (FIFO: none overtakes one
        that waits); one that cannot join a batch runs alone once the batch has drained."""
        for job in [j for j in self._pending if j.cancelled]:  # a cancelled request leaves the line at once
            self._pending.remove(job)
            with self._lock:
                self._waiting -= 1
                self._demand -= self._demand_of(job.req)
            self._end(job, error=Cancelled())
        while self._pending:
            job = self._pending[0]
            alone = self._slots_needed(job.req) > self.parallel or job.req.reasoning_budget is not None
            if not job.cancelled and (self._active if alone else self._slots_needed(job.req) > len(self._free)):
                return
            self._pending.popleft()
            with self._lock:
                self._waiting -= 1
                self._demand -= self._demand_of(job.req)
            if job.cancelled:
                self._end(job, error=Cancelled())
            elif alone:
                with self._lock:
                    self.running, self._alone = job, True
                    self.stats["prompt_tokens"] += len(job.req.ids)
                try:
                    result = self._execute(job)
                except Exception as e:  # noqa: BLE001 - reported to its client
                    self._end(job, error=e)
                else:
                    self._end(job, result)
                finally:
                    with self._lock:
                        self._alone = False
            else:
                try:
                    self._join(job)
                except Exception as e:  # noqa: BLE001 - reported to its client
                    self._end(job, error=e)

    # -- the batch (worker thread) --------------------------------------------------------
    def _context(self) -> Batch:
        if self._batch is None:
            self._batch = Batch(self.model, self.parallel)
            if self.cache_ram:
                self._cache = PromptCache(self._batch.ctx, self.cache_ram << 20, self.reuse_prompt)
        return self._batch

    def _pick_slots(self, ids: List[int], need: int) -> List[int]:
        """Free slots for a run, increasing: the first is the one holding the most cells the
        prompt may reuse in this server's mode (then the longest common prefix), when enough free
        slots follow it."""
        free = sorted(self._free)
        if self.reuse_prompt == "off":
            return free[:need]
        batch = self._context()

        def reusable(s: int) -> Tuple[int, int]:
            return batch.reusable_prefix(s, ids, self.reuse_prompt), batch.reusable_prefix(s, ids, "prefix")

        best = max(free, key=lambda s: (*reusable(s), -s))
        after = [s for s in free if s > best]
        return [best] + after[:need - 1] if len(after) >= need - 1 else free[:need]

    def _join(self, job: "Job") -> None:
        """Starts a request's run on free slots of the shared context; it decodes from the next step."""
        r = job.req
        k = max(r.logprobs, 1) if r.want_logprobs else 0
        common = dict(max_tokens=r.max_tokens, seed=r.seed, stop=r.stop or None, ignore_eos=r.ignore_eos, neat=r.neat,
                      neureasoner=r.neureasoner, logit_bias=r.logit_bias, **r.sampling)
        if r.nad is not None:
            spec = r.nad
            if r.seed is None:  # best_of_n's seeding: sample i from (seed, i), selection from seed
                r.seed = int.from_bytes(uuid.uuid4().bytes[:4], "little")
            common["seed"] = r.seed
            chunk = decision_chunk(spec["early_stop"])
            opts = self.model.sampling_options(n=spec["n"], reducers=race_reducers([spec["method"]]), chunk=chunk,
                                               logprobs=race_logprobs([spec["method"]], k), **common)
            until = spec["early_stop"] if spec["early_stop"] is not None else r.max_tokens
        else:
            chunk = 32
            opts = self.model.sampling_options(n=r.n, reducers=(), tap=self._taps(r), logprobs=k, **common)
            until = r.max_tokens
        if r.stream:
            until = 1 if r.nad is None else until  # a race streams from its decision on
        opts.prompt_reuse = self.reuse_prompt
        batch = self._context()
        slots = self._pick_slots(r.ids, opts.n)
        if self._cache is not None:
            self._cache.take_for(r.ids, slots[0])
            with self._lock:
                self.stats["prompt_cache_restores"] = self._cache.restored
                self.stats["prompt_cache_bytes"] = self._cache.bytes
        opts.seqs = slots
        run = batch.start(r.ids, opts, until)
        if not r.stream:
            stream = None
        elif r.nad is not None:
            stream = Streamer(job, r.stop)  # the winner streams from the decision on
        else:  # every sample under its index; NeuReasoner rollbacks hold text back to a line start
            held = self.piece if r.neureasoner is not None and rolls_back(r.neureasoner) else None
            stream = Streamers(job, r.stop, r.n, held)
        b = _Batched(job, run, slots, until, chunk, stream)
        b.seed = r.seed
        for s in slots:
            self._free.remove(s)
        self._active.append(b)
        with self._lock:
            self.stats["prompt_tokens"] += len(r.ids)
        job.attach(self._waker)
        job.outbox = self._outbox  # its events go out with the step's

    def _leave(self, b: _Batched, result: Any = None, error: Optional[BaseException] = None) -> None:
        """A request leaves the batch: its run and slots go, its outcome is reported."""
        if error is not None and b.run.n_live:
            b.run.finish_live("cancelled")
        self._batch.remove(b.run)
        self._active.remove(b)
        self._free.extend(s for s in b.slots if s not in self._free)
        b.job.attach(None)
        self._end(b.job, result, error)

    def _step(self) -> None:
        """Decodes the batch until a request needs the worker (it reached its target or ended, a
        new request or a cancel woke it), then serves the requests that need it; what they
        emitted goes to the event loop at the end."""
        try:
            self._step_batch()
        finally:
            self._outbox.flush()

    def _step_batch(self) -> None:
        self._batch.clear_wake()
        for b in list(self._active):
            if b.job.cancelled:
                self._leave(b, error=Cancelled())
        if not self._active or not self._queue.empty():
            return  # requests that came before the wake was cleared: the worker takes them first
        try:
            ready = self._batch.run()
        except Exception as e:  # noqa: BLE001 - the context itself failed (the model was closed)
            for b in list(self._active):
                self._leave(b, error=e)
            return
        with self._lock:
            self.stats["batch_steps"] = self._batch.steps
            self.stats["batch_rows"] = self._batch.rows
            self.stats["joint_prompt_decodes"] = self._batch.joint_prompt_decodes
        for b in list(self._active):
            b.job.spent = b.run.tokens_sampled
            if not b.counted and b.run.started:
                b.counted = True
                with self._lock:
                    self.stats["reused_cells"] += b.run.n_reused
        for run in ready:
            b = next(x for x in self._active if x.run is run)
            try:
                self._serve(b)
            except Exception as e:  # noqa: BLE001 - reported to its client
                self._leave(b, error=e)

    def _serve(self, b: _Batched) -> None:
        """A request's run reached its target or ended: stream, decide a race, or finish."""
        r, run = b.job.req, b.run
        if run.failed:
            raise RuntimeError(run.failed)
        if r.nad is not None and b.pick is None:
            self._decide(b)
            if run.n_live == 0 or r.nad["early_stop"] is None:
                self._finish_race(b)
                return
        elif run.n_live == 0:
            if r.nad is not None:
                self._finish_race(b)
            else:
                samples = [b.sample(i) for i in range(run.n)]
                if b.stream:
                    b.stream.finish(samples)
                self._leave(b, self._result(b, {"choices": [self._choice(s, r) for s in samples]}))
            return
        elif b.stream:
            if r.nad is not None:
                b.stream.update(b.stream_view(b.pick))
            else:
                b.stream(b)  # Streamers read b.stream_view(i)
        b.until = b.until + 1 if b.stream else r.max_tokens
        self._batch.set_until(run, b.until)

    def _decide(self, b: _Batched) -> None:
        """A race at its decision: select (as NadRace does), stop the losers and free their slots;
        the winner goes on untapped (NadRace hands it off with the tap off) unless NEAT steers it."""
        r, spec, run = b.job.req, b.job.req.nad, b.run
        n = spec["n"]
        b.cands = [b.sample(i) for i in range(n)]
        pick = select(b.cands, spec["method"], tokens=spec["early_stop"], k=spec["k"], seed=b.seed or 0,
                      n_vocab=self.model.info.n_vocab)
        b.pick = 0 if pick is None else pick
        with self._lock:
            self.stats["nad_decisions"] += 1
        sets = b.cands[0].contribution_sets is not None  # a RAD race keeps routing only
        b.S = similarity(b.cands, spec["early_stop"]) if n >= 2 and sets else None
        b.sizes = set_sizes(b.cands, spec["early_stop"]) if sets else None
        losers = [i for i in range(n) if i != b.pick]
        run.stop(losers)
        self._free.extend(b.slots[i] for i in losers)
        b.slots = [b.slots[b.pick]]
        if run.n_live and r.neat is None:
            run.untap()
        if b.stream and run.n_live:
            b.stream.update(b.stream_view(b.pick))

    def _finish_race(self, b: _Batched) -> None:
        winner = b.sample(b.pick)
        if b.stream:
            b.stream.finish(winner.text_bytes, winner)
        self._leave(b, self._result(b, self._nad_result(b.job.req, b.seed, b.pick, winner, b.cands, b.S, b.sizes)))

    def _result(self, b: _Batched, out: Dict[str, Any]) -> Dict[str, Any]:
        r = b.job.req
        spent = b.run.tokens_sampled
        b.job.spent = spent
        if r.echo and r.want_logprobs:
            out["prompt_logprobs"] = self._prompt_logprobs(r)
        out["usage"] = {"prompt_tokens": len(r.ids), "completion_tokens": spent, "total_tokens": len(r.ids) + spent}
        out["seconds"] = time.perf_counter() - b.t0
        return out

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
        closing = self.model.detokenize(forced)
        head_text = text1 + closing
        job.base_spent = job.spent = spent + len(forced)  # forced tokens are decoded, not sampled
        left = r.max_tokens - len(head_tokens)
        head = self._choice(first, r) if first is not None else {
            "index": 0, "logprobs": None, "neat_exit_at": -1, "neat_events": 0, "neat_bans": 0}
        if stream:
            stream.rebase((first.text_bytes if first is not None else b"") + closing.encode("utf-8"))
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
            stream.finish(s.text_bytes, s)
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
                stream.finish(winner.text_bytes, winner)
            cands, S, sizes = race.candidates, race.similarity(), race.set_sizes()
        return self._nad_result(r, seed, pick, winner, cands, S, sizes)

    def _nad_result(self, r: GenRequest, seed: int, pick: int, winner: Any, cands: List[Any], S: Any,
                    sizes: Any) -> Dict[str, Any]:
        """The choice of a NAD race's winner and the race's figures (the "nad" extension)."""
        spec = r.nad
        method, n, early = spec["method"], spec["n"], spec["early_stop"]
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
        self.outbox: Optional[_Outbox] = None  # set while it decodes in the batch
        self._run: Any = None
        self._lock = threading.Lock()

    def emit(self, kind: str, payload: Any) -> None:
        if kind in ("done", "error"):
            self.finished = True
        if self.outbox is not None:  # the worker hands the batch's events over once per step
            self.outbox.items.append((self, kind, payload))
            return
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
