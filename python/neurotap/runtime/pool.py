"""The sampling contexts of one model. A context is either idle in the pool or lent to exactly one
run, never both: a run gives it back once, when it ends or is closed, and a second give-back is a
no-op (two runs sharing one KV cache would silently produce wrong tokens)."""
from __future__ import annotations

import threading
from typing import Any, Callable, Optional


class Lease:
    """One run's hold on a context; `release()` hands it back to the pool at most once."""

    def __init__(self, pool: "ContextPool", ctx: Any):
        self._pool: Optional[ContextPool] = pool
        self.ctx = ctx
        pool._lent[id(ctx)] = ctx.n_ctx

    @property
    def released(self) -> bool:
        return self._pool is None

    def release(self, keep: bool = True) -> None:
        """Gives the context back (keep=False: frees it instead of keeping it for reuse)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool._lent.pop(id(self.ctx), None)
            if keep:
                pool._give_back(self.ctx)


class ContextPool:
    """Keeps at most one idle context (the largest recently used) for reuse; a run that needs more
    sequences or cells than the idle one has, or that starts while it is lent, gets a new one."""

    def __init__(self, create: Callable[[int, int, int], Any]):
        self._create = create  # (n_seq, cells per sequence, shared cells) -> a new context
        self._idle: Optional[Any] = None
        self._lock = threading.Lock()
        self._lent: dict = {}  # id -> KV cells of the contexts runs hold now

    def acquire(self, n_seq: int, cells_per_seq: int, shared_cells: int = 0) -> Lease:
        """A context of n_seq sequences: per-sequence streams of cells_per_seq cells each, or with
        shared_cells one stream of that many cells (the sequences share their prompt's cells)."""
        with self._lock:
            ctx, self._idle = self._idle, None
        if ctx is None or not self._fits(ctx, n_seq, cells_per_seq, shared_cells):
            ctx = self._create(n_seq, cells_per_seq, shared_cells)
        return Lease(self, ctx)

    @staticmethod
    def _fits(ctx: Any, n_seq: int, cells_per_seq: int, shared_cells: int) -> bool:
        # The stream layout must match too: it decides how attention rounds (see Model.start_sampling).
        if ctx.n_seq_max < n_seq or bool(ctx.kv_unified) != bool(shared_cells):
            return False
        return ctx.n_ctx >= shared_cells if shared_cells else ctx.n_ctx_seq >= cells_per_seq

    def _give_back(self, ctx: Any) -> None:
        with self._lock:
            self._idle = ctx

    def cells(self) -> int:
        """KV cells of the pool's contexts: the idle one kept for reuse and those lent to runs."""
        with self._lock:
            return (self._idle.n_ctx if self._idle is not None else 0) + sum(self._lent.values())

    def clear(self) -> None:
        with self._lock:
            self._idle = None
