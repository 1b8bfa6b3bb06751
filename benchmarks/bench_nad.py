"""NAD costs, side by side in one run:

1. Time per token of parallel sampling with the contribution reducer (exact NAD contributions,
   activated sets per 32-token chunk) against the tap off, same prompt, same seeds, fixed length
   (end of generation banned). Rounds alternate the variants; ratios are medians of per-round ratios.
   Target (issue 4): contributions / tap off <= 1.10 at n = 16.
2. Tokens of an early-stopped NAD run (decide after --early-stop tokens, continue the pick) against
   full best-of-N, on arith tasks with the default prompt, counted exactly by the sampler.

    python benchmarks/bench_nad.py [--n 16] [--threads 2] [--tokens 96] [--rounds 3] [--tasks 5]
"""
from __future__ import annotations

import argparse
import statistics

import neurotap
from neurotap import nad
from neurotap.apps.cli import nad_args, threads_arg
from neurotap.scoring.tasks import arith, format_prompt

TEXT = [{"role": "user", "content": "Tom has 23 apples and buys 45 more. How many apples does Tom have now?"}]


def per_token(model, n, tokens, **kw):
    run = model.start_sampling(TEXT, n=n, max_tokens=tokens, seed=1, ignore_eos=True, **kw)
    run.advance()
    assert run.tokens_sampled == n * tokens
    return run.decode_seconds / (n * (tokens - 1)), run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    nad_args(ap, n=16, early_stop=32)
    threads_arg(ap, 2)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tasks", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=256)
    args = ap.parse_args()
    model = neurotap.load(n_threads=args.threads)
    per_token(model, 2, 8, reducers=("contributions",))  # warm-up: reads W_down once

    variants = {"tap off": dict(tap=False, reducers=()), "active sets (act > 0)": dict(reducers=("active_sets",)),
                "contributions": dict(reducers=("contributions",)),
                "contributions, gate variant": dict(reducers=("contributions",), contribution="gate")}
    times = {k: [] for k in variants}
    shares, hits = [], []
    for _ in range(args.rounds):
        for name, kw in variants.items():
            t, run = per_token(model, args.n, args.tokens, **kw)
            times[name].append(t)
            if name == "contributions":
                st = run.contribution_stats
                shares.append(st["seconds"] / run.decode_seconds)
                h, m = st["cache_hits"], st["cache_misses"]
                hits.append(h / max(h + m, 1))
    print(f"## contribution cost: n={args.n}, {args.tokens} tokens per sample, {args.threads} threads, "
          f"{args.rounds} rounds")
    print("| variant | ms per token (median) | / tap off (median of per-round ratios) | ratio of medians |\n|---|---|---|---|")
    off = statistics.median(times["tap off"])
    for name in variants:
        ratio = statistics.median(a / b for a, b in zip(times[name], times["tap off"]))
        med = statistics.median(times[name])
        print(f"| {name} | {1000 * med:.2f} | {ratio:.2f} | {med / off:.2f} |")
    print(f"contribution pass share of decode time (median): {statistics.median(shares):.1%}; "
          f"token ids served from the projection cache: {statistics.median(hits):.1%}")

    if args.tasks == 0:
        return
    print(f"\n## tokens: early-stopped NAD (knn @ {args.early_stop}) against full best-of-{args.n}, "
          f"{args.tasks} arith tasks, max {args.max_tokens} tokens")
    print("| task | full best-of-N tokens | early-stopped tokens | ratio |\n|---|---|---|---|")
    tot_full = tot_es = 0
    for t in arith(args.tasks, 0):
        prompt = [{"role": "user", "content": format_prompt(t)}]
        full = model.start_sampling(prompt, n=args.n, max_tokens=args.max_tokens, seed=3, reducers=())
        full.advance()
        es = nad.best_of_n(model, prompt, n=args.n, method="knn", early_stop=args.early_stop,
                           max_tokens=args.max_tokens, seed=3)
        tot_full += full.tokens_sampled
        tot_es += es.tokens_generated
        print(f"| {t.id} | {full.tokens_sampled} | {es.tokens_generated} | {es.tokens_generated / full.tokens_sampled:.2f} |")
    print(f"| all | {tot_full} | {tot_es} | {tot_es / tot_full:.2f} |")


if __name__ == "__main__":
    main()
