"""Requests/s, tokens/s and time to first token of `neurotap serve` against llama.cpp's own
`llama-server` (issue 25 item 6): a bounded, closed-loop local load generator at 1, 4 and 16
concurrent clients, and the time to first token of the tenth turn of a chat.

llama-server is built from the llama.cpp source vendored in the pinned llama-cpp-python sdist,
with the same CPU flags as the llama-cpp-python build neurotap runs on (under build/llama.cpp/,
nothing committed):

    bash benchmarks/build_llama_tools.sh llama-server
    .venv/bin/python benchmarks/bench_vs_llama_server.py [--model NAME|PATH] [--threads 2] [--parallel 4] \\
        [--clients 1,4,16] [--requests 4] [--max-tokens 64] [--rounds 3] [--apart] [--out benchmarks/results/vs_llama_server.json]

(The script builds llama-server itself when --llama-server is not given; the build is incremental.)

The load: both servers are up (each idle while the other is measured, its threads asleep) and,
in every round, each client count is run on one server and then at once on the other, the order
alternating, so the two measurements of a pair are seconds apart and the machine's drift over
minutes falls on both alike (--apart: one server up at a time, a round each, as before). The
chat: each round starts one server fresh, runs the chat, stops it, and does the same with the
other, the order alternating. Rates are medians over rounds; ratios are medians of the per-round
(per-pair) ratios neurotap / llama-server.

- Load: C client threads, each sending --requests chat completions back to back (streamed;
  distinct short prompts; a new connection per request), all to 127.0.0.1. requests/s and
  generated tokens/s (from each stream's usage) are over the wall time from the first request
  to the last answer; TTFT is the time from sending a request to its first chunk with text.
- Chat: a ~1,000-token system prompt and ten user turns, each reply (--chat-tokens tokens)
  appended to the history; the TTFT of the tenth turn is what the prompt cache of each server
  saves. Both keep what they did by default: llama-server's `cache_prompt` (on by default:
  the slot's whole common prefix, generated tokens included, plus its RAM prompt cache), neurotap's
  per-slot prompt reuse (`exact` by default: only cells a whole decode of the prompt computes the
  same, so not the last reply's; `--neurotap-reuse prefix` runs it llama-server's way;
  docs/server.md). The tenth turn's TTFT is one sample per round: the mean of the later half of
  the turns is printed beside it.

Made equal: the GGUF file; --parallel slots, each with its own KV stream of --ctx cells
(neurotap `--ctx C --parallel P`; llama-server `-c P*C -np P`, which without `-kvu` gives each
sequence n_ctx / n_seq_max cells); threads (-t and -tb); flash attention on; micro-batch 512;
the environment (OMP_WAIT_POLICY and the rest are inherited by both). Every request has the
same body for both: temperature 0.8, top-k 40, top-p 0.95, min-p 0.05 (the defaults of both),
penalties off, a seed per request, and `samplers: [top_k, top_p, min_p, temperature]` so that
llama-server's chain is neurotap's (top-k, top-p, min-p, temperature, dist; neurotap ignores the
field); `ignore_eos` with a fixed max_tokens, so every answer is exactly max_tokens tokens on
both (checked from usage: a mismatch stops the run).

Not equal, and said so: llama-server's logical batch is 2048 tokens, neurotap's 512 (same 512-token
micro-batch, so the same graphs; a long prompt is handed to llama_decode in one call instead of
several). Each server renders the chat with its own reading of the GGUF's template (llama-server
with its Jinja engine): the prompt token counts of both are printed, and a difference is flagged.
The sampled tokens need not be the same on both (a row's logits depend on what else is in its
batch). The client is Python threads on the same 2 cores as the server, alike for both. With
16 clients, llama-server serves --parallel + 4 connections at once (its HTTP threads by default)
and leaves the rest in its accept queue, neurotap queues them as requests: both keep --parallel
requests decoding, and the waiting counts in the TTFT of both.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import neurotap
from bench_server import TOPICS, free_port, start, stop
from common import save_rows
from neurotap.apps.cli import model_arg, threads_arg
from neurotap.core.defaults import SERVER

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"  # the load generator sends to this machine only
# neurotap serve's defaults, which are llama-server's too (temperature 0.8, top-k 40, top-p 0.95,
# min-p 0.05), sent explicitly to both.
SAMPLING = {"temperature": SERVER.temperature, "top_k": SERVER.top_k, "top_p": SERVER.top_p, "min_p": SERVER.min_p,
            "repeat_penalty": 1.0,
            "presence_penalty": 0.0, "frequency_penalty": 0.0,
            "samplers": ["top_k", "top_p", "min_p", "temperature"]}
SYSTEM = " ".join(
    f"Rule {i + 1}: when the user asks about {t}, answer in plain words, give one concrete detail about "
    f"{t} that a child could check, say what is uncertain, keep to three sentences, and never invent "
    f"names, dates or numbers that the conversation has not given."
    for i, t in enumerate(TOPICS + TOPICS[:6]))  # about 1,030 tokens
TURNS = ["Tell me about a lighthouse.", "And a storm at sea?", "What does an old clock sound like?",
         "Where would a lost cat hide?", "Describe a mountain village in winter.", "Who rides a night train?",
         "What would a robot gardener plant first?", "What is sold at a winter market?",
         "How deep is a desert well?", "Summarise our conversation in two sentences."]


def stream_chat(port: int, body: Dict[str, Any], timeout: float) -> Dict[str, Any]:
    """One streamed chat completion: its TTFT (to the first chunk with text), seconds, text, usage."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        t0 = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", json.dumps({**body, "stream": True,
                                                                 "stream_options": {"include_usage": True}}),
                     {"content-type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:500]!r}")
        ttft, text, usage = None, [], None
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue  # blank separators, ': ping' comments
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            for c in chunk.get("choices") or []:
                piece = (c.get("delta") or {}).get("content")
                if piece:
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    text.append(piece)
            usage = chunk.get("usage") or usage
        if usage is None:
            raise RuntimeError("the stream carried no usage (stream_options.include_usage)")
        return {"ttft": ttft, "seconds": time.perf_counter() - t0, "text": "".join(text), "usage": usage}
    finally:
        conn.close()


