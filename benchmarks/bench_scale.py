"""NAD contributions at the shapes users run: private memory and time per token against the tap off.

For each model (the default one and GGUFs at 1B/4B/8B shapes from benchmarks/make_shapes.py), in
one process per model: parallel sampling runs of n samples (end of generation banned, so every
run has the same length) with the tap off and with the contribution reducer, rounds alternating.
Memory: the peak of the process's anonymous resident memory (RssAnon: private memory; the model
file's pages, read through mmap and shared with the page cache, do not count) during each run,
minus the peak with the tap off. Time: median of the per-round ratios of decode time per token.

    .venv/bin/python benchmarks/bench_scale.py --models smollm2-135m build/shapes/llama-1b-q4_0.gguf \\
        --n 1,16 --tokens 64 --rounds 3 --threads 2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import threading

from common import rows_per_model, save_rows


def rss_anon_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return 0.0


class PeakAnon:
    """Polls RssAnon every 20 ms while a run is in flight."""

    def __enter__(self) -> "PeakAnon":
        self.peak, self._stop = rss_anon_mb(), threading.Event()
        self._t = threading.Thread(target=self._poll, daemon=True)
        self._t.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_anon_mb())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_anon_mb())


def measure(model_name: str, ns, tokens: int, rounds: int, threads: int) -> dict:
    import neurotap

    m = neurotap.load(model_name, n_threads=threads, n_ctx=max(512, tokens + 64), max_sample_cells=1 << 20)
    prompt = "Tell me about the history of the sea and the ships that sailed it."
    variants = {"off": dict(tap=False, reducers=()), "contributions": dict(reducers=("contributions",))}
    out = {"model": model_name, "file_gib": round(os.path.getsize(m.info.path) / 2**30, 3),
           "n_layers": m.info.n_layers, "n_ff": m.info.n_ff, "n_embd": m.info.n_embd, "by_n": {}}
    m.sample(prompt, n=2, max_tokens=4, reducers=("contributions",))  # warm-up: maps W_down once
    for n in ns:
        times = {k: [] for k in variants}
        peaks = {k: [] for k in variants}
        for _ in range(rounds):
            for name, kw in variants.items():
                with PeakAnon() as p:
                    run = m.start_sampling(prompt, n=n, max_tokens=tokens, seed=1, ignore_eos=True, **kw)
                    run.advance()
                times[name].append(run.decode_seconds / (n * (tokens - 1)))
                peaks[name].append(p.peak)
                run.close()
        ratios = [c / o for c, o in zip(times["contributions"], times["off"])]
        extra = max(peaks["contributions"]) - max(peaks["off"])
        out["by_n"][n] = {"ms_per_token_off": round(1e3 * statistics.median(times["off"]), 3),
                          "ms_per_token_contributions": round(1e3 * statistics.median(times["contributions"]), 3),
                          "ratio_median_of_rounds": round(statistics.median(ratios), 3),
                          "extra_private_mb": round(extra, 1),
                          "extra_private_share_of_file": round(extra / (out["file_gib"] * 1024), 4)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m"])
    ap.add_argument("--n", default="1,16")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child: measure one model, print JSON
    a = ap.parse_args()
    ns = [int(x) for x in a.n.split(",")]
    if a.one:
        print(json.dumps(measure(a.one, ns, a.tokens, a.rounds, a.threads)))
        return
    rows = []
    print("| model | file GiB | n | ms/token off | ms/token contributions | ratio | extra private MB | share of file |")
    print("|---|---|---|---|---|---|---|---|")
    for model, row in zip(a.models, rows_per_model(__file__, a.models, ["--n", a.n, "--tokens", str(a.tokens),
                                                                        "--rounds", str(a.rounds), "--threads", str(a.threads)])):
        rows.append(row)
        for n, v in row["by_n"].items():
            print(f"| {os.path.basename(model)} | {row['file_gib']} | {n} | {v['ms_per_token_off']} | "
                  f"{v['ms_per_token_contributions']} | {v['ratio_median_of_rounds']} | {v['extra_private_mb']} | "
                  f"{100 * v['extra_private_share_of_file']:.1f}% |", flush=True)
    if a.out:
        save_rows(a.out, rows)


if __name__ == "__main__":
    main()
