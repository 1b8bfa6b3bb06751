"""Routing Agreement Decoding (RAD, arXiv 2606.22798) on mixture-of-experts models: pick one of N
sampled answers by the agreement of their routing, and the cheaper routing-set agreement.

Both read the "routing" reducer's records (Sample.routing_ids / routing_weights: per token and MoE
layer, the experts the router selected and their gate weights) and register in the selection
registry (neurotap.methods.selection), so best_of_n, `neurotap eval`, the server and early
stopping use them by name:
- "rad": each sample's mean routing state over its answer-opening window (scoring.routing: from
  the last anchor such as `\\boxed{` on, WINDOW tokens; decided early, the whole prefix), weighted
  Jaccard between samples, the centre of the densest kNN basin;
- "route-knn": NAD's kNN over the sets of (layer, expert) pairs each sample's router selected.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

from ..runtime.sampling import Sample
from ..scoring.routing import (ANCHORS, WINDOW, anchor_position, rad_window, routing_set, routing_state, select_rad,
                               set_jaccard)
from ..scoring.selectors import select_knn
from .selection import Method, Options, register

#: What the routing methods need the run to record.
ROUTING = ("routing",)


def _routes(samples: Sequence[Sample], method: str) -> Tuple[list, int]:
    """Each sample's (ids, weights) and the expert count they index (ids' maximum + 1 over all:
    states padded with experts nobody selected compare the same)."""
    if any(s.routing_ids is None for s in samples):
        raise ValueError(f"method '{method}' reads the router's choices: it needs a mixture-of-experts model sampled "
                         "with reducers=('routing',)")
    routes = [(np.asarray(s.routing_ids), np.asarray(s.routing_weights)) for s in samples]
    n_expert = 1 + max((int(ids.max()) for ids, _ in routes if ids.size), default=0)
    return routes, n_expert


def rad_windows(samples: Sequence[Sample], tokens: Optional[int] = None, window: int = WINDOW) -> list:
    """[start, stop) of the tokens RAD reads per sample: the first `tokens` (a decision on a prefix,
    before any answer opens), else the `window` tokens from the last answer-opening anchor (or the
    last `window` tokens of a sample without one)."""
    out = []
    for s in samples:
        T = s.n_tokens if tokens is None else min(int(tokens), s.n_tokens)
        if tokens is not None:
            out.append((0, T))
            continue
        ends = s.piece_end if s.piece_end is not None and len(s.piece_end) == T else None
        # piece_end counts bytes of the text as generated: search the anchors there (a Sample made
        # by hand may hold only its decoded text).
        data = s.text_bytes or s.text.encode("utf-8", "replace")
        anchor = None if ends is None else anchor_position(ends, data, [a.encode() for a in ANCHORS])
        out.append(rad_window(T, anchor, window))
    return out


def rad_states(samples: Sequence[Sample], tokens: Optional[int] = None, window: int = WINDOW) -> np.ndarray:
    """float64 [N, layers * experts]: each sample's mean gate weight per (layer, expert) over its RAD window."""
    routes, n_expert = _routes(samples, "rad")
    wins = rad_windows(samples, tokens, window)
    return np.stack([routing_state(ids, w, n_expert, a, b) for (ids, w), (a, b) in zip(routes, wins)])


def route_sets(samples: Sequence[Sample], tokens: Optional[int] = None) -> np.ndarray:
    """bool [N, layers * experts]: the (layer, expert) pairs each sample's router selected on its
    first `tokens` tokens (all by default)."""
    routes, n_expert = _routes(samples, "route-knn")
    return np.stack([routing_set(ids, n_expert, tokens) for ids, _ in routes])


register(Method("rad", "RAD (MoE): centre of the densest weighted-Jaccard kNN basin of answer-opening routing states",
                lambda s, o: select_rad(rad_states(s, o.tokens, o.route_window), o.k), early=True, min_samples=2,
                reducers=ROUTING))
register(Method("route-knn", "MoE: NAD's kNN over the (layer, expert) pairs each sample's router selected",
                lambda s, o: select_knn(set_jaccard(route_sets(s, o.tokens)), o.k), early=True, min_samples=2,
                reducers=ROUTING))

__all__ = ["rad_states", "rad_windows", "route_sets", "ROUTING", "Options"]
