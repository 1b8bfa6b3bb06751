"""Logprob-based best-of-N baselines: DeepConf's lowest group confidence and self-certainty.

Both score one sample from per-token log-probabilities; higher means more confident. An empty
answer (T = 0) scores -inf: having said nothing, it is the least confident.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def token_confidence(top_logprobs: np.ndarray) -> np.ndarray:
    """DeepConf token confidence C_i = -mean_j log p_ij over the top-k logprobs recorded at position i.

    A peaked distribution has a very unlikely runner-up set, so a high C means a confident token.
    """
    lp = np.asarray(top_logprobs, dtype=np.float64)
    if lp.ndim != 2:
        raise ValueError(f"top_logprobs must be [T, k], got shape {lp.shape}")
    if lp.shape[0] > 0 and lp.shape[1] == 0:
        raise ValueError("top_logprobs has no logprobs per token (k = 0)")
    if lp.shape[0] == 0:
        return np.zeros(0)
    return -lp.mean(axis=1)


def lowest_group_confidence(top_logprobs: np.ndarray, window: int = 32) -> float:
    """The minimum, over sliding windows of `window` tokens (stride 1), of the mean token confidence.

    The weakest stretch of reasoning, not the average, is what predicts a wrong answer (DeepConf).
    Fewer than `window` tokens: the mean over all of them. No tokens: -inf.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    c = token_confidence(top_logprobs)
    if c.size == 0:
        return float("-inf")
    if c.size < window:
        return float(c.mean())
    return float(np.lib.stride_tricks.sliding_window_view(c, window).mean(axis=1).min())


def self_certainty(mean_logprob: np.ndarray, n_vocab: int) -> float:
    """Self-certainty: the mean over tokens of KL(U || p_i), U uniform over the vocabulary.

    `mean_logprob[i]` is the mean of log p_ij over the WHOLE vocabulary at position i (computed
    natively, the full distribution is too big to keep), which is all the KL needs:
    KL(U || p_i) = sum_j (1/V) log((1/V) / p_ij) = -log V - mean_j log p_ij.
    """
    if n_vocab < 1:
        raise ValueError(f"n_vocab must be >= 1, got {n_vocab}")
    m = np.asarray(mean_logprob, dtype=np.float64)
    if m.ndim != 1:
        raise ValueError(f"mean_logprob must be 1-D [T], got shape {m.shape}")
    if m.size == 0:
        return float("-inf")
    return float(np.mean(-np.log(n_vocab) - m))


def _argmax(scores: Sequence[float], what: str) -> int:
    if len(scores) == 0:
        raise ValueError(f"{what} needs at least 1 sample, got 0")
    return int(np.argmax(np.asarray(scores, dtype=np.float64)))  # first maximum: lowest index wins


def select_deepconf(top_logprobs: Sequence[np.ndarray], window: int = 32) -> int:
    """The sample with the highest lowest-group confidence."""
    return _argmax([lowest_group_confidence(lp, window) for lp in top_logprobs], "deepconf")


def select_selfcert(mean_logprobs: Sequence[np.ndarray], n_vocab: int) -> int:
    """The sample with the highest self-certainty."""
    return _argmax([self_certainty(m, n_vocab) for m in mean_logprobs], "selfcert")


__all__ = ["token_confidence", "lowest_group_confidence", "self_certainty", "select_deepconf", "select_selfcert"]
