"""Decode speed of one request through `neurotap serve` against `Model.generate` on the main thread
(what `neurotap generate` runs), side by side on the same model, threads and prompt.

Each round measures, in alternating order: generate on the main thread of this process, the same
generate on a worker thread of this process (the server's situation without HTTP), and one
request to a `neurotap serve` subprocess. Every arm decodes the same greedy prompt with
ignore_eos, so each decodes exactly --tokens tokens. The server's decode rate comes from two
requests, max_tokens=1 and max_tokens=--tokens, timed at the client: (tokens - 1) / (t_long - t_1),
which leaves out the prompt and the HTTP round trip as generate's own decode rate does. The ratio
printed is the median of per-round ratios server / main thread; issue 25 asks for >= 0.95.

Each arm also reports the voluntary context switches of its process's threads per decoded token, a
figure machine noise barely moves: llama.cpp's OpenMP build waits at an OpenMP barrier after every
graph node, and libgomp sleeps there in the kernel (hundreds of switches per token instead of a
few dozen) when OMP_WAIT_POLICY=passive or when more OpenMP threads exist than CPUs (a second
thread that decodes gets a second thread team). Run it under the same OMP_WAIT_POLICY as what you
compare with: the arms inherit this process's environment.

    python benchmarks/bench_server_thread.py [--model NAME|PATH] [--threads 2] [--rounds 3] [--tokens 128]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

import neurotap
from bench_server import free_port, post, start, stop
from neurotap.apps.cli import model_arg, threads_arg

PROMPT = "Write a long story about a lighthouse keeper and the storm that changed his life."


def switches(pid: str = "self") -> int:
    """Voluntary context switches of every thread of a process so far."""
    total = 0
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{t}/status") as f:
                total += sum(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt_switches"))
        except OSError:  # a thread that ended meanwhile
            pass
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_arg(ap)
    threads_arg(ap, 2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    a = ap.parse_args()

    path = str(neurotap.resolve(a.model))
    model = neurotap.load(path, n_threads=a.threads, n_ctx=2048)
    messages = [{"role": "user", "content": PROMPT}]
    kw = dict(max_tokens=a.tokens, temperature=0.0, tap=False)

    def gen_rate() -> float:
        g = model.generate(messages, **kw)
        return g.tokens_per_second, g.n_tokens

    def thread_rate() -> float:
        out = []
        t = threading.Thread(target=lambda: out.append(gen_rate()), name="worker")
        t.start()
        t.join()
        return out[0]

    def own(f):
        def g():
            s0 = switches()
            rate, n = f()
            return rate, (switches() - s0) / max(n, 1)
        return g

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start([sys.executable, "-m", "neurotap", "serve", path, "--port", str(port), "--threads", str(a.threads),
                  "--ctx", "2048"], base + "/v1/models", dict(os.environ))

    def server_rate() -> float:
        body = {"model": "m", "messages": messages, "temperature": 0, "ignore_eos": True, "seed": 0}
        t0 = time.perf_counter()
        post(base + "/v1/chat/completions", {**body, "max_tokens": 1})
        t1 = time.perf_counter()
        s0 = switches(str(proc.pid))
        r = post(base + "/v1/chat/completions", {**body, "max_tokens": a.tokens})
        t2 = time.perf_counter()
        n = r["usage"]["completion_tokens"]
        return (n - 1) / ((t2 - t1) - (t1 - t0)), (switches(str(proc.pid)) - s0) / n

    arms = {"generate, main thread": own(gen_rate), "generate, worker thread": own(thread_rate),
            "server, one request": server_rate}
    rates: dict = {k: [] for k in arms}
    per_token: dict = {k: [] for k in arms}
    try:
        for f in arms.values():  # warm-up: page in the weights, build the graphs
            f()
        for r in range(a.rounds):
            order = list(arms) if r % 2 == 0 else list(reversed(arms))
            for name in order:
                time.sleep(0.5)
                rate, sw = arms[name]()
                rates[name].append(rate)
                per_token[name].append(sw)
                print(f"  round {r + 1} {name}: {rate:.1f} tok/s, {sw:.0f} switches/token", file=sys.stderr)
    finally:
        stop(proc)
    main = rates["generate, main thread"]
    print("| arm | decode tokens/s (median) | / main thread (median of per-round ratios) | voluntary switches per token |")
    print("|---|---|---|---|")
    for name, v in rates.items():
        ratio = statistics.median(x / m for x, m in zip(v, main))
        print(f"| {name} | {statistics.median(v):.1f} | {ratio:.2f} | {statistics.median(per_token[name]):.0f} |")
    print(f"[{a.tokens} tokens greedy, {a.rounds} rounds, {a.threads} threads, {os.cpu_count()} CPUs, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}]")


if __name__ == "__main__":
    main()
