"""Soak: one process generating and sampling for a while under a mix of good and bad requests.

Every request is drawn from a fixed mix (greedy and sampled generation, parallel sampling with
each reducer, NAD best-of-N with early stopping, NEAT, and bad requests that must raise a clear
exception: prompts beyond the context, impossible parameters, unknown hooks, runs reused after
they ended). Each minute it prints resident memory, requests and tokens per second, and errors
by kind; an unexpected exception type, a crash or memory growth is what this looks for.

    .venv/bin/python benchmarks/soak.py --minutes 10 --threads 2 --out benchmarks/results/soak.json
"""
from __future__ import annotations

import argparse
import json
import os
import random
import time
from collections import Counter

import neurotap
from neurotap import nad, neat
from neurotap.apps.cli import threads_arg
from neurotap.core.io import write_atomic


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


PROMPTS = ["What is 17 + 25?", "Name three colors.", "Write one sentence about the sea.", "List two fruits."]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10)
    threads_arg(ap, 2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON with the per-minute rows")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    model = neurotap.load(n_threads=a.threads, n_ctx=512)
    cal = neat.load_calibration("default", model)
    chat = lambda: [{"role": "user", "content": rng.choice(PROMPTS)}]  # noqa: E731

    def finished_run_reused():
        run = model.start_sampling(chat(), n=2, max_tokens=4)
        run.advance()
        return run.advance()  # must be 0, not a second give-back of its context

    good = {
        "generate greedy": lambda: model.generate(chat(), max_tokens=48, temperature=0).n_tokens,
        "generate sampled": lambda: model.generate(chat(), max_tokens=48, seed=rng.randrange(1 << 30)).n_tokens,
        "generate neat": lambda: model.generate(chat(), max_tokens=48, temperature=0, neat=cal).n_tokens,
        "sample counts+sets": lambda: sum(s.n_tokens for s in model.sample(chat(), n=8, max_tokens=48,
                                                                           seed=rng.randrange(1 << 30))),
        "sample contributions": lambda: sum(s.n_tokens for s in model.sample(
            chat(), n=8, max_tokens=48, reducers=("contributions",), seed=rng.randrange(1 << 30))),
        "best_of_n early": lambda: nad.best_of_n(model, chat(), n=8, early_stop=16, max_tokens=48,
                                                 seed=rng.randrange(1 << 30)).tokens_generated,
        "trace hooks": lambda: model.trace(chat(), [1, 2, 3], hooks=["hook_resid_post"]).n_tokens,
        "finished run reused": finished_run_reused,
    }
    bad = {
        "prompt beyond context": (neurotap.ContextError, lambda: model.generate("word " * 700, max_tokens=8)),
        "sample beyond context": (neurotap.ContextError, lambda: model.sample("word " * 700, n=2, max_tokens=8)),
        "bad top_p": (ValueError, lambda: model.generate("Hi", max_tokens=4, temperature=0.5, top_p=0.0)),
        "huge max_tokens": (ValueError, lambda: model.generate("Hi", max_tokens=2**40)),
        "unknown hook": (ValueError, lambda: model.generate("Hi", max_tokens=2, hooks=["attn.hook_z"])),
        "token id out of range": (ValueError, lambda: model.generate([10**9], max_tokens=2)),
        "unknown method": (ValueError, lambda: nad.best_of_n(model, "Hi", n=4, method="nope")),
    }
    kinds = list(good) * 3 + list(bad)  # three good requests for each bad one
    rows, start = [], time.perf_counter()
    t_min, requests, tokens, outcomes = start, 0, 0, Counter()
    print(f"{'minute':>6} {'rss MB':>8} {'req/s':>6} {'tok/s':>7}  outcomes")
    while time.perf_counter() - start < a.minutes * 60:
        kind = rng.choice(kinds)
        try:
            if kind in good:
                tokens += int(good[kind]())
                outcomes["ok"] += 1
            else:
                want, fn = bad[kind]
                try:
                    fn()
                    outcomes[f"NOT REFUSED: {kind}"] += 1
                except want:
                    outcomes["refused as expected"] += 1
        except Exception as e:  # anything else is a finding
            outcomes[f"UNEXPECTED {type(e).__name__} in {kind}: {e}"[:160]] += 1
        requests += 1
        now = time.perf_counter()
        if now - t_min >= 60 or now - start >= a.minutes * 60:
            row = {"minute": len(rows) + 1, "rss_mb": round(rss_mb(), 1), "requests_per_s": round(requests / (now - t_min), 2),
                   "tokens_per_s": round(tokens / (now - t_min), 1), "outcomes": dict(outcomes)}
            rows.append(row)
            print(f"{row['minute']:>6} {row['rss_mb']:>8} {row['requests_per_s']:>6} {row['tokens_per_s']:>7}  "
                  + ", ".join(f"{k}: {v}" for k, v in outcomes.items()), flush=True)
            t_min, requests, tokens, outcomes = now, 0, 0, Counter()
    unexpected = sum(v for r in rows for k, v in r["outcomes"].items() if k.startswith(("UNEXPECTED", "NOT")))
    growth = rows[-1]["rss_mb"] - rows[0]["rss_mb"] if rows else 0.0
    print(f"rss growth from minute 1 to {len(rows)}: {growth:+.1f} MB | unexpected outcomes: {unexpected}")
    if a.out:
        write_atomic(a.out, json.dumps({"threads": a.threads, "minutes": a.minutes, "rows": rows,
                                        "rss_growth_mb": growth, "unexpected": unexpected}, indent=1).encode())


if __name__ == "__main__":
    main()
