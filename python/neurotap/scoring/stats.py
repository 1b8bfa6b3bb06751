"""Bootstrap confidence intervals for accuracies (means of 0/1 outcomes) over a few dozen tasks."""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np

_CHUNK = 1 << 22  # resampled values per block: bounds memory for large n_boot * n


def bootstrap_ci(values: Union[Sequence[float], np.ndarray], n_boot: int = 10000, alpha: float = 0.05,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap (1 - alpha) interval of the mean; deterministic for a seed.

    Empty input raises: an interval of nothing is a caller bug, not a (nan, nan) to plot.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("bootstrap_ci needs at least 1 value, got 0")
    if not np.all(np.isfinite(x)):
        raise ValueError("bootstrap_ci values must be finite")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if x.size == 1:
        return float(x[0]), float(x[0])
    rng = np.random.default_rng(seed)
    rows = max(1, _CHUNK // x.size)
    means = np.concatenate([x[rng.integers(0, x.size, size=(min(rows, n_boot - i), x.size))].mean(axis=1)
                            for i in range(0, n_boot, rows)])
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


__all__ = ["bootstrap_ci"]
