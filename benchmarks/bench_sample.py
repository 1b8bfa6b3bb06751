"""Aggregate decode throughput of N samples of one prompt, side by side in one run:
neurotap's parallel engine with the tap off and with the tap on (bitset reducer),
llama-cpp-python generating the N answers one after another, and llama.cpp's own
`llama-batched-bench` (flash attention on, per-sequence KV streams), built from the source
vendored in the pinned llama-cpp-python sdist by benchmarks/build_batched_bench.sh.

Every sequence decodes exactly --tokens new tokens after a --prompt-token prompt (end of
generation banned), with temperature 0.6, top-p 0.95 and top-k 40 for every sampler. The two
neurotap variants run back to back for --rounds rounds: rates are medians, on/off is the median
of the per-round ratios.

    python benchmarks/bench_sample.py [--n 1,4,16,64] [--threads 2] [--tokens 128]
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import time
from pathlib import Path

import neurotap
from neurotap.apps.cli import model_arg, threads_arg
from neurotap.core.defaults import SAMPLE

ROOT = Path(__file__).resolve().parents[1]
TEXT = ("The lighthouse keeper climbed the spiral stairs every evening, counting each step, listening to the sea "
        "as the storm gathered over the northern cliffs and the fishing boats hurried home before dark. ") * 4
SAMPLING = dict(temperature=SAMPLE.temperature, top_p=SAMPLE.top_p, top_k=SAMPLE.top_k)  # the API's defaults


def prompt_ids(model, n_tokens):
    ids = model.tokenize(TEXT)
    assert len(ids) >= n_tokens, "the benchmark text is too short"
    return ids[:n_tokens]


def neurotap_rate(model, ids, n, tokens, tap):
    run = model.start_sampling(ids, n=n, max_tokens=tokens, seed=1, tap=tap, ignore_eos=True,
                               reducers=("active_sets",) if tap else (), **SAMPLING)
    run.advance()
    assert run.tokens_sampled == n * tokens, run.tokens_sampled
    # Throughput of the generation phase: every token after the first of each sequence comes
    # from a batched decode step (the first is sampled from the shared prompt).
    return n * (tokens - 1) / run.decode_seconds


def llama_cpp_python_rate(llm, ids, n, tokens):
    """What a user would otherwise write: the N answers one after another."""
    decode_time, count = 0.0, 0
    for i in range(n):
        llm.set_seed(i)
        stamps = []
        for _ in llm.generate(ids, temp=SAMPLING["temperature"], top_p=SAMPLING["top_p"], top_k=SAMPLING["top_k"],
                              min_p=0.0, repeat_penalty=1.0):
            stamps.append(time.perf_counter())
            if len(stamps) == tokens:
                break
        decode_time += stamps[-1] - stamps[0]
        count += len(stamps) - 1
    return count / decode_time


def batched_bench_rates(path, ns, prompt, tokens, threads):
    binary = subprocess.run(["bash", str(ROOT / "benchmarks" / "build_batched_bench.sh")], check=True,
                            capture_output=True, text=True).stdout.strip().splitlines()[-1]
    ctx = max(ns) * ((prompt + tokens + 255) // 256 * 256)
    cmd = [binary, "-m", path, "-c", str(ctx), "-b", "2048", "-ub", "512", "-npp", str(prompt), "-ntg", str(tokens),
           "-npl", ",".join(map(str, ns)), "-fa", "on", "-t", str(threads), "-tb", str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    rates = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 8 and re.fullmatch(r"\d+", cells[0] or "x") and re.fullmatch(r"\d+", cells[2]):
            rates[int(cells[2])] = float(cells[7])  # S_TG t/s
    return rates, " ".join(cmd[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_arg(ap)
    ap.add_argument("--n", default="1,4,16,64")
    threads_arg(ap, neurotap.runtime.model.default_threads())
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-llama-bench", action="store_true", help="skip llama-batched-bench (no build)")
    ap.add_argument("--json")
    a = ap.parse_args()
    ns = [int(x) for x in a.n.split(",")]

    import llama_cpp

    path = str(neurotap.resolve(a.model))
    model = neurotap.load(path, n_threads=a.threads, max_sample_cells=max(ns) * 1024)
    llm = llama_cpp.Llama(path, n_ctx=1024, n_threads=a.threads, n_threads_batch=a.threads, flash_attn=True,
                          verbose=False)
    ids = prompt_ids(model, a.prompt_tokens)
    neurotap_rate(model, ids, 2, 8, True)  # warm-up

    rows, on_off = {}, {}
    for n in ns:
        off, on = [], []
        for _ in range(a.rounds):
            off.append(neurotap_rate(model, ids, n, a.tokens, False))
            on.append(neurotap_rate(model, ids, n, a.tokens, True))
        on_off[n] = statistics.median(x / y for x, y in zip(on, off))
        rows[n] = {
            "neurotap tap off": statistics.median(off),
            "neurotap tap on (active sets)": statistics.median(on),
            "llama-cpp-python sequential": llama_cpp_python_rate(llm, ids, n, a.tokens),
        }
    cmd = None
    if not a.no_llama_bench:
        bench, cmd = batched_bench_rates(path, ns, a.prompt_tokens, a.tokens, a.threads)
        for n in ns:
            rows[n]["llama-batched-bench"] = bench.get(n, float("nan"))

    print(f"model {a.model}, threads {a.threads}, prompt {a.prompt_tokens} tokens, {a.tokens} new tokens per "
          f"sequence, aggregate decode tokens/s")
    cols = list(rows[ns[0]])
    print(f"{'n':>3s} " + " ".join(f"{c:>28s}" for c in cols) + f" {'off/llama.cpp':>13s} {'on/off':>7s} {'off/seq':>8s}")
    for n in ns:
        r = rows[n]
        ratio_llama = r["neurotap tap off"] / r["llama-batched-bench"] if "llama-batched-bench" in r else float("nan")
        print(f"{n:3d} " + " ".join(f"{r[c]:28.1f}" for c in cols) +
              f" {ratio_llama:13.2f} {on_off[n]:7.2f}"
              f" {r['neurotap tap off'] / r['llama-cpp-python sequential']:8.2f}")
    if cmd:
        print(f"llama-batched-bench {cmd}")
    if a.json:
        Path(a.json).write_text(json.dumps({str(k): v for k, v in rows.items()}, indent=1))


if __name__ == "__main__":
    main()
