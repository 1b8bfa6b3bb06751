"""Bytes of per-sample set records per 1,000 tokens at each shape: dense bitsets against ChunkSets.

For each model (the default one and GGUFs at 1B/4B/8B shapes from benchmarks/make_shapes.py), in
one process per model: one parallel run of n samples x `tokens` tokens (end of generation banned,
so every sample has that length) keeping NAD's activated sets ("contributions") and the active
sets (activation > 0) in 32-token chunks. Per record kind: the mean neurons per chunk (and how
many of them no earlier chunk of the sample held), the bytes the dense form took (one bitset of
n_layers x n_ff bits per chunk, what records held before) and the bytes of the compact record
(ChunkSets.nbytes: its encoded chunks and per-chunk offsets and counts), both per 1,000 tokens
per sample (mean over the samples). A record's size per token falls with the sample's length
(later chunks repeat more of the earlier ones), so compare figures at the same --tokens.

    .venv/bin/python benchmarks/bench_records.py --models smollm2-135m build/shapes/llama-1b-q4_0.gguf \\
        build/shapes/llama-4b-q4_0.gguf build/shapes/llama-8b-q4_0.gguf --n 2 --tokens 1024 --threads 2
"""
from __future__ import annotations

import argparse
import json
import os
import time

from neurotap.apps.cli import threads_arg
from common import rows_per_model, save_rows

KINDS = {"contribution_sets": "NAD activated sets", "active_sets": "active sets (act > 0)"}


def measure(model_name: str, n: int, tokens: int, threads: int, chunk: int) -> dict:
    import numpy as np

    import neurotap

    m = neurotap.load(model_name, n_threads=threads, n_ctx=max(512, tokens + 64), max_sample_cells=1 << 20)
    prompt = "Tell me about the history of the sea and the ships that sailed it."
    t0 = time.perf_counter()
    run = m.start_sampling(prompt, n=n, max_tokens=tokens, seed=1, ignore_eos=True, chunk=chunk,
                           reducers=("contributions", "active_sets"))
    run.advance()
    samples = run.samples()
    out = {"model": model_name, "neurons": m.info.n_layers * m.info.n_ff, "n": n, "tokens": tokens, "chunk": chunk,
           "seconds": round(time.perf_counter() - t0, 1), "kinds": {}}
    for kind in KINDS:
        per_k = 1000 / tokens
        rows = []
        for s in samples:
            sets = getattr(s, kind)
            fresh = sets.state()[4]
            rows.append((sets.counts.mean(), fresh.mean(), len(sets) * sets.n_words * 8 * per_k, sets.nbytes * per_k))
        keys, fresh, dense, compact = (float(np.mean(col)) for col in zip(*rows))
        out["kinds"][kind] = {"keys_per_chunk": round(keys), "new_keys_per_chunk": round(fresh),
                              "dense_bytes_per_1k_tokens": round(dense), "compact_bytes_per_1k_tokens": round(compact),
                              "ratio": round(compact / dense, 4)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m"])
    ap.add_argument("--n", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=32)
    threads_arg(ap, 2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child: measure one model, print JSON
    a = ap.parse_args()
    if a.one:
        print(json.dumps(measure(a.one, a.n, a.tokens, a.threads, a.chunk)))
        return
    rows = []
    print("| model | neurons | records | neurons per chunk (new) | dense KB / 1k tokens | compact KB / 1k tokens | ratio |")
    print("|---|---|---|---|---|---|---|")
    for model, row in zip(a.models, rows_per_model(__file__, a.models, ["--n", str(a.n), "--tokens", str(a.tokens),
                                                                        "--chunk", str(a.chunk), "--threads", str(a.threads)])):
        rows.append(row)
        for kind, v in row["kinds"].items():
            print(f"| {os.path.basename(model)} | {row['neurons']} | {KINDS[kind]} | {v['keys_per_chunk']} "
                  f"({v['new_keys_per_chunk']}) | {v['dense_bytes_per_1k_tokens'] / 1000:.1f} | "
                  f"{v['compact_bytes_per_1k_tokens'] / 1000:.1f} | {v['ratio']:.3f} |", flush=True)
    if a.out:
        save_rows(a.out, rows)


if __name__ == "__main__":
    main()
