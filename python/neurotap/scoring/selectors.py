"""Best-of-N selectors for NAD (Neuron Agreement Decoding, arXiv 2510.26277).

Every agreement selector takes S, the N x N Jaccard similarity matrix of the samples'
activated-neuron sets (S[i, i] = 1, symmetric), and returns the index of the chosen sample.
Pure numpy (scikit-learn only for DBSCAN, imported lazily) so selection can be studied
offline on saved matrices.

Tie rules are those of the authors' selectors (github.com/Chi-Shan0707/NAD_Next at bf0fafa2,
nad/core/selectors/impl.py, which work on D = 1 - S; tests/test_selectors.py compares with picks
that code made): kNN scores within np.isclose (rtol 1e-5) of the best tie and the medoid among
them wins; medoid and MinAct take the lowest index. Ties are decided on exact values: sums are
taken over sorted values, so the order of summation cannot split a tie, and on float64 S (the
reference's D is float32, so distances closer than float32 resolution tie there, not here).
Kept as neurotap's own (README, "Fidelity"): of equally large DBSCAN clusters the one whose medoid
is the most central wins (the reference: the cluster holding the lowest index, which only sample
order decides), and the cluster's medoid is its lowest index among equals (the reference's comment
says so too, but its code takes the first in its search order).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

_SYMMETRY_TOL = 1e-9
_MIN_EPS = 1e-12  # sklearn rejects eps <= 0; all-identical samples give a 0 percentile
#: kNN scores this close to the best tie (np.isclose's defaults, as the reference's kNN).
KNN_TIE_RTOL, KNN_TIE_ATOL = 1e-5, 1e-8


def check_similarity(S: np.ndarray, method: str) -> np.ndarray:
    """S as a float64 array, after checking that `method` can use it; ValueError otherwise."""
    S = np.asarray(S, dtype=np.float64)
    if S.ndim != 2 or S.shape[0] != S.shape[1]:
        raise ValueError(f"similarity matrix must be square (N x N), got shape {S.shape}")
    if not np.all(np.isfinite(S)):
        raise ValueError("similarity matrix must be finite (found NaN or inf)")
    if not np.allclose(S, S.T, rtol=0.0, atol=_SYMMETRY_TOL):
        raise ValueError(f"similarity matrix must be symmetric (max |S - S.T| = {np.abs(S - S.T).max():.3g})")
    n = S.shape[0]
    if n < 2:
        raise ValueError(f"method '{method}' needs at least 2 samples to measure agreement, got {n}")
    return S


def _sorted_offdiag(S: np.ndarray) -> np.ndarray:
    """Each row's similarities to the other samples, ascending. Sorting before summing makes rows
    holding the same values in another order sum to the exact same float, so ties stay ties."""
    n = S.shape[0]
    return np.sort(S[~np.eye(n, dtype=bool)].reshape(n, n - 1), axis=1)


def knn_scores(S: np.ndarray, k: int = 3) -> np.ndarray:
    """Per sample, the sum of its k largest similarities to other samples (k clipped to N - 1)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    S = check_similarity(S, "knn")
    k = min(int(k), S.shape[0] - 1)
    return _sorted_offdiag(S)[:, -k:].sum(axis=1)


def medoid_scores(S: np.ndarray) -> np.ndarray:
    """Per sample, the sum of its similarities to all other samples."""
    S = check_similarity(S, "medoid")
    return _sorted_offdiag(S).sum(axis=1)


def select_knn(S: np.ndarray, k: int = 3) -> int:
    """The sample most similar to its k nearest neighbours. Mean scores within np.isclose of the
    best (rtol 1e-5, atol 1e-8) tie, and the medoid among them wins, then the lowest index."""
    mean = knn_scores(S, k) / min(int(k), np.asarray(S).shape[0] - 1)  # the reference compares means
    best = int(np.argmax(mean))
    ties = np.flatnonzero(np.isclose(mean, mean[best], rtol=KNN_TIE_RTOL, atol=KNN_TIE_ATOL))
    if ties.size == 1:
        return best
    return int(ties[np.argmax(medoid_scores(S)[ties])])


def select_medoid(S: np.ndarray) -> int:
    """The global medoid: maximizes the similarity sum, i.e. minimizes the sum of distances 1 - S."""
    return int(np.argmax(medoid_scores(S)))


def dbscan_labels(S: np.ndarray, eps_percentile: float = 30.0, min_samples: int = 3) -> np.ndarray:
    """DBSCAN cluster labels (-1 = noise) on D = 1 - S, eps = the given percentile of pairwise distances.

    A percentile rather than a fixed eps because similarity levels vary a lot across models and prompts.
    Neighbours are those within D <= eps, the point itself counted, as the reference's DBSCAN.
    """
    if not 0.0 < eps_percentile <= 100.0:
        raise ValueError(f"eps_percentile must be in (0, 100], got {eps_percentile}")
    if min_samples < 1:
        raise ValueError(f"min_samples must be >= 1, got {min_samples}")
    S = check_similarity(S, "dbscan")
    try:
        from sklearn.cluster import DBSCAN
    except ImportError as e:
        raise ImportError("DBSCAN needs scikit-learn: pip install 'neurotap[eval]'") from e
    # sklearn's precomputed metric rejects negative distances; rounding can make 1 - S dip below 0.
    D = np.clip(1.0 - S, 0.0, None)
    np.fill_diagonal(D, 0.0)
    eps = float(np.percentile(D[np.triu_indices(S.shape[0], k=1)], eps_percentile))
    model = DBSCAN(eps=max(eps, _MIN_EPS), min_samples=int(min_samples), metric="precomputed")
    return model.fit_predict(D)


def select_dbscan(S: np.ndarray, eps_percentile: float = 30.0, min_samples: int = 3) -> int:
    """The medoid of the largest DBSCAN cluster; the global medoid when everything is noise.

    Equally large clusters: the one whose medoid has the highest within-cluster similarity sum,
    then the lowest medoid index (neurotap's rule; the reference takes the cluster holding the
    lowest index). The medoid: the highest similarity sum within the cluster, the lowest index on ties.
    """
    labels = dbscan_labels(S, eps_percentile, min_samples)
    S = np.asarray(S, dtype=np.float64)
    best: tuple[int, float, int] | None = None  # (size, medoid score, medoid index)
    for label in np.unique(labels[labels >= 0]):
        members = np.flatnonzero(labels == label)
        sub = S[np.ix_(members, members)]
        if len(members) > 1:
            scores = _sorted_offdiag(sub).sum(axis=1)
        else:
            scores = np.zeros(1)
        j = int(np.argmax(scores))
        cand = (len(members), float(scores[j]), int(members[j]))
        if best is None or (cand[0], cand[1], -cand[2]) > (best[0], best[1], -best[2]):
            best = cand
    if best is None:  # no cluster formed: fall back to the global medoid
        return select_medoid(S)
    return best[2]


def select_minact(set_sizes: Sequence[int] | np.ndarray) -> int:
    """The sample that activated the fewest neurons."""
    counts = np.asarray(set_sizes)
    if counts.ndim != 1 or counts.size == 0:
        raise ValueError(f"set_sizes must be a non-empty 1-D sequence, got shape {counts.shape}")
    return int(np.argmin(counts))


__all__ = [
    "check_similarity", "knn_scores", "medoid_scores", "select_knn",
    "select_medoid", "dbscan_labels", "select_dbscan", "select_minact",
]
