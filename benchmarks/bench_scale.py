"""NAD contributions at the shapes users run: decode speed and memory of the tap off, the tap on and the contribution reducer.

For each model (the default one and GGUFs at 1B/4B/8B shapes from benchmarks/make_shapes.py), in
one process per model: parallel sampling runs of n samples, every run the same length, with the tap
off, the tap on (the active-set reducer) and the contribution reducer (NAD's exact sets), the
variants' order rotating round by round.

Text: --text random samples from the model (end of generation banned; the random-weight shapes
repeat a few tokens, so the projection cache serves 92-98% of them at n >= 16, and memory is
measured on this text, where the cache fills); --text real teacher-forces each sample
with one of n real answers of the default model (SmolLM2-135M-Instruct, the same tokenizer as the
shapes) to the same prompt, sampled once in a process of their own: real text at every shape;
--text distinct teacher-forces streams of distinct random token ids (no id twice in a run: every
token misses the projection cache, the worst case).

Speed: median of per-round ratios of decode time per token. Memory, measured apart in a fresh
process per variant and n (what an allocator kept from an earlier run would hide a later run's
growth): the peak of the process's anonymous resident memory (RssAnon: private memory; the model
file's pages, read through mmap and shared with the page cache, do not count) while it loads the
model and makes one run, minus the same peak with the tap off (and with the tap on), and the peak
resident set (VmRSS, mapped weights included); on random text, where the projection cache fills most.

    .venv/bin/python benchmarks/bench_scale.py --models smollm2-135m build/shapes/llama-1b-q4_0.gguf \\
        --n 1,16,64 --tokens 32 --rounds 2 --text random,real --threads 2
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile

from neurotap.apps.cli import threads_arg
from common import PeakAnon, rows_per_model, save_rows

PROMPT = [{"role": "user", "content": "Tom has 23 apples and buys 45 more, then gives away 17. How many apples "
                                      "does Tom have now? Think it through step by step."}]
VARIANTS = {"off": dict(tap=False, reducers=()), "on": dict(reducers=("active_sets",)),
            "contributions": dict(reducers=("contributions",))}


def real_streams(n: int, tokens: int, threads: int) -> list:
    """n answers of the default model to PROMPT (temperature 0.6, end of generation banned so each
    has `tokens` tokens), as token ids."""
    import neurotap

    with neurotap.load("smollm2-135m", n_threads=threads, n_ctx=max(512, tokens + 128)) as m:
        return [s.tokens for s in m.sample(PROMPT, n=n, max_tokens=tokens, seed=11, ignore_eos=True, reducers=())]


def measure(model_name: str, ns, tokens: int, rounds: int, threads: int, streams: list | None, text: str) -> dict:
    import neurotap

    m = neurotap.load(model_name, n_threads=threads, n_ctx=max(512, tokens + 128), max_sample_cells=1 << 20)
    out = {"model": model_name, "file_gib": round(os.path.getsize(m.info.path) / 2**30, 3),
           "n_layers": m.info.n_layers, "n_ff": m.info.n_ff, "n_embd": m.info.n_embd,
           "text": text, "by_n": {}}
    m.sample(PROMPT, n=2, max_tokens=4, reducers=("contributions",))  # warm-up: maps W_down once
    names = list(VARIANTS)
    for n in ns:
        times = {k: [] for k in names}
        hits = []
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                kw = dict(VARIANTS[name])
                if streams:
                    kw["forced"] = streams[:n]
                run = m.start_sampling(PROMPT, n=n, max_tokens=tokens, seed=1, ignore_eos=True, **kw)
                run.advance()
                times[name].append(run.decode_seconds / (n * (tokens - 1)))
                if name == "contributions":
                    st = run.contribution_stats
                    hits.append(st["cache_hits"] / max(st["cache_hits"] + st["cache_misses"], 1))
                run.close()
        med = {k: statistics.median(v) for k, v in times.items()}
        ratio = {k: statistics.median(a / o for a, o in zip(times[k], times["off"])) for k in ("on", "contributions")}
        out["by_n"][n] = {**{f"ms_per_token_{k}": round(1e3 * v, 3) for k, v in med.items()},
                          **{f"tokens_per_s_{k}": round(1 / v, 1) for k, v in med.items()},
                          "ratio_on": round(ratio["on"], 3), "ratio_contributions": round(ratio["contributions"], 3),
                          "cache_hit_rate": round(statistics.median(hits), 3)}
    return out


def peak_memory(model_name: str, variant: str, n: int, tokens: int, threads: int, streams: list | None) -> dict:
    """Peak private and resident memory (MiB) of this process loading the model and making one run."""
    import neurotap

    with PeakAnon() as p:
        m = neurotap.load(model_name, n_threads=threads, n_ctx=max(512, tokens + 128), max_sample_cells=1 << 20)
        kw = dict(VARIANTS[variant], forced=streams[:n]) if streams else dict(VARIANTS[variant])
        m.sample(PROMPT, n=n, max_tokens=tokens, seed=1, ignore_eos=True, **kw)
    return {"peak_private_mb": p.peak, "peak_rss_mb": p.peak_rss}


def add_memory(row: dict, model: str, ns, child_args: list) -> None:
    """Fills each n's memory figures from fresh processes, one per variant."""
    mb = row["file_gib"] * 1024
    for n in ns:
        peak = {}
        for variant in VARIANTS:
            r = subprocess.run([sys.executable, __file__, "--mem", f"{model}:{variant}", *child_args, "--n", str(n)],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(r.stderr[-3000:])
            peak[variant] = json.loads(r.stdout.strip().splitlines()[-1])
        extra_off = peak["contributions"]["peak_private_mb"] - peak["off"]["peak_private_mb"]
        extra_on = peak["contributions"]["peak_private_mb"] - peak["on"]["peak_private_mb"]
        row["by_n"][str(n)].update({
            "extra_private_mb": round(extra_off, 1), "extra_private_share_of_file": round(extra_off / mb, 4),
            "extra_private_over_tap_on_mb": round(extra_on, 1), "extra_private_over_tap_on_share": round(extra_on / mb, 4),
            "peak_private_gib": round(max(v["peak_private_mb"] for v in peak.values()) / 1024, 2),
            "peak_rss_gib": round(max(v["peak_rss_mb"] for v in peak.values()) / 1024, 2)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m"])
    ap.add_argument("--n", default="1,16")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    threads_arg(ap, 2)
    ap.add_argument("--text", default=None, help="random (default), real, distinct, or a list: random,real")
    ap.add_argument("--out", default=None)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child: measure one model, print JSON
    ap.add_argument("--streams", default=None, help=argparse.SUPPRESS)  # child: real-text streams (JSON file)
    ap.add_argument("--make-streams", default=None, help=argparse.SUPPRESS)  # child: write them
    ap.add_argument("--mem", default=None, help=argparse.SUPPRESS)  # child: MODEL:VARIANT, one run's peak memory
    a = ap.parse_args()
    ns = [int(x) for x in a.n.split(",")]
    if a.make_streams:
        with open(a.make_streams, "w") as f:
            json.dump(real_streams(max(ns), a.tokens, a.threads), f)
        return
    streams = json.load(open(a.streams)) if a.streams else None
    if a.mem:
        model, variant = a.mem.rsplit(":", 1)
        print(json.dumps(peak_memory(model, variant, ns[0], a.tokens, a.threads, streams)))
        return
    if a.one:
        text = a.text if a.text is not None else "real" if streams else "random"
        print(json.dumps(measure(a.one, ns, a.tokens, a.rounds, a.threads, streams, text)))
        return
    texts = (a.text or "random").split(",")
    if not set(texts) <= {"random", "real", "distinct"}:
        raise SystemExit(f"--text must be random, real, distinct or a list of them; got {a.text!r}")
    common = ["--tokens", str(a.tokens), "--rounds", str(a.rounds), "--threads", str(a.threads)]
    rows = []
    print("| model | file GiB | text | n | tokens/s off | on | contributions | on / off | contributions / off | "
          "cache hits | extra private MB (vs off, vs on) | share of file | peak private / resident GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for text in texts:
            extra = []
            path = os.path.join(tmp, f"{text}.json")
            if text == "real":
                subprocess.run([sys.executable, __file__, "--make-streams", path, "--n", a.n, *common], check=True)
                extra = ["--streams", path]
            elif text == "distinct":  # ids 1,000 .. 48,000 of the shared 49,152-token vocabulary: no special tokens
                ids = random.Random(5).sample(range(1000, 48000), max(ns) * a.tokens)
                with open(path, "w") as f:
                    json.dump([ids[i * a.tokens:(i + 1) * a.tokens] for i in range(max(ns))], f)
                extra = ["--streams", path]
            for model, row in zip(a.models, rows_per_model(__file__, a.models, ["--n", a.n, "--text", text, *common, *extra])):
                if text == "random":  # the projection cache fills
                    add_memory(row, model, ns, common)
                rows.append(row)
                for n, v in row["by_n"].items():
                    v = {"extra_private_mb": "-", "extra_private_over_tap_on_mb": "-", "extra_private_share_of_file": float("nan"),
                         "peak_private_gib": "-", "peak_rss_gib": "-", **v}
                    print(f"| {os.path.basename(model)} | {row['file_gib']} | {text} | {n} | {v['tokens_per_s_off']} | "
                          f"{v['tokens_per_s_on']} | {v['tokens_per_s_contributions']} | {v['ratio_on']} | "
                          f"{v['ratio_contributions']} | {100 * v['cache_hit_rate']:.0f}% | {v['extra_private_mb']}, "
                          f"{v['extra_private_over_tap_on_mb']} | {100 * v['extra_private_share_of_file']:.1f}% | "
                          f"{v['peak_private_gib']} / {v['peak_rss_gib']} |", flush=True)
                if a.out:
                    save_rows(a.out, rows)  # after each model: nothing finished is lost


if __name__ == "__main__":
    main()
