"""Requests/s and tokens/s of `neurotap serve` against llama-cpp-python's own server
(`python -m llama_cpp.server`, pip install 'llama-cpp-python[server]'), side by side in one run.

Both servers run at once on 127.0.0.1, on the same model file, threads, context and flash
attention; each round sends the same workload to one then the other (the order alternates), so
machine noise hits them alike. A workload is chat completions of distinct prompts, greedy (both
servers then produce the same tokens), max_tokens fixed: one client at a time, then several
clients at once (both servers decode one request at a time; this measures their queueing).
Rates are medians over rounds; ratios are medians of per-round ratios. neurotap's `n` (one
parallel batch) is measured too, against the same number of separate requests.

    python benchmarks/bench_server.py [--model NAME|PATH] [--threads 2] [--rounds 3] [--requests 8]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import neurotap
from neurotap.apps.cli import model_arg, threads_arg

TOPICS = ["a lighthouse", "a storm at sea", "an old clock", "a lost cat", "a mountain village", "a night train",
          "a robot gardener", "a winter market", "a desert well", "a paper boat", "a city library", "a red kite"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def start(cmd: list, url: str, env: dict) -> subprocess.Popen:
    """A server started and answering `url`. Its log goes to an unnamed file, not a pipe: a pipe
    nobody reads fills up and stalls a server that logs every request (llama-server)."""
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env=env)
    proc.log = log  # type: ignore[attr-defined]  # kept open as long as the server
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"{' '.join(cmd[:3])} exited: {log.read()[-2000:].decode(errors='replace')}")
        try:
            urllib.request.urlopen(url, timeout=1)
            return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"{cmd} did not start")


def stop(proc: subprocess.Popen) -> None:
    """Stops a server that start() started: SIGTERM, then SIGKILL after 30 s."""
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    proc.log.close()  # type: ignore[attr-defined]


def workload(base: str, prompts: list, max_tokens: int, clients: int, n: int = 1) -> tuple:
    """(seconds, requests, completion tokens) of one workload."""
    def one(p):
        body = {"model": "m", "messages": [{"role": "user", "content": p}], "max_tokens": max_tokens,
                "temperature": 0, "top_p": 1.0, "top_k": 1, "min_p": 0.0, "repeat_penalty": 1.0, "seed": 0}
        if n > 1:
            body.update(n=n, temperature=0.8, top_k=40, top_p=0.95)
        return post(base + "/v1/chat/completions", body)["usage"]["completion_tokens"]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        tokens = sum(pool.map(one, prompts))
    return time.perf_counter() - t0, len(prompts), tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_arg(ap)
    threads_arg(ap, 2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=8, help="requests per workload")
    ap.add_argument("--clients", type=int, default=4, help="concurrent clients of the second workload")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--omp-wait-policy", default="passive",
                    help="OMP_WAIT_POLICY of both servers (passive: no spinning when the machine is shared)")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()
    env = {**os.environ, "OMP_WAIT_POLICY": a.omp_wait_policy}

    path = str(neurotap.resolve(a.model))
    env_cmd = [sys.executable, "-m"]
    pn, pl = free_port(), free_port()
    servers = {
        "neurotap": (env_cmd + ["neurotap", "serve", path, "--port", str(pn), "--threads", str(a.threads),
                                "--ctx", "2048", "--max-queue", "256"], f"http://127.0.0.1:{pn}"),
        "llama_cpp.server": (env_cmd + ["llama_cpp.server", "--model", path, "--port", str(pl), "--host", "127.0.0.1",
                                        "--n_threads", str(a.threads), "--n_threads_batch", str(a.threads),
                                        "--n_ctx", "2048", "--flash_attn", "true", "--verbose", "false"],
                             f"http://127.0.0.1:{pl}"),
    }
    procs = [start(cmd, base + "/v1/models", env) for cmd, base in servers.values()]
    prompts = [f"Write a short story about {t}." for t in TOPICS]
    prompts = (prompts * (a.requests // len(prompts) + 1))[:a.requests]
    loads = {"1 client": 1, f"{a.clients} clients": a.clients}
    rows: dict = {}
    try:
        for name, (_, base) in servers.items():  # warm-up: page in weights, build graphs
            workload(base, prompts[:2], a.max_tokens, 1)
        for r in range(a.rounds):
            order = list(servers) if r % 2 == 0 else list(reversed(servers))
            for load, clients in loads.items():
                for name in order:
                    time.sleep(1.0)  # let the other server's threads go idle
                    secs, reqs, toks = workload(servers[name][1], prompts, a.max_tokens, clients)
                    rows.setdefault((load, name), []).append((reqs / secs, toks / secs))
                    print(f"  {load} {name}: {reqs / secs:.2f} req/s, {toks / secs:.1f} tok/s", file=sys.stderr)
            # neurotap's n: one request of n samples (one batch) against n separate requests.
            n = a.clients
            time.sleep(1.0)
            secs, _, toks = workload(servers["neurotap"][1], prompts[:1], a.max_tokens, 1, n=n)
            rows.setdefault((f"n={n} in one request", "neurotap"), []).append((1 / secs, toks / secs))
            print(f"round {r + 1}/{a.rounds} done", file=sys.stderr)
    finally:
        for p in procs:
            stop(p)

    out = []
    print("| workload | server | requests/s | tokens/s | neurotap / llama_cpp.server (req/s, median of rounds) |")
    print("|---|---|---|---|---|")
    for (load, name), vals in rows.items():
        rq = statistics.median(v[0] for v in vals)
        tk = statistics.median(v[1] for v in vals)
        ratio = ""
        if name == "neurotap" and (load, "llama_cpp.server") in rows:
            other = rows[(load, "llama_cpp.server")]
            ratio = f"{statistics.median(x[0] / y[0] for x, y in zip(vals, other)):.2f}"
        print(f"| {load} | {name} | {rq:.2f} | {tk:.1f} | {ratio} |")
        out.append({"workload": load, "server": name, "requests_per_s": rq, "tokens_per_s": tk,
                    "rounds": [list(v) for v in vals]})
    print(f"[{a.requests} requests of {a.max_tokens} tokens max per workload, {a.rounds} rounds, "
          f"{a.threads} threads, {os.cpu_count()} CPUs, OMP_WAIT_POLICY={a.omp_wait_policy}]")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": path, "threads": a.threads, "rows": out}, f, indent=1)


if __name__ == "__main__":
    main()
