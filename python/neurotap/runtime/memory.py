"""Memory accounting: what a model holds (weights, KV cells, contribution state) and what a run
will need before it decodes (KV, per-sample records, the contribution reducer's state), checked
against the memory the machine has available, so that a run that cannot fit fails at once with
the part to blame and what would fit, instead of swapping or being killed an hour in."""
from __future__ import annotations

from typing import Dict, Optional

from .. import _native

GIB = 2**30
CONTRIBUTION_SET_BYTES_PER_TOKEN = 218


def available_bytes() -> Optional[int]:
    """MemAvailable of /proc/meminfo (Linux); None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def record_bytes_per_token(info, *, counts: bool, active_chunk: int, contribution_chunk: int, keep_top: bool,
                           rows: int, norm_inputs: bool, residuals: bool, logprobs: int,
                           routing: bool = False, router_probs: bool = False) -> float:
    """Bytes a sample's records grow by per generated token. On a mixture-of-experts model n_ff is
    every expert's units (n_expert * n_ff_exp + n_ff_shexp): rows, sets and the contribution state
    are all at that width."""
    L, F, E = info.n_layers, info.n_ff, info.n_embd
    words = (L * F + 63) // 64
    b = 8.0 + 2  # token id, text
    if counts:
        b += 4 * L
    if active_chunk:
        b += 8 * words / active_chunk
    if contribution_chunk:
        # Compact set records (cpp/reducers/set_record.h): a chunk never exceeds its dense bitset, and NAD's
        # sets, mostly neurons seen in earlier chunks, measured 56-109 bytes per token at every
        # shape from 135M to 8B (benchmarks/bench_records.py); 2 x 109 leaves a margin.
        b += min(8 * words / contribution_chunk, CONTRIBUTION_SET_BYTES_PER_TOKEN) + 8 + (8 * L * 64 if keep_top else 0)
    if rows:
        b += L * F * (4 if rows == 1 else 2)
    b += 4 * L * E * (int(norm_inputs) + int(residuals))
    if logprobs:
        b += 8 + 8 * logprobs
    if routing:  # ids, gate weights, the shared expert's gate
        b += L * (8 * getattr(info, "n_expert_used", 0) + 4)
    if router_probs:
        b += 4 * L * getattr(info, "n_expert", 0)
    return b


def run_parts(info, *, n: int, kv_cells: int, max_tokens: int, per_token_record: float,
              contributions: bool, file_bytes: int) -> Dict[str, int]:
    """Bytes a run will hold at its peak, by part (kv_cells: its context's, all samples together)."""
    parts = {"kv": int(kv_cells * info.kv_bytes_per_cell),
             "records": int(n * max_tokens * per_token_record)}
    if contributions:
        # Cache and queue budgets (the reducer's own figure), the rows of the samples in flight, and
        # as many again: a step's rows before they are selected, or cache slots past the budget.
        budget = _native.contribution_budget(file_bytes, n, info.n_layers, info.n_ff)
        parts["contribution state"] = int(2 * budget + 2 * n * info.n_layers * info.n_ff * 4)
    return parts


def check_fits(parts: Dict[str, int], what: str, n: int, available: Optional[int] = None) -> None:
    """ContextError when the parts exceed the memory available, naming the largest part and how
    many samples would fit."""
    from ..core.errors import ContextError

    avail = available_bytes() if available is None else available
    need = sum(parts.values())
    if avail is None or need <= avail:
        return
    biggest = max(parts, key=parts.get)
    per_sample = need / max(n, 1)
    fit = int(avail // per_sample) if per_sample else 0
    detail = ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in parts.items())
    raise ContextError(f"{what} needs about {need / GIB:.2f} GiB ({detail}) but {avail / GIB:.2f} GiB of memory is "
                       f"available: the largest part is {biggest}; at most n={fit} samples of this length fit "
                       f"(or fewer tokens, or drop capture/hooks)")