def request_body(messages: List[Dict[str, str]], max_tokens: int, seed: int) -> Dict[str, Any]:
    return {"model": "m", "messages": messages, "max_tokens": max_tokens, "seed": seed, "ignore_eos": True,
            **SAMPLING}


def checked(r: Dict[str, Any], max_tokens: int, server: str) -> Dict[str, Any]:
    n = r["usage"]["completion_tokens"]
    if n != max_tokens:
        raise SystemExit(f"{server} wrote {n} tokens, not {max_tokens}: the comparison would be unequal")
    return r


def load(server: str, port: int, clients: int, requests: int, max_tokens: int, timeout: float,
         tag: int = 0) -> Dict[str, Any]:
    """C closed-loop clients, each sending `requests` requests back to back. Every prompt is new to
    the server (`tag` numbers the load: no prompt is sent twice in a run, so no server answers one
    from its cache of whole prompts); all share the chat template and their opening words."""
    results: List[Optional[Dict[str, Any]]] = [None] * (clients * requests)
    errors: List[BaseException] = []

    def client(c: int) -> None:
        try:
            for i in range(requests):
                k = c * requests + i
                msgs = [{"role": "user", "content": f"Write a short story about {TOPICS[k % len(TOPICS)]} "
                                                    f"(story {tag}-{k})."}]
                results[k] = checked(stream_chat(port, request_body(msgs, max_tokens, k), timeout), max_tokens, server)
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    secs = time.perf_counter() - t0
    if errors or any(r is None for r in results):
        raise SystemExit(f"{server}, {clients} clients: {errors[0] if errors else 'a client did not finish in time'}")
    ttfts = [r["ttft"] for r in results]
    return {"clients": clients, "requests": len(results), "seconds": secs, "requests_per_s": len(results) / secs,
            "tokens_per_s": sum(r["usage"]["completion_tokens"] for r in results) / secs,
            "ttft_mean": statistics.mean(ttfts), "ttft_median": statistics.median(ttfts)}


def chat(server: str, port: int, turns: int, max_tokens: int, timeout: float) -> Dict[str, Any]:
    """A chat of `turns` turns on a fresh server; each reply goes into the history."""
    history = [{"role": "system", "content": SYSTEM}]
    ttft, prompt_tokens = [], []
    for i in range(turns):
        history.append({"role": "user", "content": TURNS[i % len(TURNS)]})
        r = checked(stream_chat(port, request_body(history, max_tokens, 1000 + i), timeout), max_tokens, server)
        history.append({"role": "assistant", "content": r["text"]})
        ttft.append(r["ttft"])
        prompt_tokens.append(r["usage"]["prompt_tokens"])
    return {"ttft": ttft, "prompt_tokens": prompt_tokens}


def server_commands(a: argparse.Namespace, path: str, llama_server: str, port: int) -> Dict[str, List[str]]:
    t, p, c = str(a.threads), str(a.parallel), a.ctx
    return {
        "neurotap": [sys.executable, "-m", "neurotap", "serve", path, "--host", HOST, "--port", str(port),
                     "--threads", t, "--ctx", str(c), "--parallel", p, "--max-queue", "256", "--flash-attn", "on",
                     "--prompt-reuse", a.neurotap_reuse],
        "llama-server": [llama_server, "-m", path, "--host", HOST, "--port", str(port), "-t", t, "-tb", t,
                         "-c", str(a.parallel * c), "-np", p, "-fa", "on", "-ub", "512"],
    }


