"""NEX (arXiv 2602.05805): score sampled responses by explore/exploit phases of their neurons.

A response is `row_mass` [R, N] (each neuron's mass in each 32-token row, 0 = not activated) and
`row_tokens` [R] (tokens per row; the last row may be shorter). Per response: the novelty curve
(neurons activated for the first time, per token) is detrended and robustly standardized, a
two-state Gaussian HMM splits the rows into Explore (novelty bursts) and Exploit runs, and each
Explore run followed by an Exploit run (a cycle) credits the neurons it introduced as effective
(reused and consolidated afterwards) or redundant. Credit summed over all responses gives each
neuron a weight in [-1, 1]; a response's score is the share of its mass on positively weighted
neurons (good mass fraction). No labels are needed.

Pure numpy (scikit-learn only for the Gaussian mixture, matplotlib only for the plot, both
imported lazily) so NEX can be studied offline on saved masses.
"""
from __future__ import annotations

import os
from typing import List, Sequence, Tuple

import numpy as np

from ..core.io import atomic_path

#: Tokens in a full row; `credit` assumes full rows when it is not given row_tokens.
ROW_TOKENS = 32
#: Standardization scale below this (relative to the series) is rounding noise, treated as 0.
_SCALE_TOL = 1e-9
_MAD_TO_SD = 1.4826
_VAR_FLOOR = 1e-3
#: Emissions used when a series is too short or flat for a mixture fit (z is ~N(0, 1) there).
FALLBACK_MEANS = (-0.5, 0.5)
FALLBACK_VARIANCES = (1.0, 1.0)

Response = Tuple[np.ndarray, np.ndarray]
Run = Tuple[int, int, int]


def _check_mass(row_mass: np.ndarray) -> np.ndarray:
    m = np.asarray(row_mass, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"row_mass must be 2-D [rows, neurons], got shape {m.shape}")
    if not np.all(np.isfinite(m)) or np.any(m < 0):
        raise ValueError("row_mass must be finite and >= 0")
    return m


