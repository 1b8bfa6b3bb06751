"""Decode speed of the tap, side by side in one run: llama-cpp-python alone, neurotap with
the tap off, and neurotap with the tap on (active counts; and with float16 capture).

Same model, prompt, threads, greedy decoding and flash attention for all; the variants are
interleaved round by round so machine noise hits them alike. Rates are the median over rounds;
ratios are the median of the per-round ratios (each round's variants ran back to back).

    python benchmarks/bench_generate.py [--model NAME|PATH] [--threads 2] [--tokens 128] [--rounds 5]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import llama_cpp

import neurotap
from neurotap.apps.cli import model_arg, threads_arg

PROMPT = [{"role": "user", "content": "Write a long, detailed story about a lighthouse keeper and a storm."}]


def llama_cpp_python(llm, ids, n):
    """Decode tokens/s as a llama-cpp-python user gets it: first to last yielded token."""
    stamps = []
    for tok in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
        stamps.append(time.perf_counter())
        if len(stamps) == n:
            break
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), len(stamps)


def neurotap_rate(model, ids, n, **kw):
    g = model.generate(ids, max_tokens=n, temperature=0, **kw)
    return g.tokens_per_second, g.n_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_arg(ap)
    threads_arg(ap, neurotap.runtime.model.default_threads())
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()

    path = str(neurotap.resolve(a.model))
    llm = llama_cpp.Llama(path, n_ctx=1024, n_threads=a.threads, n_threads_batch=a.threads, flash_attn=True,
                          verbose=False)
    model = neurotap.load(path, n_ctx=1024, n_threads=a.threads, flash_attn=True)
    ids = model.prompt_tokens(PROMPT)
    variants = {
        "llama-cpp-python": lambda: llama_cpp_python(llm, ids, a.tokens),
        "neurotap tap off": lambda: neurotap_rate(model, ids, a.tokens, tap=False),
        "neurotap tap on": lambda: neurotap_rate(model, ids, a.tokens),
        "neurotap tap on + f16 capture": lambda: neurotap_rate(model, ids, a.tokens, capture="float16"),
    }
    for fn in variants.values():  # warm-up: page in weights, build graphs
        fn()
    rates = {k: [] for k in variants}
    counts = {}
    for _ in range(a.rounds):
        for k, fn in variants.items():
            r, n = fn()
            rates[k].append(r)
            counts[k] = n
    med = {k: statistics.median(v) for k, v in rates.items()}

    print(f"model {a.model} ({model.info.architecture}, {model.info.n_layers} layers), threads {a.threads}, "
          f"prompt {len(ids)} tokens, {a.tokens} new tokens, greedy, flash attention, median of {a.rounds} rounds")
    print(f"{'variant':32s} {'tokens':>6s} {'decode tok/s':>12s}")
    for k in variants:
        print(f"{k:32s} {counts[k]:6d} {med[k]:12.1f}")
    def paired(num, den):
        return statistics.median(a / b for a, b in zip(rates[num], rates[den]))

    ratios = {
        "tap off / llama-cpp-python": paired("neurotap tap off", "llama-cpp-python"),
        "tap on / tap off": paired("neurotap tap on", "neurotap tap off"),
        "tap on + f16 capture / tap off": paired("neurotap tap on + f16 capture", "neurotap tap off"),
    }
    targets = {"tap off / llama-cpp-python": 0.95, "tap on / tap off": 0.95}
    for k, v in ratios.items():
        t = targets.get(k)
        verdict = "" if t is None else f"  (target >= {t:.2f}: {'met' if v >= t else 'MISSED'})"
        print(f"{k:32s} {v:6.3f}{verdict}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"median_tok_s": med, "rounds": rates, "ratios": ratios, "threads": a.threads}, f, indent=1)


if __name__ == "__main__":
    main()
