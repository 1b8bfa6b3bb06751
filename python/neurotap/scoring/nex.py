"""NEX (arXiv 2602.05805): score sampled responses by explore/exploit phases of their neurons,
computed as the authors' reference code computes it.

Reference: github.com/anonymous-research-artifacts/nex at f9033d35 (nex_core/: novelty.py,
segmentation.py, reuse_credit.py, scoring.py); tests/test_nex_reference.py compares every stage
with values that code produced (tests/data/make_nex_reference.py).

A response is `row_mass` [R, N] (each neuron's mass in each row, 0 = not activated; neurotap's
rows are 32 tokens and the mass is the number of the row's tokens on which the neuron was
activated) and `row_tokens` [R] (tokens per row; the last row may be shorter). Rows with no
activated neuron are dropped first, as the reference's scoring.py drops them: novelty, phases and
credit are per retained row. Masses are used as float32, as the reference reads them.

Per response:
- novelty: per row, the neurons activated for the first time in the response / the row's tokens;
- preprocess: log1p, the least-squares line against log(1 + row) removed, then
  (r - median) / (MAD + 1e-6);
- phases: fewer than 3 rows are all Exploit; a zero MAD gives Explore where z > 0; otherwise a
  two-component diagonal Gaussian mixture (scikit-learn, random_state 0, 50 iterations,
  reg_covar 1e-6, variances floored at 1e-6) gives the emissions of a sticky two-state HMM
  (transitions [[rho, 1-rho], [1-rho, rho]], uniform start) decoded by Viterbi with hmmlearn's
  tie rules; Explore is the state with the higher mean (the first on equal means); then, in one
  left-to-right pass, each run shorter than min_run rows takes the label of the row before it (the
  first run: of the row after);
- credit: a cycle is an Explore run E directly followed by an Exploit run X. Its slopes are the
  medians of the novelty over E and over X. A cycle whose E slope is not above the median novelty
  of the response is skipped (left out of the median reuse too), as is one that introduces no
  neuron. reuse = mass in X on the neurons first activated in E / (X's mass + 1e-6);
  consolidation = clip(1 - slope_X / (slope_E + 1e-6), 0, 1); progress = reuse - the median reuse
  of the cycles kept. Progress > 0 with consolidation > 0 credits each introduced neuron as
  effective by progress x consolidation x its mass in the Explore row that introduced it; any
  other nonzero progress credits it as redundant by |progress| x that mass.
Over all given (unlabeled) responses: w = tanh(log((effective + 1e-6) / (redundant + 1e-6))) in
[-1, 1]; a response's Good-Mass Fraction is sum(m max(w, 0)) / sum(m |w|) over its neurons' mass.

Deliberate differences (README, "Fidelity"):
- a cycle whose reuse equals the median reuse at float32 precision (the median's own: the
  reference takes the median of float32-rounded reuses) has progress 0 and is skipped, as the
  method defines it. The reference subtracts the float32 median from the unrounded reuse, so the
  median cycle (of an odd number, or of equal reuses) gets a progress of rounding size (~1e-8) and
  its neurons a credit whose sign the rounding sets; a GMF is a ratio, so where that is a
  response's only credit (one cycle, common in short answers) it decides the scores (near 0 or 1).
  `reference_rounding=True` reproduces the reference bit for bit;
- the GMF of a response with no mass on weighted neurons (or no mass at all) is 0.5, "no evidence
  either way"; the reference gives 0.0 (NaN for an empty response), which ranks an unjudged
  response below every judged one and makes a mean undefined;
- residuals of the log-time fit within 1e-9 (relative) of 0 are taken as 0: they are least-squares
  rounding noise, and without this a series the line fits exactly (a constant novelty) gets
  labels that follow that noise; the reference uses them as they are;
- row_mass must be finite and >= 0 (the reference clips such values to 0; neurotap.apps.cache does
  that when it reads a cache);
- the GMF sums the response's rows; the reference reads the per-response totals of its cache
  (base/), the same numbers up to the cache's float16 rounding.

Pure numpy (scikit-learn only for the Gaussian mixture, matplotlib only for the plot, both
imported lazily) so NEX can be studied offline on saved masses.
"""
from __future__ import annotations

