"""Routing agreement for mixture-of-experts models: RAD (Routing Agreement Decoding, arXiv
2606.22798) and the cheaper routing-set agreement.

A rollout of an MoE model leaves, per token and MoE layer, the experts its router selected and
their gate weights. RAD represents each rollout by its routing in a short window (by default the
window that opens the answer, located by an anchor), compares rollouts by weighted Jaccard
similarity and returns the centre of the densest k-nearest-neighbour basin: the rollout whose k
most similar rollouts are the most similar on average. No answer string is parsed or voted on.

The paper publishes no code; the choices made here (README, "RAD"):
- routing state of a token: the vector over (layer, expert) of gate weights (0 for experts not
  selected), as llama.cpp applies them; a window's state is the mean over its tokens;
- similarity: weighted Jaccard, sum(min(a, b)) / sum(max(a, b)) (1 for two empty windows);
- density and centre: NAD's kNN rule (scoring.selectors.select_knn: mean of the k largest
  similarities, ties to the medoid), k = 3 by default as NAD's;
- anchor: the last occurrence of an answer-opening marker (`\\boxed{`, a code fence, the end of a
  thinking block, "answer is"); the window is the `window` tokens from the anchor on. A rollout
  without an anchor uses its last `window` tokens;
- decided early (after B tokens, before any answer opens), the window is the whole prefix.

Pure numpy: routes are arrays, so selection can be studied offline on saved routes.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .selectors import check_similarity, select_knn

#: Text that opens an answer (the paper's "delimiter" and "boundary" anchors), searched from the end.
ANCHORS = ("\\boxed{", "```", "</think>", "<|channel|>final", "answer is", "Answer:")
WINDOW = 16  # tokens of routing read from the anchor on


def check_routes(ids: np.ndarray, weights: np.ndarray, n_expert: int) -> None:
    """ValueError unless ids/weights are [tokens, layers, used] with ids in [0, n_expert) and
    finite weights."""
    ids, weights = np.asarray(ids), np.asarray(weights)
    if ids.ndim != 3 or ids.shape != weights.shape:
        raise ValueError(f"routes must be [tokens, layers, experts used] ids and weights of one shape, got "
                         f"{ids.shape} and {weights.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= n_expert):
        raise ValueError(f"expert ids must lie in [0, {n_expert}), got [{ids.min()}, {ids.max()}]")
    if not np.all(np.isfinite(weights)):
        raise ValueError("gate weights must be finite (found NaN or inf)")


def routing_state(ids: np.ndarray, weights: np.ndarray, n_expert: int, start: int = 0,
                  stop: Optional[int] = None) -> np.ndarray:
    """Mean routing state over tokens [start, stop): float64 [layers * n_expert], entry l * n_expert + e
    the mean gate weight of expert e in layer l (0 on tokens where it was not selected)."""
    check_routes(ids, weights, n_expert)
    T, L, _ = np.shape(ids)
    stop = T if stop is None else min(int(stop), T)
    start = max(0, min(int(start), stop))
    out = np.zeros(L * n_expert, np.float64)
    if stop > start:
        keys = (np.arange(L)[None, :, None] * n_expert + np.asarray(ids)[start:stop]).ravel()
        np.add.at(out, keys, np.asarray(weights, np.float64)[start:stop].ravel())
        out /= stop - start
    return out


def routing_set(ids: np.ndarray, n_expert: int, stop: Optional[int] = None) -> np.ndarray:
    """The (layer, expert) pairs selected on any of the first `stop` tokens, as a bool
    [layers * n_expert] mask: the cheap routing-only set."""
    ids = np.asarray(ids)
    if ids.ndim != 3:
        raise ValueError(f"ids must be [tokens, layers, experts used], got shape {ids.shape}")
    L = ids.shape[1]
    out = np.zeros(L * n_expert, bool)
    part = ids[:stop]
    if part.size:
        if part.min() < 0 or part.max() >= n_expert:
            raise ValueError(f"expert ids must lie in [0, {n_expert}), got [{part.min()}, {part.max()}]")
        out[(np.arange(L)[None, :, None] * n_expert + part).ravel()] = True
    return out


def weighted_jaccard(states: np.ndarray) -> np.ndarray:
    """N x N weighted Jaccard similarity, sum(min) / sum(max), of non-negative state vectors
    (two all-zero states are identical: 1)."""
    V = np.asarray(states, np.float64)
    if V.ndim != 2:
        raise ValueError(f"states must be [N, dims], got shape {V.shape}")
    if not np.all(np.isfinite(V)) or (V.size and V.min() < 0):
        raise ValueError("routing states must be finite and non-negative")
    n = V.shape[0]
    S = np.ones((n, n), np.float64)
    for a in range(n):
        mn = np.minimum(V[a], V[a + 1:]).sum(axis=1)
        mx = np.maximum(V[a], V[a + 1:]).sum(axis=1)
        s = np.divide(mn, mx, out=np.ones_like(mn), where=mx > 0)
        S[a, a + 1:] = s
        S[a + 1:, a] = s
    return S


def set_jaccard(masks: np.ndarray) -> np.ndarray:
    """N x N Jaccard similarity of bool masks (two empty sets: 1)."""
    M = np.asarray(masks, bool).astype(np.float64)
    inter = M @ M.T
    size = M.sum(axis=1)
    union = size[:, None] + size[None, :] - inter
    return np.divide(inter, union, out=np.ones_like(inter), where=union > 0)


def anchor_position(piece_ends: Sequence[int], text, anchors: Sequence = ANCHORS) -> Optional[int]:
    """Index of the token holding the start of the last anchor in `text` (str, or bytes with bytes
    anchors), given each token's end offset in it; None if no anchor occurs."""
    best = -1
    for a in anchors:
        best = max(best, text.rfind(a))
    if best < 0:
        return None
    return int(np.searchsorted(np.asarray(piece_ends), best, side="right"))


def rad_window(n_tokens: int, anchor: Optional[int], window: int = WINDOW) -> tuple:
    """[start, stop) of the tokens RAD reads: from the anchor on, or the last `window` tokens."""
    if window < 1:
        raise ValueError(f"window must be >= 1 tokens, got {window}")
    if anchor is None:
        return max(0, n_tokens - window), n_tokens
    start = min(int(anchor), n_tokens)
    return start, min(n_tokens, start + window)


def select_rad(states: np.ndarray, k: int = 3) -> int:
    """RAD's pick: the centre of the densest weighted-Jaccard kNN basin of the routing states."""
    return select_knn(check_similarity(weighted_jaccard(states), "rad"), k)


__all__ = ["ANCHORS", "WINDOW", "check_routes", "routing_state", "routing_set", "weighted_jaccard", "set_jaccard",
           "anchor_position", "rad_window", "select_rad"]
