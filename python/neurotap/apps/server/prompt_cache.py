"""The server's host-memory prompt cache (llama-server's --cache-ram): the KV cells a slot held
before a request took it, saved aside within a byte budget (least recently saved out first), and
moved back into the slot of a later request whose prompt they serve better than the slot's own
cells (a system prompt or a document shared by requests that land on other slots, a chat that
comes back after other requests used its slot). Cells come back with the record of how they were
made, so `exact` reuse keeps only those that give the tokens of a run without reuse, as for
cells that never left. The worker thread's only."""
from __future__ import annotations

import collections
from typing import Any, Deque, Optional, Tuple


class PromptCache:
    """Saved slots of one context (`ctx`, a native Context), at most `budget` bytes in all."""

    def __init__(self, ctx: Any, budget: int, mode: str):
        self.ctx, self.budget, self.mode = ctx, int(budget), mode
        self._entries: Deque[Any] = collections.deque()  # native SavedSeq, oldest first
        self.bytes = 0
        self.restored = 0

    def __len__(self) -> int:
        return len(self._entries)

    def save(self, seq: int) -> bool:
        """Copies slot `seq`'s cells aside (none held, or more than the whole budget: nothing)."""
        if not self.budget or not self.ctx.seq_tokens(seq):
            return False
        saved = self.ctx.save_seq(seq)
        if saved.nbytes > self.budget:
            return False
        self._entries.append(saved)
        self.bytes += saved.nbytes
        while self.bytes > self.budget:
            self.bytes -= self._entries.popleft().nbytes
        return True

    def best(self, ids: Any) -> Tuple[Optional[Any], int]:
        """The saved cells a prompt of `ids` would reuse the most of, and how many (0: none)."""
        best, most = None, 0
        for e in self._entries:
            n = self.ctx.saved_reusable_prefix(e, ids, self.mode)
            if n > most:
                best, most = e, n
        return best, most

    def restore(self, entry: Any, seq: int) -> None:
        """Moves `entry` into slot `seq` (out of the cache: its cells live in the slot now)."""
        self._entries.remove(entry)
        self.bytes -= entry.nbytes
        self.ctx.restore_seq(seq, entry)
        self.restored += 1

    def take_for(self, ids: Any, seq: int) -> None:
        """Before a request of `ids` takes slot `seq`: the slot's cells go aside unless the prompt
        keeps most of them (a chat's next turn), and saved cells it would reuse more of come in."""
        held = len(self.ctx.seq_tokens(seq))
        have = self.ctx.reusable_prefix(seq, ids, self.mode)
        entry, n = self.best(ids)
        if held and 2 * have < held:
            self.save(seq)
        if entry is not None and n > have:
            self.restore(entry, seq)
