"""Continuous batching in Python: runs on slots of one context decoded together (the native
Batcher, cpp/runtime/batcher.h). The server's engine drives one; each run is a native Run made
with Model.sampling_options on slots the caller chooses (RunOptions.seqs)."""
from __future__ import annotations

from typing import Any, List, Sequence

from .. import _native


class Batch:
    """A context of `n_seq` sequence slots (n_ctx cells each) and the batcher decoding its runs.
    Call everything but `wake` from one thread."""

    def __init__(self, model: Any, n_seq: int):
        self.ctx = model.batch_context(n_seq)
        self._batcher = _native.Batcher(self.ctx)

    def start(self, ids: Sequence[int], options: Any, until: int) -> Any:
        """A native run of `ids` with `options` (their seqs: its slots), joining the batch; it
        decodes its prompt and then, with the others, until its samples hold `until` tokens."""
        run = _native.Run(self.ctx, list(ids), options)
        self._batcher.add(run, int(until))
        return run

    def set_until(self, run: Any, until: int) -> None:
        self._batcher.set_until(run, int(until))

    def remove(self, run: Any) -> None:
        self._batcher.remove(run)

    def run(self, max_steps: int = 1 << 30) -> List[Any]:
        """Decodes until a run needs its owner (it reached its target or ended), max_steps
        steps, or wake(); returns the runs that need their owner (native work, GIL released)."""
        return list(self._batcher.run(int(max_steps)))

    def wake(self) -> None:
        """Makes a run() in flight return after its current step (safe from any thread)."""
        self._batcher.wake()

    def clear_wake(self) -> None:
        self._batcher.clear_wake()

    def seq_tokens(self, seq: int) -> List[int]:
        """The tokens whose KV cells slot `seq` holds (what a prompt may reuse)."""
        return list(self.ctx.seq_tokens(int(seq)))

    def reusable_prefix(self, seq: int, ids: Sequence[int], mode: str = "exact") -> int:
        """The cells of slot `seq` a run of `ids` would reuse with prompt reuse `mode`."""
        return int(self.ctx.reusable_prefix(int(seq), [int(t) for t in ids], mode))

    @property
    def kv_cells(self) -> int:
        return int(self.ctx.n_ctx)

    @property
    def steps(self) -> int:
        return int(self._batcher.steps)

    @property
    def rows(self) -> int:
        return int(self._batcher.rows)

    @property
    def joint_prompt_decodes(self) -> int:
        """llama_decode calls that decoded several joining requests' prompts together."""
        return int(self._batcher.joint_prompt_decodes)