def build_llama_server() -> str:
    """The llama-server binary, built (incrementally) by build_llama_tools.sh; its log only on failure."""
    b = subprocess.run(["bash", str(ROOT / "benchmarks" / "build_llama_tools.sh"), "llama-server"],
                       capture_output=True, text=True)
    if b.returncode != 0:
        raise SystemExit(f"building llama-server failed:\n{b.stderr[-3000:]}")
    return b.stdout.strip().splitlines()[-1]


def warm_up(port: int, timeout: float) -> None:
    for i in range(2):  # page in the weights, build the graphs
        stream_chat(port, request_body([{"role": "user", "content": "Hello."}], 8, i), timeout)


def load_row(name: str, port: int, clients: int, r: int, a: argparse.Namespace) -> Dict[str, Any]:
    row = load(name, port, clients, a.requests, a.max_tokens, a.timeout, tag=1000 * r + clients)
    print(f"  round {r + 1} {name} {clients} clients: {row['requests_per_s']:.2f} req/s, "
          f"{row['tokens_per_s']:.1f} tok/s, TTFT median {row['ttft_median']:.3f} s", file=sys.stderr)
    return {"kind": "load", "server": name, "round": r, **row}


def load_side_by_side(a: argparse.Namespace, path: str, binary: str, counts: List[int],
                      names: List[str]) -> List[Dict[str, Any]]:
    """The load with both servers up (each idle while the other is measured): at every client
    count of every round one server, then the other (the order alternating), seconds apart, so
    the machine's drift over minutes falls on both alike."""
    ports = {name: free_port() for name in names}
    procs: Dict[str, Any] = {}
    rows: List[Dict[str, Any]] = []
    try:
        for name in names:
            procs[name] = start(server_commands(a, path, binary, ports[name])[name],
                                f"http://{HOST}:{ports[name]}/v1/models", dict(os.environ))
            warm_up(ports[name], a.timeout)
        k = 0
        for r in range(a.rounds):
            for c in counts:
                for name in names if k % 2 == 0 else names[::-1]:
                    time.sleep(0.5)  # the other server's threads are asleep again
                    rows.append(load_row(name, ports[name], c, r, a))
                k += 1
    finally:
        for proc in procs.values():
            stop(proc)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_arg(ap)
    threads_arg(ap, 2)
    ap.add_argument("--parallel", type=int, default=4, help="slots of both servers")
    ap.add_argument("--ctx", type=int, default=4096, help="KV cells per slot")
    ap.add_argument("--clients", default="1,4,16", help="concurrent clients, comma-separated")
    ap.add_argument("--requests", type=int, default=4, help="requests each client sends back to back")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens of every load answer")
    ap.add_argument("--turns", type=int, default=10, help="turns of the chat (0: no chat)")
    ap.add_argument("--chat-tokens", type=int, default=64, help="tokens of every chat reply")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--neurotap-reuse", default="exact", choices=("exact", "prefix", "off"),
                    help="neurotap serve --prompt-reuse (llama-server's cache_prompt is prefix)")
    ap.add_argument("--apart", action="store_true",
                    help="measure the load with one server up at a time, a round each (default: both up, "
                         "one client count at a time, alternating)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds any one request or client may take")
    ap.add_argument("--llama-server", help="the llama-server binary (default: build it from the vendored source)")
    ap.add_argument("--out", help="write the record here (JSON), e.g. benchmarks/results/vs_llama_server.json")
    a = ap.parse_args()
    counts = [int(x) for x in a.clients.split(",") if x.strip() and int(x) > 0]  # "0": the chat only

    path = str(neurotap.resolve(a.model))
    binary = a.llama_server or build_llama_server()
    names = ["neurotap", "llama-server"]
    runs: List[Dict[str, Any]] = []
    if counts and not a.apart:
        runs += load_side_by_side(a, path, binary, counts, names)
    for r in range(a.rounds if a.turns or a.apart else 0):
        for name in names if r % 2 == 0 else names[::-1]:
            port = free_port()
            cmd = server_commands(a, path, binary, port)[name]
            proc = start(cmd, f"http://{HOST}:{port}/v1/models", dict(os.environ))
            try:
                warm_up(port, a.timeout)
                for c in counts if a.apart else []:
                    time.sleep(0.5)
                    runs.append(load_row(name, port, c, r, a))
                if a.turns:
                    time.sleep(0.5)
                    row = chat(name, port, a.turns, a.chat_tokens, a.timeout)
                    runs.append({"kind": "chat", "server": name, "round": r, **row})
                    print(f"  round {r + 1} {name} chat: TTFT turn 1 {row['ttft'][0]:.3f} s, turn {a.turns} "
                          f"{row['ttft'][-1]:.3f} s ({row['prompt_tokens'][-1]} prompt tokens)", file=sys.stderr)
            finally:
                stop(proc)

    summary = report(runs, counts, a)
    if a.out:
        config = {k: getattr(a, k) for k in ("threads", "parallel", "ctx", "clients", "requests", "max_tokens",
                                             "turns", "chat_tokens", "rounds", "neurotap_reuse", "apart")}
        save_rows(a.out, [{"kind": "config", "model": path, "llama_server": binary, "cpus": os.cpu_count(),
                           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "sampling": SAMPLING, **config},
                          *summary, *runs])