def _check_response(row_mass: np.ndarray, row_tokens: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    m = _check_mass(row_mass)
    t = np.asarray(row_tokens)
    if t.shape != (m.shape[0],):
        raise ValueError(f"row_tokens must have shape ({m.shape[0]},) to match row_mass, got {t.shape}")
    if t.size and (not np.issubdtype(t.dtype, np.integer) or t.min() < 1):
        raise ValueError("row_tokens must be integers >= 1")
    return m, t.astype(np.int64)


def _first_rows(m: np.ndarray) -> np.ndarray:
    """Per neuron, the first row where it has mass; -1 if it never does."""
    active = m > 0
    if m.shape[0] == 0:
        return np.full(m.shape[1], -1, dtype=np.int64)
    first = active.argmax(axis=0)
    return np.where(active.any(axis=0), first, -1)


def novelty(row_mass: np.ndarray, row_tokens: np.ndarray) -> np.ndarray:
    """Per row: neurons activated for the first time in this response, divided by the row's tokens."""
    m, t = _check_response(row_mass, row_tokens)
    first = _first_rows(m)
    counts = np.bincount(first[first >= 0], minlength=m.shape[0])
    return counts / t  # per token, so a short last row is not under-counted


def preprocess(nov: np.ndarray) -> np.ndarray:
    """log1p, remove the trend against log(1 + row), standardize by median and MAD (std if MAD is 0).

    Novelty naturally decays over a response; detrending keeps that decay from being read as
    one long Explore phase. A flat series (zero MAD and std) returns zeros, never NaN.
    """
    y = np.log1p(np.asarray(nov, dtype=np.float64))
    if y.ndim != 1:
        raise ValueError(f"novelty must be 1-D, got shape {y.shape}")
    n = y.size
    if n == 0:
        return y
    if n >= 3:
        x = np.log1p(np.arange(n, dtype=np.float64))
        X = np.column_stack([np.ones(n), x])
        coef, *_ = np.linalg.lstsq(X, y, rcond=None)
        r = y - X @ coef
    else:  # two points always fit a line exactly: keep their difference instead
        r = y - y.mean()
    tol = _SCALE_TOL * max(1.0, float(np.abs(y).max()))
    med = float(np.median(r))
    scale = _MAD_TO_SD * float(np.median(np.abs(r - med)))
    if scale <= tol:  # more than half the rows equal: MAD says nothing, fall back to the std
        scale = float(r.std())
    if scale <= tol:
        return np.zeros(n)
    return (r - med) / scale


def fit_emissions(z: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Means and variances of a 2-component Gaussian mixture on z (component order as sklearn's).

    Fewer than 4 rows or a constant z cannot support a fit: returns means (-0.5, 0.5) and
    variances (1, 1), under which Viterbi mostly keeps one state. Variances are floored at 1e-3
    so a tight cluster of identical rows cannot give an infinitely sharp emission.
    """
    z = np.asarray(z, dtype=np.float64)
    if z.ndim != 1:
        raise ValueError(f"z must be 1-D, got shape {z.shape}")
    if not np.all(np.isfinite(z)):
        raise ValueError("z must be finite")
    if z.size < 4 or np.ptp(z) <= _SCALE_TOL * max(1.0, float(np.abs(z).max())):
        return np.array(FALLBACK_MEANS), np.array(FALLBACK_VARIANCES)
    try:
        from sklearn.mixture import GaussianMixture
    except ImportError as e:
        raise ImportError("NEX needs scikit-learn: pip install 'neurotap[eval]'") from e
    gm = GaussianMixture(n_components=2, random_state=0).fit(z.reshape(-1, 1))
    means = gm.means_.reshape(2).astype(np.float64)
    variances = np.maximum(gm.covariances_.reshape(2).astype(np.float64), _VAR_FLOOR)
    return means, variances


def runs(states: np.ndarray) -> List[Run]:
    """Maximal runs of equal states as (state, start, end), end exclusive."""
    s = np.asarray(states).astype(np.int64)
    if s.size == 0:
        return []
    cuts = np.flatnonzero(np.diff(s)) + 1
    starts = np.concatenate([[0], cuts])
    ends = np.concatenate([cuts, [s.size]])
    return [(int(s[a]), int(a), int(b)) for a, b in zip(starts, ends)]


def _merge_short_runs(states: np.ndarray, min_run: int) -> np.ndarray:
    """Give each run shorter than min_run the previous run's state (the first run: the next's).

    One short run at a time, left to right, recomputing runs after each merge: a merge can join
    three runs into one, so the runs after it change.
    """
    s = states.copy()
    while True:
        rs = runs(s)
        short = next((i for i, (_, a, b) in enumerate(rs) if b - a < min_run), None)
        if short is None or len(rs) < 2:
            return s
        _, a, b = rs[short]
        s[a:b] = rs[short - 1][0] if short > 0 else rs[short + 1][0]


def viterbi(z: np.ndarray, means: Sequence[float], variances: Sequence[float], rho: float = 0.95,
            min_run: int = 2) -> np.ndarray:
    """Most likely state per row of a sticky two-state Gaussian HMM, short runs merged.

    Transitions [[rho, 1-rho], [1-rho, rho]], uniform start, log space. Returns int states with
    1 = Explore (the state with the higher emission mean), 0 = Exploit.
    """
    z = np.asarray(z, dtype=np.float64)
    mu = np.asarray(means, dtype=np.float64)
    var = np.asarray(variances, dtype=np.float64)
    if z.ndim != 1 or mu.shape != (2,) or var.shape != (2,):
        raise ValueError("z must be 1-D and means, variances must each hold 2 values")
    if not np.all(var > 0):
        raise ValueError("variances must be > 0")
    if not 0.0 < rho < 1.0:
        raise ValueError(f"rho must be in (0, 1), got {rho}")
    if min_run < 1:
        raise ValueError(f"min_run must be >= 1, got {min_run}")
    n = z.size
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    log_a = np.log(np.array([[rho, 1.0 - rho], [1.0 - rho, rho]]))  # [from, to]
    log_b = -0.5 * (np.log(2.0 * np.pi * var) + (z[:, None] - mu) ** 2 / var)  # [R, 2]
    delta = np.log(0.5) + log_b[0]
    back = np.zeros((n, 2), dtype=np.int64)
    for t in range(1, n):
        cand = delta[:, None] + log_a
        back[t] = cand.argmax(axis=0)
        delta = cand.max(axis=0) + log_b[t]
    s = np.zeros(n, dtype=np.int64)
    s[-1] = int(delta.argmax())
    for t in range(n - 1, 0, -1):
        s[t - 1] = back[t, s[t]]
    s = _merge_short_runs(s, min_run)
    if mu[0] > mu[1]:  # sklearn's component order is arbitrary; Explore is the high-novelty state
        s = 1 - s
    return s


def phases(row_mass: np.ndarray, row_tokens: np.ndarray, rho: float = 0.95) -> np.ndarray:
    """Explore (1) / Exploit (0) state per row of one response: stages novelty .. viterbi."""
    z = preprocess(novelty(row_mass, row_tokens))
    means, variances = fit_emissions(z)
    return viterbi(z, means, variances, rho=rho)


def credit(row_mass: np.ndarray, states: np.ndarray,
           row_tokens: np.ndarray | None = None) -> Tuple[np.ndarray, np.ndarray]:
    """Effective and redundant credit [N] of the neurons introduced in this response's cycles.

    A cycle is an Explore run E followed directly by an Exploit run X. Its introduced neurons
    (first activated in E) are judged by reuse (their share of X's mass, relative to the
    response's median cycle) and consolidation (how much novelty fell from E to X). row_tokens
    only scales novelty; None means full 32-token rows.
    """
    m = _check_mass(row_mass)
    n_rows, n_neurons = m.shape
    if row_tokens is None:
        row_tokens = np.full(n_rows, ROW_TOKENS, dtype=np.int64)
    s = np.asarray(states)
    if s.shape != (n_rows,):
        raise ValueError(f"states must have shape ({n_rows},) to match row_mass, got {s.shape}")
    nov = novelty(m, row_tokens)
    first = _first_rows(m)
    effective = np.zeros(n_neurons)
    redundant = np.zeros(n_neurons)
    rs = runs(s)
    cycles = [(rs[i], rs[i + 1]) for i in range(len(rs) - 1) if rs[i][0] == 1 and rs[i + 1][0] == 0]
    if not cycles:
        return effective, redundant
    introduced, reuse, consolidation = [], [], []
    for (_, e0, e1), (_, x0, x1) in cycles:
        idx = np.flatnonzero((first >= e0) & (first < e1))
        x_mass = m[x0:x1]
        total = float(x_mass.sum())
        reuse.append(float(x_mass[:, idx].sum()) / total if total > 0 else 0.0)
        slope_e, slope_x = float(nov[e0:e1].mean()), float(nov[x0:x1].mean())
        consolidation.append(float(np.clip(1.0 - slope_x / slope_e, 0.0, 1.0)) if slope_e > 0 else 0.0)
        introduced.append(idx)
    progress = np.asarray(reuse) - np.median(reuse)  # relative to this response's typical cycle
    for idx, p, c in zip(introduced, progress, consolidation):
        if p > 0 and c > 0:
            effective[idx] += p * c
        else:
            redundant[idx] += abs(p)
    return effective, redundant


def neuron_weights(responses: Sequence[Response], rho: float = 0.95, eps: float = 1e-6) -> np.ndarray:
    """Per neuron, tanh(log((eff + eps) / (red + eps))) of credit summed over all responses.

    In [-1, 1]; 0 for neurons never credited (eff = red = 0).
    """
    if len(responses) == 0:
        raise ValueError("neuron_weights needs at least one response")
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    n_neurons = np.asarray(responses[0][0]).shape[-1]
    effective = np.zeros(n_neurons)
    redundant = np.zeros(n_neurons)
    for i, (row_mass, row_tokens) in enumerate(responses):
        m, t = _check_response(row_mass, row_tokens)
        if m.shape[1] != n_neurons:
            raise ValueError(f"response {i} has {m.shape[1]} neurons, response 0 has {n_neurons}")
        eff, red = credit(m, phases(m, t, rho=rho), t)
        effective += eff
        redundant += red
    return np.tanh(np.log((effective + eps) / (redundant + eps)))


def good_mass_fraction(row_mass: np.ndarray, w: np.ndarray) -> float:
    """Share of the response's weighted mass on positively weighted neurons, in [0, 1].

    0.5 ("no evidence either way") when none of its mass lies on weighted neurons, e.g. an
    empty response or a short one whose neurons were never credited.
    """
    m = _check_mass(row_mass)
    w = np.asarray(w, dtype=np.float64)
    if w.shape != (m.shape[1],):
        raise ValueError(f"w must have shape ({m.shape[1]},) to match row_mass, got {w.shape}")
    mass = m.sum(axis=0)
    den = float(mass @ np.abs(w))
    if den <= 0:
        return 0.5
    return float(mass @ np.maximum(w, 0.0)) / den


def nex_scores(responses: Sequence[Response], rho: float = 0.95) -> np.ndarray:
    """GMF of each response under neuron weights learned from all the given (unlabeled) responses."""
    if len(responses) == 0:
        return np.zeros(0)
    w = neuron_weights(responses, rho=rho)
    return np.array([good_mass_fraction(m, w) for m, _ in responses])


def select_nex(responses: Sequence[Response], rho: float = 0.95) -> int:
    """Index of the response with the highest NEX score; the lowest index on ties."""
    if len(responses) == 0:
        raise ValueError("select_nex needs at least one response")
    return int(np.argmax(nex_scores(responses, rho=rho)))  # argmax returns the first maximum


def plot_phases(novelty_series: np.ndarray, states: np.ndarray, path: str | os.PathLike, title: str = "") -> None:
    """PNG of the novelty curve with Explore rows shaded, written atomically (temp file + replace)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("plot_phases needs matplotlib: pip install 'neurotap[eval]'") from e
    nov = np.asarray(novelty_series, dtype=np.float64)
    s = np.asarray(states)
    if nov.ndim != 1 or s.shape != nov.shape:
        raise ValueError(f"novelty_series and states must be 1-D of equal length, got {nov.shape}, {s.shape}")
    # A bare Figure on an Agg canvas: no pyplot, so no global backend change and no GUI.
    fig = Figure(figsize=(8, 3))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for state, a, b in runs(s):
        if state == 1:
            ax.axvspan(a - 0.5, b - 0.5, color="tab:orange", alpha=0.25, lw=0)
    ax.plot(np.arange(nov.size), nov, color="tab:blue", marker=".", lw=1)
    ax.set_xlabel(f"row ({ROW_TOKENS} tokens)")
    ax.set_ylabel("new neurons / token")
    ax.set_title(title or "novelty (shaded: Explore)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
