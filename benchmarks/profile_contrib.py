"""CPU cost of NAD contributions on one model, for profiling: teacher-forced runs as bench_scale.py's `measure`.

One process loads the model once, then makes one run per variant named (off, on, contributions;
each n samples teacher-forced with the same real text, `tokens` tokens) and prints, per run, the
wall decode time, the process's CPU time (user + system, all threads, from getrusage) and its minor
page faults (each a zeroed page of fresh memory) around it.
CPU time counts only while the process runs, so on a shared machine it moves far less than wall
time does; run it under `perf record -g` for where that time goes. Set OMP_WAIT_POLICY=PASSIVE, or
OpenMP's spinning threads count as CPU time.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/profile_contrib.py build/shapes/olmoe-1b-7b-q4_k.gguf \\
        --variants off,contributions --n 16 --tokens 32 --streams /tmp/real16x32.json

The real text (n answers of the default model to bench_scale.py's prompt) is written to --streams
on first use and read from it afterwards, so every run of this script forces the same tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_scale import PROMPT, VARIANTS, real_streams  # noqa: E402


def usage() -> tuple:
    """CPU seconds (user + system, all threads) and minor page faults of this process so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime, r.ru_minflt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--variants", default="off,contributions")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--streams", default="/tmp/neurotap-real-streams.json")
    a = ap.parse_args()
    if os.path.exists(a.streams):
        streams = json.load(open(a.streams))
    else:
        streams = real_streams(a.n, a.tokens, a.threads)
        with open(a.streams, "w") as f:
            json.dump(streams, f)
    if len(streams) < a.n or any(len(s) < a.tokens for s in streams):
        raise SystemExit(f"{a.streams} holds fewer than {a.n} streams of {a.tokens} tokens")
    import neurotap

    m = neurotap.load(a.model, n_threads=a.threads, n_ctx=max(512, a.tokens + 128), max_sample_cells=1 << 20)
    m.sample(PROMPT, n=2, max_tokens=4, reducers=("contributions",))  # warm-up: maps W_down once
    for _ in range(a.rounds):
        for name in a.variants.split(","):
            kw = dict(VARIANTS[name], forced=streams[:a.n])
            (c0, f0), t0 = usage(), time.perf_counter()
            run = m.start_sampling(PROMPT, n=a.n, max_tokens=a.tokens, seed=1, ignore_eos=True, **kw)
            run.advance()
            (c1, f1), wall = usage(), time.perf_counter() - t0
            out = {"variant": name, "decode_s": round(run.decode_seconds, 3), "wall_s": round(wall, 3),
                   "cpu_s": round(c1 - c0, 3), "minor_faults": f1 - f0}
            if name == "contributions":
                out.update({k: (round(v, 3) if isinstance(v, float) else v) for k, v in run.contribution_stats.items()})
            print(json.dumps(out), flush=True)
            run.close()


if __name__ == "__main__":
    main()
