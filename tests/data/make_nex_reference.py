"""Writes tests/data/nex_reference.npz: constructed NEX inputs and what the authors' reference code
computes on them, stage by stage. tests/test_nex_reference.py compares neurotap.scoring.nex with it.

Not imported by the tests and not run by them: it runs the reference, which is not a dependency.

Reference: github.com/anonymous-research-artifacts/nex, commit f9033d35e3899123cc889e98259c2f10c539f285
(nex_core/), with the versions its requirements.txt pins. To regenerate:

    python3 -m venv /tmp/ref/venv
    /tmp/ref/venv/bin/pip install numpy==2.2.6 scikit-learn==1.9.0 hmmlearn==0.3.3
    git clone https://github.com/anonymous-research-artifacts/nex /tmp/ref/nex
    git -C /tmp/ref/nex checkout f9033d35e3899123cc889e98259c2f10c539f285
    /tmp/ref/venv/bin/python tests/data/make_nex_reference.py --ref /tmp/ref/nex --out tests/data/nex_reference.npz

The inputs are stored in the file, so the tests never depend on this script's random generator.
Weights and scores come from the reference's own entry points (learn_nex_weights, score_responses)
run on the inputs written as a sparse cache; the per-stage values come from its stage functions,
called the way learn_nex_weights calls them, with its GaussianMixture and GaussianHMM wrapped only
to record what they fitted and decoded.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

REF_COMMIT = "f9033d35e3899123cc889e98259c2f10c539f285"
N_LAYERS, N_FF = 30, 1536  # the default model's shape; keys (layer << 16) | neuron
UNIVERSE = 700  # neurons the responses draw from (shared, so weights meet across responses)


def random_schedule(rng: np.random.Generator, n_rows: int) -> list:
    """Per row (explore?, new neurons): Exploit runs with few new neurons alternating with Explore
    bursts of many, fewer as the response goes on (some bursts weak)."""
    out, explore, weak = [], False, False
    while len(out) < n_rows:
        for _ in range(int(rng.integers(2, 5)) if explore else int(rng.integers(3, 9))):
            if len(out) == n_rows:
                break
            decay = 1.0 - 0.7 * len(out) / n_rows  # novelty fades over a response
            burst = rng.integers(2, 6) if weak else rng.integers(10, 28)
            out.append((explore, int(round(burst * decay)) if explore else int(rng.integers(0, 4))))
        if not explore:
            weak = bool(rng.random() < 0.3)
        explore = not explore
    return out


def stepped_schedule(rng: np.random.Generator) -> list:
    """Two thirds of the rows bring many new neurons, the last third few, with two modest bursts
    there: below the response's median novelty, so the reference skips their cycles (if they
    decode as Explore)."""
    out = [(False, int(rng.integers(7, 10))) for _ in range(40)]
    out[10:13] = [(True, 30)] * 3
    out += [(False, int(rng.integers(0, 2))) for _ in range(30)]
    out[50:53] = [(True, 6)] * 3
    out[60:63] = [(True, 6)] * 3
    return out


def make_response(rng: np.random.Generator, universe: np.ndarray, schedule: list, fractional: bool,
                  empty_rows: int = 0):
    """Rows following `schedule`: each row brings its new neurons and reuses earlier ones; each
    Exploit run leans on the burst before it by a random amount, so cycles differ in reuse.
    Returns per row (column indices, masses) and token counts."""
    seen: list[int] = []
    fresh = list(rng.permutation(universe))
    last_burst: list[int] = []
    rows = []
    lean, prev_explore = 0.5, False
    for explore, n_new in schedule:
        if prev_explore and not explore:
            lean = float(rng.uniform(0.05, 0.95))
        if explore and not prev_explore:
            last_burst = []
        prev_explore = explore
        n_old = int(rng.integers(0, 5)) if explore else int(rng.integers(6, 22))
        new = [int(fresh.pop()) for _ in range(min(n_new, len(fresh)))]
        old: list[int] = []
        for _ in range(min(n_old, len(seen))):
            src = last_burst if (last_burst and rng.random() < lean) else seen
            old.append(int(src[int(rng.integers(len(src)))]))
        cols = np.unique(np.array(new + old, dtype=np.int64))
        if fractional:
            mass = rng.gamma(2.0, 0.8, size=cols.size).astype(np.float16)
            mass = np.maximum(mass, np.float16(0.0625))
        else:
            mass = rng.integers(1, 33, size=cols.size).astype(np.float16)
        rows.append((cols, mass))
        seen.extend(new)
        if explore:
            last_burst.extend(new)
    for _ in range(empty_rows):  # rows where nothing was activated: the reference drops them
        at = int(rng.integers(1, len(rows)))
        rows.insert(at, (np.zeros(0, np.int64), np.zeros(0, np.float16)))
    tokens = np.full(len(rows), 32, dtype=np.int64)
    if len(rows):
        tokens[-1] = int(rng.integers(1, 33))
    return rows, tokens


def build_inputs(seed: int = 20260811):
    rng = np.random.default_rng(seed)
    layers = rng.integers(0, N_LAYERS, size=UNIVERSE * 2)
    neurons = rng.integers(0, N_FF, size=UNIVERSE * 2)
    keys = np.unique((layers.astype(np.uint32) << 16) | neurons.astype(np.uint32))[:UNIVERSE]
    keys = np.sort(rng.permutation(keys)[:UNIVERSE]).astype(np.uint32)
    columns = np.arange(keys.size)
    responses = []
    plan = [(60, False, 0), (84, True, 1), (45, False, 2), ("step", True, 0), (38, False, 1),
            (72, True, 0), ("step", False, 1), (66, True, 2), (30, False, 0)]
    for n_rows, fractional, empty in plan:
        schedule = stepped_schedule(rng) if n_rows == "step" else random_schedule(rng, n_rows)
        responses.append(make_response(rng, columns, schedule, fractional, empty))
    # Edge cases: two rows (too short for a cycle); a response whose rows are all empty.
    responses.append(make_response(rng, columns, random_schedule(rng, 2), False))
    responses.append(([(np.zeros(0, np.int64), np.zeros(0, np.float16))] * 3, np.full(3, 32, np.int64)))
    return keys, responses


def write_cache(root: Path, keys: np.ndarray, responses) -> np.ndarray:
    """The rows/ and base/ files nex_core/scoring.py reads. base/ holds each response's neuron masses
    summed over its rows (float32, then float16 as stored). Returns base mass [n, N] as float16."""
    sample_row_ptr, row_ptr, token_row_ptr = [0], [0], [0]
    row_keys, row_w = [], []
    base_ptr, base_keys, base_w = [0], [], []
    base_dense = np.zeros((len(responses), keys.size), np.float16)
    for i, (rows, tokens) in enumerate(responses):
        acc = np.zeros(keys.size, np.float32)
        for (cols, mass), t in zip(rows, tokens):
            row_keys.append(keys[cols])
            row_w.append(mass)
            row_ptr.append(row_ptr[-1] + cols.size)
            token_row_ptr.append(token_row_ptr[-1] + int(t))
            acc[cols] += mass.astype(np.float32)
        sample_row_ptr.append(len(row_ptr) - 1)
        nz = np.flatnonzero(acc > 0)
        base_keys.append(keys[nz])
        base_w.append(acc[nz].astype(np.float16))
        base_ptr.append(base_ptr[-1] + nz.size)
        base_dense[i, nz] = acc[nz].astype(np.float16)
    (root / "rows").mkdir(parents=True)
    (root / "base").mkdir()
    cat = lambda xs, dt: (np.concatenate(xs) if xs else np.zeros(0)).astype(dt)  # noqa: E731
    np.asarray(sample_row_ptr, np.int64).tofile(root / "rows/sample_row_ptr.int64")
    np.asarray(row_ptr, np.int64).tofile(root / "rows/row_ptr.int64")
    np.asarray(token_row_ptr, np.int64).tofile(root / "rows/token_row_ptr.int64")
    cat(row_keys, np.uint32).tofile(root / "rows/keys.uint32")
    cat(row_w, np.float16).tofile(root / "rows/w_sum.float16")
    np.asarray(base_ptr, np.int64).tofile(root / "base/row_ptr.int64")
    cat(base_keys, np.uint32).tofile(root / "base/keys.uint32")
    cat(base_w, np.float16).tofile(root / "base/w_sum.float16")
    return base_dense


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ref", required=True, help="checkout of anonymous-research-artifacts/nex")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(args.ref).resolve()))
    import sklearn
    import hmmlearn
    from nex_core import novelty as nv, reuse_credit as rc, scoring as sc, segmentation as sg

    # Record what the reference's own mixture and HMM produce, without changing them.
    fitted: list = []

    class RecordingGMM(sg.GaussianMixture):
        def fit(self, X, y=None):
            out = super().fit(X, y)
            fitted.append(("gmm", self.means_.reshape(-1).copy(), self.covariances_.reshape(-1).copy()))
            return out

    class RecordingHMM(sg.GaussianHMM):
        def decode(self, X, lengths=None, algorithm=None):
            out = super().decode(X, lengths=lengths, algorithm=algorithm)
            fitted.append(("hmm", np.asarray(out[1]).copy()))
            return out

    sg.GaussianMixture, sg.GaussianHMM = RecordingGMM, RecordingHMM

    keys, responses = build_inputs()
    n, N = len(responses), keys.size
    col_of = {int(k): j for j, k in enumerate(keys)}
    tracker = nv.FirstSeenTracker.create()
    scratch = rc.ReuseScratch.create()
    eff_all = np.zeros((n, N), np.float32)
    red_all = np.zeros((n, N), np.float32)
    retained_l, slopes_l, z_l, labels_l, raw_l, cycles_l = [], [], [], [], [], []
    retained_ptr, cycles_ptr = [0], [0]
    means = np.full((n, 2), np.nan)
    variances = np.full((n, 2), np.nan)
    scored = np.zeros(n, bool)  # a stage ran for this response (>= 3 retained rows)
    for i, (rows, tokens) in enumerate(responses):
        # learn_nex_weights' loop, one response at a time, its credit kept apart.
        version = tracker.begin_response()
        rk, rm, rt, kept = [], [], [], []
        for r, ((cols, mass), t) in enumerate(zip(rows, tokens)):
            if cols.size == 0 or t <= 0:
                continue
            k, m = sc._retained_row(keys[cols], mass)
            if k.size == 0 or float(np.sum(m)) <= 0.0:
                continue
            rk.append(k), rm.append(m), rt.append(int(t)), kept.append(r)
        if len(rows) < 3 or len(rk) < 3:
            retained_ptr.append(retained_ptr[-1])
            cycles_ptr.append(cycles_ptr[-1])
            continue
        scored[i] = True
        nov = nv.first_positive_novelty(rk, rm, np.asarray(rt, np.int32), tracker=tracker, version=version)
        fitted.clear()
        labels = sg.sticky_hmm_segments(nov.slopes, rho=0.95, min_run=2)
        raw = np.full(len(rk), -1, np.int64)
        for rec in fitted:
            if rec[0] == "gmm":
                means[i], variances[i] = rec[1], rec[2]
            else:
                raw = rec[1]
        eff = np.zeros(nv.ARR_SIZE, np.float32)
        red = np.zeros(nv.ARR_SIZE, np.float32)
        rc.accumulate_reuse_credit(labels=labels, novelty=nov, row_keys=rk, row_mass=rm,
                                   effective_mass=eff, redundant_mass=red, scratch=scratch)
        assert not (np.delete(eff, keys).any() or np.delete(red, keys).any())
        eff_all[i], red_all[i] = eff[keys], red[keys]
        cyc = rc._explore_exploit_cycles(labels)
        retained_l.append(np.asarray(kept, np.int64))
        slopes_l.append(nov.slopes)
        z_l.append(sg.preprocess_novelty(nov.slopes))
        labels_l.append(labels)
        raw_l.append(raw)
        cycles_l.extend(cyc)
        retained_ptr.append(retained_ptr[-1] + len(kept))
        cycles_ptr.append(len(cycles_l))

    with tempfile.TemporaryDirectory() as tmp:
        base = write_cache(Path(tmp) / "cache", keys, responses)
        w_full = sc.learn_nex_weights(Path(tmp) / "cache")
        scores = sc.score_responses(Path(tmp) / "cache", w_full)
    weights = w_full[keys]
    assert not np.delete(w_full, keys).any()
    # The entry point accumulates all responses in one float32 array: same weights to rounding.
    summed = rc.neuron_weights(eff_all.sum(0), red_all.sum(0))
    assert np.allclose(summed, weights, rtol=1e-5, atol=1e-6), np.abs(summed - weights).max()

    row_ptr, row_cols, row_mass, row_tokens, resp_row_ptr = [0], [], [], [], [0]
    for rows, tokens in responses:
        for (cols, mass), t in zip(rows, tokens):
            row_cols.append(cols), row_mass.append(mass), row_tokens.append(int(t))
            row_ptr.append(row_ptr[-1] + cols.size)
        resp_row_ptr.append(len(row_tokens))
    cat = lambda xs, dt: (np.concatenate(xs) if xs else np.zeros(0)).astype(dt)  # noqa: E731
    np.savez_compressed(
        args.out,
        ref_commit=np.array(REF_COMMIT),
        versions=np.array(f"numpy {np.__version__}, scikit-learn {sklearn.__version__}, "
                          f"hmmlearn {hmmlearn.__version__}"),
        keys=keys,
        resp_row_ptr=np.asarray(resp_row_ptr, np.int64),
        row_ptr=np.asarray(row_ptr, np.int64),
        row_cols=cat(row_cols, np.int32),
        row_mass=cat(row_mass, np.float16),
        row_tokens=np.asarray(row_tokens, np.int64),
        base_mass=base,
        scored=scored,
        retained_ptr=np.asarray(retained_ptr, np.int64),
        retained=cat(retained_l, np.int64),
        slopes=cat(slopes_l, np.float32),
        z=cat(z_l, np.float64),
        labels=cat(labels_l, bool),
        raw_states=cat(raw_l, np.int64),
        means=means,
        variances=variances,
        cycles_ptr=np.asarray(cycles_ptr, np.int64),
        cycles=np.asarray(cycles_l, np.int64).reshape(-1, 4),
        effective=eff_all,
        redundant=red_all,
        weights=weights,
        scores=scores,
    )
    print(f"{args.out}: {n} responses, {len(row_tokens)} rows, {N} neurons, {len(cycles_l)} cycles, "
          f"{int((weights != 0).sum())} weighted neurons; scores {np.round(scores, 4)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