def report(runs: List[Dict[str, Any]], counts: List[int], a: argparse.Namespace) -> List[Dict[str, Any]]:
    """Prints the markdown table; returns its rows (medians over rounds, medians of per-round ratios)."""
    def per_round(kind: str, server: str, **match: Any) -> List[Dict[str, Any]]:
        rows = [x for x in runs if x["kind"] == kind and x["server"] == server
                and all(x[k] == v for k, v in match.items())]
        return sorted(rows, key=lambda x: x["round"])

    def med(xs) -> float:
        return statistics.median(xs)

    out: List[Dict[str, Any]] = []
    print(f"| clients | req/s neurotap | req/s llama-server | ratio | tok/s neurotap | tok/s llama-server | ratio "
          f"| TTFT neurotap (s, median) | TTFT llama-server (s, median) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for c in counts:
        n, l = per_round("load", "neurotap", clients=c), per_round("load", "llama-server", clients=c)
        row = {"kind": "summary", "clients": c}
        for key in ("requests_per_s", "tokens_per_s", "ttft_median"):
            row[key] = {"neurotap": med(x[key] for x in n), "llama-server": med(x[key] for x in l),
                        "ratio": med(x[key] / y[key] for x, y in zip(n, l))}
        out.append(row)
        rq, tk, tt = row["requests_per_s"], row["tokens_per_s"], row["ttft_median"]
        print(f"| {c} | {rq['neurotap']:.2f} | {rq['llama-server']:.2f} | {rq['ratio']:.2f} | {tk['neurotap']:.1f} "
              f"| {tk['llama-server']:.1f} | {tk['ratio']:.2f} | {tt['neurotap']:.3f} | {tt['llama-server']:.3f} |")
    if a.turns:
        n, l = per_round("chat", "neurotap"), per_round("chat", "llama-server")
        row = {"kind": "summary", "chat_turn": a.turns,
               "ttft": {"neurotap": med(x["ttft"][-1] for x in n), "llama-server": med(x["ttft"][-1] for x in l),
                        "ratio": med(x["ttft"][-1] / y["ttft"][-1] for x, y in zip(n, l))},
               "prompt_tokens": {"neurotap": n[0]["prompt_tokens"][-1], "llama-server": l[0]["prompt_tokens"][-1]}}
        # The tenth turn alone is one sample per round; the later half's mean is steadier.
        late = slice(a.turns // 2, a.turns)
        row["ttft_later_half"] = {
            "turns": [late.start + 1, a.turns],
            "neurotap": med(statistics.mean(x["ttft"][late]) for x in n),
            "llama-server": med(statistics.mean(x["ttft"][late]) for x in l),
            "ratio": med(statistics.mean(x["ttft"][late]) / statistics.mean(y["ttft"][late]) for x, y in zip(n, l))}
        out.append(row)
        t, pt, h = row["ttft"], row["prompt_tokens"], row["ttft_later_half"]
        print(f"\n| chat | TTFT neurotap (s) | TTFT llama-server (s) | neurotap / llama-server (<= 1: no worse) "
              f"| prompt tokens (neurotap, llama-server) |")
        print("|---|---|---|---|---|")
        print(f"| turn {a.turns} | {t['neurotap']:.3f} | {t['llama-server']:.3f} | {t['ratio']:.2f} "
              f"| {pt['neurotap']}, {pt['llama-server']} |")
        print(f"| turns {h['turns'][0]}-{h['turns'][1]} (mean) | {h['neurotap']:.3f} | {h['llama-server']:.3f} "
              f"| {h['ratio']:.2f} | |")
        first = [x["prompt_tokens"][0] for x in n + l]
        if len(set(first)) > 1:
            print(f"WARNING: the servers rendered the first turn into different prompt lengths: {sorted(set(first))}")
    print(f"\n[{a.requests} requests per client, {a.max_tokens} tokens each (ignore_eos), chat replies of "
          f"{a.chat_tokens} tokens, {a.rounds} rounds, {a.threads} threads, --parallel {a.parallel}, {a.ctx} cells "
          f"per slot, neurotap --prompt-reuse {a.neurotap_reuse}, {os.cpu_count()} CPUs, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}]")
    return out


if __name__ == "__main__":
    main()