import os
import warnings
from typing import List, Sequence, Tuple

import numpy as np

from ..core.io import atomic_path

#: Tokens in a full row; `credit` assumes full rows when it is not given row_tokens.
ROW_TOKENS = 32
#: The reference's epsilon (MAD, reuse, consolidation and weights).
EPS = 1e-6
#: Fewer retained rows than this: no segmentation (all Exploit), as the reference.
MIN_ROWS = 3
_NOISE = 1e-9  # residuals this small (relative to the series) are rounding noise
_VAR_FLOOR = 1e-6

Response = Tuple[np.ndarray, np.ndarray]
Run = Tuple[int, int, int]
Cycle = Tuple[int, int, int, int]


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


def retained_rows(row_mass: np.ndarray, row_tokens: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """The rows with at least one activated neuron (masses as float32) and their token counts."""
    m, t = _check_response(row_mass, row_tokens)
    m32 = m.astype(np.float32)
    keep = (m32 > 0).any(axis=1)
    return m32[keep], t[keep]


def _first_rows(m: np.ndarray) -> np.ndarray:
    """Per neuron, the first row where it has mass; -1 if it never does."""
    active = m > 0
    if m.shape[0] == 0:
        return np.full(m.shape[1], -1, dtype=np.int64)
    first = active.argmax(axis=0)
    return np.where(active.any(axis=0), first, -1)


def _novelty(m: np.ndarray, t: np.ndarray) -> np.ndarray:
    first = _first_rows(m)
    counts = np.bincount(first[first >= 0], minlength=m.shape[0])
    return (counts / t).astype(np.float32)  # per token; float32 as the reference keeps it


def novelty(row_mass: np.ndarray, row_tokens: np.ndarray) -> np.ndarray:
    """Per retained row: neurons activated for the first time in this response / the row's tokens."""
    return _novelty(*retained_rows(row_mass, row_tokens))


def _preprocess(nov: np.ndarray) -> Tuple[np.ndarray, bool]:
    """(z, whether it was scaled by a nonzero MAD)."""
    x = np.asarray(nov, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"novelty must be 1-D, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("novelty must be finite")
    if x.size == 0:
        return x.copy(), False
    y = np.log1p(np.clip(x, 0.0, None))
    time = np.arange(y.size, dtype=np.float64)
    design = np.stack((np.ones_like(time), np.log1p(time)), axis=1)
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    r = y - design @ coef
    r[np.abs(r) <= _NOISE * max(1.0, float(np.abs(y).max()))] = 0.0
    med = float(np.median(r))
    mad = float(np.median(np.abs(r - med)))
    if mad <= 0.0:
        return r - med, False
    return (r - med) / (mad + EPS), True


def preprocess(nov: np.ndarray) -> np.ndarray:
    """log1p, remove the least-squares trend against log(1 + row), then (r - median) / (MAD + 1e-6).

    Novelty naturally decays over a response; detrending keeps that decay from being read as one
    long Explore phase. With a zero MAD (more than half the residuals equal) it returns r - median
    unscaled, as the reference. Never NaN.
    """
    return _preprocess(nov)[0]


def fit_emissions(z: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Means and variances of a 2-component diagonal Gaussian mixture on z, fitted as the reference
    fits it (random_state 0, at most 50 EM iterations, reg_covar 1e-6; component order as
    scikit-learn's), variances floored at 1e-6. z needs at least 2 distinct values."""
    z = np.asarray(z, dtype=np.float64)
    if z.ndim != 1:
        raise ValueError(f"z must be 1-D, got shape {z.shape}")
    if not np.all(np.isfinite(z)):
        raise ValueError("z must be finite")
    if np.unique(z).size < 2:
        raise ValueError("a two-component mixture needs at least 2 distinct values of z")
    try:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.mixture import GaussianMixture
    except ImportError as e:
        raise ImportError("NEX needs scikit-learn: pip install 'neurotap[eval]'") from e
    gm = GaussianMixture(n_components=2, covariance_type="diag", random_state=0, max_iter=50, reg_covar=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # 50 iterations, converged or not, as the reference
        gm.fit(z.reshape(-1, 1))
    means = gm.means_.reshape(-1).astype(np.float64)
    variances = np.clip(gm.covariances_.reshape(-1).astype(np.float64), _VAR_FLOOR, None)
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


def _enforce_min_run(labels: np.ndarray, min_run: int) -> np.ndarray:
    """One pass left to right: a run shorter than min_run takes the label of the row before it (the
    first run: of the row after), and the scan goes on after it (the reference's _enforce_min_run)."""
    s = np.asarray(labels).astype(np.int64).copy()
    start = 0
    while start < s.size:
        end = start + 1
        while end < s.size and s[end] == s[start]:
            end += 1
        if end - start < min_run and (start > 0 or end < s.size):
            s[start:end] = s[start - 1] if start > 0 else s[end]
        start = end
    return s


def _check_hmm(rho: float, min_run: int) -> None:
    if not (np.isfinite(rho) and 0.0 < rho < 1.0):
        raise ValueError(f"rho must be in (0, 1), got {rho}")
    if min_run < 1:
        raise ValueError(f"min_run must be >= 1, got {min_run}")


def viterbi(z: np.ndarray, means: Sequence[float], variances: Sequence[float], rho: float = 0.95,
            min_run: int = 2) -> np.ndarray:
    """Explore (1) / Exploit (0) per row: Viterbi path of a sticky two-state Gaussian HMM, short runs merged.

    As hmmlearn's GaussianHMM.decode, which the reference calls: log emissions
    -0.5 (log 2 pi + log var + (z - mean)^2 / var), uniform start, transitions
    [[rho, 1-rho], [1-rho, rho]]; the last row takes the first best state, the traceback the last
    best on a tie. Explore is the state with the higher mean (the first on equal means).
    """
    z = np.asarray(z, dtype=np.float64)
    mu = np.asarray(means, dtype=np.float64)
    var = np.asarray(variances, dtype=np.float64)
    if z.ndim != 1 or mu.shape != (2,) or var.shape != (2,):
        raise ValueError("z must be 1-D and means, variances must each hold 2 values")
    if not np.all(var > 0):
        raise ValueError("variances must be > 0")
    _check_hmm(rho, min_run)
    n = z.size
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    log_a = np.log(np.array([[rho, 1.0 - rho], [1.0 - rho, rho]]))  # [from, to]
    log_b = -0.5 * (np.log(2 * np.pi) + np.log(var) + (z[:, None] - mu) ** 2 / var)  # [R, 2]
    lattice = np.empty((n, 2))
    lattice[0] = np.log(np.array([0.5, 0.5])) + log_b[0]
    for t in range(1, n):
        lattice[t] = (lattice[t - 1][:, None] + log_a).max(axis=0) + log_b[t]
    s = np.empty(n, dtype=np.int64)
    s[-1] = int(np.argmax(lattice[-1]))
    for t in range(n - 2, -1, -1):
        v = lattice[t] + log_a[:, s[t + 1]]
        s[t] = 1 if v[1] >= v[0] else 0
    explore = (s == int(np.argmax(mu))).astype(np.int64)
    return _enforce_min_run(explore, min_run)


def _phases(nov: np.ndarray, rho: float, min_run: int) -> np.ndarray:
    _check_hmm(rho, min_run)
    if nov.size < MIN_ROWS:
        return np.zeros(nov.size, dtype=np.int64)
    z, scaled = _preprocess(nov)
    if not scaled:
        return _enforce_min_run(z > 0.0, min_run)
    try:
        means, variances = fit_emissions(z)
    except (ValueError, np.linalg.LinAlgError):  # the reference falls back to the sign of z when a fit fails
        return _enforce_min_run(z > 0.0, min_run)
    return viterbi(z, means, variances, rho=rho, min_run=min_run)


def phases(row_mass: np.ndarray, row_tokens: np.ndarray, rho: float = 0.95, min_run: int = 2) -> np.ndarray:
    """Explore (1) / Exploit (0) per retained row of one response: novelty, preprocess, emissions, viterbi."""
    return _phases(novelty(row_mass, row_tokens), rho, min_run)


def cycles(states: np.ndarray) -> List[Cycle]:
    """(e0, e1, x0, x1) of each Explore run [e0, e1) directly followed by an Exploit run [x0, x1)."""
    rs = runs(states)
    return [(a0, a1, b0, b1) for (sa, a0, a1), (sb, b0, b1) in zip(rs, rs[1:]) if sa == 1 and sb == 0]


def credit(row_mass: np.ndarray, states: np.ndarray, row_tokens: np.ndarray | None = None, *,
           reference_rounding: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """Effective and redundant credit [N] that this response's cycles give its neurons.

    `states` holds one value per retained row (as `phases` returns them). row_tokens only scales
    novelty; None means full 32-token rows. The rules are the module docstring's;
    reference_rounding=True keeps the reference's rounding-sized progress of the median cycle.
    """
    m0 = _check_mass(row_mass)
    if row_tokens is None:
        row_tokens = np.full(m0.shape[0], ROW_TOKENS, dtype=np.int64)
    m, t = retained_rows(m0, row_tokens)
    s = np.asarray(states)
    if s.shape != (m.shape[0],):
        raise ValueError(f"states must hold one value per retained row ({m.shape[0]} of {m0.shape[0]} rows have "
                         f"an activated neuron), got shape {s.shape}")
    effective = np.zeros(m.shape[1])
    redundant = np.zeros(m.shape[1])
    cyc = cycles(s)
    if not cyc:
        return effective, redundant
    slopes = _novelty(m, t)
    first = _first_rows(m)
    active = m > 0
    # float32 sums over each row's activated neurons in neuron order, as the reference sums a row's
    # keys: bit-equal reuse matters, since the median cycle's progress is a rounding difference.
    row_totals = np.array([float(np.sum(m[r][active[r]])) for r in range(m.shape[0])])
    median_slope = float(np.median(slopes))
    kept = []  # (introduced neurons, reuse, consolidation)
    for e0, e1, x0, x1 in cyc:
        slope_e = float(np.median(slopes[e0:e1]))
        slope_x = float(np.median(slopes[x0:x1]))
        idx = np.flatnonzero((first >= e0) & (first < e1))
        if slope_e - median_slope <= 0.0 or idx.size == 0:
            continue
        c = float(np.clip(1.0 - slope_x / (slope_e + EPS), 0.0, 1.0)) if slope_e > 0.0 else 0.0
        mark = np.zeros(m.shape[1], dtype=bool)
        mark[idx] = True
        reused = sum(float(np.sum(m[r][active[r] & mark])) for r in range(x0, x1))
        kept.append((idx, reused / (float(np.sum(row_totals[x0:x1])) + EPS), c))
    if not kept:
        return effective, redundant
    median_reuse = float(np.median(np.array([k[1] for k in kept], dtype=np.float32)))
    for idx, reuse, c in kept:
        if not reference_rounding and np.float32(reuse) == np.float32(median_reuse):
            continue  # the median cycle: progress 0 at the median's precision
        progress = reuse - median_reuse
        if progress == 0.0:
            continue
        good = progress > 0.0 and c > 0.0
        scale = progress * c if good else abs(progress)
        if scale <= 0.0:
            continue
        target = effective if good else redundant
        target[idx] += m[first[idx], idx] * scale  # float32 product, as the reference
    return effective, redundant


def neuron_weights(responses: Sequence[Response], rho: float = 0.95, eps: float = EPS, *,
                   reference_rounding: bool = False) -> np.ndarray:
    """Per neuron, tanh(log((eff + eps) / (red + eps))) of credit summed over all responses.

    In [-1, 1]; 0 for neurons never credited (eff = red = 0). reference_rounding: see `credit`.
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
        eff, red = credit(m, phases(m, t, rho=rho), t, reference_rounding=reference_rounding)
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


def nex_scores(responses: Sequence[Response], rho: float = 0.95, *, reference_rounding: bool = False) -> np.ndarray:
    """GMF of each response under neuron weights learned from all the given (unlabeled) responses."""
    if len(responses) == 0:
        return np.zeros(0)
    w = neuron_weights(responses, rho=rho, reference_rounding=reference_rounding)
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
