"""Do runs decoded together in one batch (the server's continuous batching) equal the same runs
decoded alone? Not a timing: a check of bits, on any model.

Four single-sample runs (different prompts and seeds, temperature 0.8, 24 tokens) are decoded
alone, one after another, then together as members of one runtime.batch.Batch (each on its own
sequence slot, sharing every decode step), and their tokens and per-token log-probabilities
are compared. llama.cpp's value for a row can depend on how many rows its batch holds (the
kernel classes in docs/server.md#prompt-reuse): on a file whose matmuls llama.cpp repacks for
the CPU (Q4_0, Q4_K, IQ4_NL), a row decoded with 3 others takes other kernels than a row alone.

    .venv/bin/python benchmarks/batch_equality.py smollm2-135m gemma3-270m
"""
from __future__ import annotations

import argparse
import os

import neurotap
from neurotap.runtime.batch import Batch
from neurotap.runtime.sampling import sample_from

PROMPTS = ["Name three colors.", "Write a haiku about rain.", "What is 2+2?", "List two animals."]
TOKENS = 24
SAMPLING = dict(temperature=0.8, top_p=0.95, top_k=40, min_p=0.05, max_tokens=TOKENS, reducers=(), tap=False,
                logprobs=1)


def check(name: str, threads: int) -> None:
    with neurotap.load(name, n_ctx=1024, n_threads=threads) as m:
        alone = []
        for i, p in enumerate(PROMPTS):
            with m.start_sampling(m.prompt_tokens(p), n=1, seed=i, **SAMPLING) as run:
                run.advance()
                alone.append(run.sample(0))
        batch = Batch(m, len(PROMPTS))
        runs = []
        for i, p in enumerate(PROMPTS):
            opts = m.sampling_options(n=1, seed=i, **SAMPLING)
            opts.seqs = [i]
            runs.append(batch.start(m.prompt_tokens(p), opts, TOKENS))
        members = list(runs)
        while members:
            for r in [r for r in members if not r.n_live]:
                batch.remove(r)
                members.remove(r)
            if members:
                batch.run()
        print(f"{name} ({os.path.basename(m.info.path)}):")
        equal = 0
        for i, r in enumerate(runs):
            s, a = sample_from(r.sample(0), TOKENS), alone[i]
            diverge = next((j for j, (x, y) in enumerate(zip(s.tokens, a.tokens)) if x != y), None)
            same_len = min(len(s.tokens), len(a.tokens)) if diverge is None else diverge
            dlp = max((abs(x - y) for x, y in zip(s.token_logprob[:same_len], a.token_logprob[:same_len])), default=0.0)
            bits = s.tokens == a.tokens and list(s.token_logprob) == list(a.token_logprob)
            equal += bits
            print(f"  run {i}: {'bit-equal' if bits else 'differs'}; tokens diverge at "
                  f"{'-' if diverge is None else diverge}; largest log-probability difference before: {dlp:.3g}")
        print(f"  {equal} of {len(runs)} runs decoded together equal the same runs alone, bit for bit")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    for name in a.models:
        check(name, a.threads)


if __name__ == "__main__":
    main()
