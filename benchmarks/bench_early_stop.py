"""NAD early stopping at reasoning length, side by side in one run: the wall time of
`nad.best_of_n(n=16, early_stop=32, max_tokens=T)` (16 answers raced for 32 tokens, the pick
continued alone with the tap off in a context of its own) against one plain generation of the same
length (one sample, tap off), same prompt, end of generation banned so both write T tokens.
Rounds alternate the order; the ratio is the median of per-round ratios. Target (issue 16):
at most 1.15x at the 1B and 4B shapes with 4,096-token answers.

With --race-only N: the KV plan of best_of_n(n=N, early_stop=32, max_tokens=T) at reasoning
length, run for real up to the handoff and --tail tokens of the winner: the cells of the race
context (N x (prompt + 33), each padded to 256) and of the winner's (prompt + T, padded), and the
time per token of both phases.

    python benchmarks/make_shapes.py --shape 1b
    python benchmarks/bench_early_stop.py --models build/shapes/llama-1b-q4_0.gguf --tokens 4096 --rounds 2
    python benchmarks/bench_early_stop.py --models build/shapes/llama-1b-q4_0.gguf --race-only 64 --tokens 16384 --tail 256

With --best-only: one best_of_n run alone (no plain generation), reporting its wall time and the
process's peak memory: peak resident set (VmHWM: weights read through mmap included) and peak
private memory (RssAnon: KV cells, compute buffers, records, contribution state). This is the
"16 GB laptop" check: best_of_n(n=16, early_stop=32, max_tokens=8192) at the 8B shape.

    python benchmarks/bench_early_stop.py --models build/shapes/llama-8b-q4_0.gguf --best-only --tokens 8192
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import neurotap
from common import PeakAnon, status_mb
from neurotap import nad
from neurotap.apps.cli import nad_args, threads_arg
from neurotap.methods.race import NadRace

PROMPT = [{"role": "user", "content": "Tom has 23 apples and buys 45 more. How many apples does Tom have now? "
                                      "Think it through carefully."}]


def plain(model, tokens: int) -> float:
    t0 = time.perf_counter()
    with model.start_sampling(PROMPT, n=1, max_tokens=tokens, seed=7, reducers=(), tap=False, ignore_eos=True) as run:
        run.advance()
        assert run.tokens_sampled == tokens
    return time.perf_counter() - t0


def best_of(model, n: int, early: int, tokens: int) -> float:
    t0 = time.perf_counter()
    r = nad.best_of_n(model, PROMPT, n=n, early_stop=early, max_tokens=tokens, seed=7, ignore_eos=True)
    assert r.sample.n_tokens == tokens, r.sample.n_tokens
    return time.perf_counter() - t0


def best_only(model, n: int, early: int, tokens: int) -> None:
    with PeakAnon() as p:
        t0 = time.perf_counter()
        r = nad.best_of_n(model, PROMPT, n=n, early_stop=early, max_tokens=tokens, seed=7, ignore_eos=True)
        wall = time.perf_counter() - t0
    assert r.sample.n_tokens == tokens, r.sample.n_tokens
    print(f"| {Path(model.info.path).name} | {model.info.size_bytes / 2**30:.2f} GiB | n={n} early_stop={early} | "
          f"{tokens} | {wall:.0f} s ({wall / tokens * 1e3:.0f} ms/token) | {status_mb('VmHWM') / 1024:.2f} GiB | "
          f"{p.peak / 1024:.2f} GiB |", flush=True)


def race_only(model, n: int, early: int, tokens: int, tail: int) -> None:
    kvb = model.info.kv_bytes_per_cell
    n_prompt = len(model.prompt_tokens(PROMPT))
    t0 = time.perf_counter()
    with NadRace(model, PROMPT, n=n, early_stop=early, max_tokens=tokens, seed=7, chunk=early,
                 ignore_eos=True) as race:
        race_cells = model.memory()["kv"] // kvb
        race.advance()
        pick = race.select("knn", k=3)
        t_race = time.perf_counter() - t0
        race.keep([pick])
        tail_cells = model.memory()["kv"] // kvb
        kv_bytes = (n_prompt + early) * kvb  # the handed-off sequence's cells
        t1 = time.perf_counter()
        race.advance(early + tail)
        t_tail = time.perf_counter() - t1
        kept = race.sample(pick).n_tokens
    ideal = n_prompt + n * early + tokens
    print(f"{Path(model.info.path).name}: n={n} early_stop={early} max_tokens={tokens} prompt={n_prompt}")
    print(f"  race: {race_cells} KV cells ({race_cells * kvb / 2**20:.0f} MiB), {n} x {early} tokens in {t_race:.1f} s "
          f"(contributions on), pick {pick}")
    print(f"  winner: a context of {tail_cells} cells ({tail_cells * kvb / 2**20:.0f} MiB) for prompt + {tokens}; "
          f"{kept - early} tokens in {t_tail:.1f} s ({t_tail / max(kept - early, 1) * 1e3:.1f} ms/token at the start)")
    print(f"  peak KV: {max(race_cells, tail_cells)} cells (the race's context is freed before the winner's is "
          f"made; the winner's state, {kv_bytes / 2**20:.1f} MiB, goes over in memory); prompt + n x B + T = {ideal}; "
          f"unpruned best-of-{n}: {n} x (prompt + {tokens}) = "
          f"{n * (n_prompt + tokens)} cells ({n * (n_prompt + tokens) * kvb / 2**30:.1f} GiB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", required=True)
    nad_args(ap, n=16, early_stop=32)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=2)
    threads_arg(ap, 2)
    ap.add_argument("--race-only", type=int, default=0, metavar="N")
    ap.add_argument("--tail", type=int, default=256)
    ap.add_argument("--best-only", action="store_true")
    args = ap.parse_args()
    for path in args.models:
        n_ctx = args.tokens + 512  # the per-sequence bound runs are checked against (their contexts are the pool's)
        with neurotap.load(path, n_threads=args.threads, n_ctx=n_ctx, max_sample_cells=1 << 20) as model:
            if args.best_only:
                print("| model | weights | run | tokens | wall time | peak resident (VmHWM) | peak private (RssAnon) |")
                best_only(model, args.n, args.early_stop, args.tokens)
                continue
            if args.race_only:
                race_only(model, args.race_only, args.early_stop, args.tokens, args.tail)
                continue
            ratios, times = [], []
            for r in range(args.rounds):
                if r % 2 == 0:
                    a = plain(model, args.tokens)
                    b = best_of(model, args.n, args.early_stop, args.tokens)
                else:
                    b = best_of(model, args.n, args.early_stop, args.tokens)
                    a = plain(model, args.tokens)
                ratios.append(b / a)
                times.append((a, b))
                print(f"  round {r}: plain {a:.1f} s, best-of-{args.n}@{args.early_stop} {b:.1f} s, ratio {b / a:.3f}",
                      flush=True)
            print(f"| {Path(path).name} | {args.tokens} | {statistics.median(t[0] for t in times):.1f} | "
                  f"{statistics.median(t[1] for t in times):.1f} | {statistics.median(ratios):.3f} |")


if __name__ == "__main__":
    main()
