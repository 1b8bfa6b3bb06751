"""Every user path of issue 23 on one mixture-of-experts GGUF at a real shape: what a user with
gpt-oss-20b or Qwen3-30B-A3B runs, one after the other, each timed.

    .venv/bin/python benchmarks/make_shapes.py --shape gpt-oss-20b
    .venv/bin/python benchmarks/moe_paths.py --model build/shapes/gpt-oss-20b-mxfp4.gguf --threads 2

Paths: load; `sample` (n = 4, contributions and routing); `best_of_n` decided early with NAD's
kNN, RAD and route-knn, and RAD on complete answers; NEX's selection; NEAT calibration on the
arith tasks, then a generation that watches its neurons; NeuReasoner calibration (traces, MoN,
detectors) and a generation it monitors; `neurotap serve` in a subprocess with the openai client
(a chat, n = 2 streamed, a RAD race). Each path's checks are structural (random weights give
garbage text): every sample has its tokens, the winner is one of the candidates, the calibrated
neurons name experts of the model, the server's answers carry what was asked. A path that fails
stops the script with its error.

Random weights never solve a task and rarely end an answer, so two calibration inputs are made
for them, as tests/test_moe_e2e.py does: NEAT's termination marker is the token the greedy answers
share most, and NeuReasoner's failure labels are a fixed pattern (every third token an intra-step
failure, ...), registered as the labeller "moe-paths". On a real model both take their defaults.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from typing import Any, Callable, Dict, List

import numpy as np

import neurotap
from neurotap import nad, neat
from neurotap.methods import neureasoner as nr
from neurotap.methods.race import race_reducers
from neurotap.methods.selection import select
from neurotap.scoring.failures import LABELLERS, register_labeller
from neurotap.scoring.tasks import arith, format_prompt

sys.path.insert(0, os.path.dirname(__file__))
from bench_server import free_port, start, stop  # noqa: E402
from common import save_rows, status_mb  # noqa: E402

MSGS = [{"role": "user", "content": "Name three colors."}]


def timed(rows: List[Dict[str, Any]], path: str, fn: Callable[[], str]) -> None:
    t0 = time.perf_counter()
    what = fn()
    rows.append({"path": path, "seconds": round(time.perf_counter() - t0, 1), "checked": what,
                 "peak_rss_gib": round(status_mb("VmHWM") / 1024, 2)})
    r = rows[-1]
    print(f"| {r['path']} | {r['seconds']} | {r['peak_rss_gib']} | {r['checked']} |", flush=True)


def every_third(text, ends, answer):
    n = len(ends)
    return {"intra": np.arange(n) % 3 == 0, "inter": np.arange(n) % 5 == 1, "instance": np.arange(n) >= n // 2}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", "-t", type=int, default=2)
    ap.add_argument("--out", default=None, help="JSON of the table")
    a = ap.parse_args()
    rows: List[Dict[str, Any]] = []
    m: Any = None
    print("| path | seconds | peak resident GiB | checked |\n|---|---|---|---|", flush=True)

    def load() -> str:
        nonlocal m
        m = neurotap.load(a.model, n_threads=a.threads, n_ctx=1024)
        i = m.info
        if not i.is_moe:
            raise SystemExit(f"{a.model} is not a mixture-of-experts model")
        return (f"{i.architecture}: {i.n_layers} layers, {i.n_expert} experts of {i.n_ff_exp} "
                f"({i.n_expert_used} used), n_ff {i.n_ff}")
    timed(rows, "load", load)
    i = m.info

    def sample() -> str:
        s = m.sample(MSGS, n=4, max_tokens=32, seed=1, reducers=("counts", "contributions", "routing"))
        assert all(x.n_tokens == 32 and x.routing_ids.shape == (32, i.n_layers, i.n_expert_used) for x in s)
        per_token = max(int(x.active_counts.max()) for x in s)
        assert 0 < per_token <= i.n_expert_used * i.n_ff_exp + i.n_ff_shexp
        return f"4 x 32 tokens; at most {per_token} active neurons a token and layer (of {i.n_ff})"
    timed(rows, "sample n=4", sample)

    for method in ("knn", "rad", "route-knn"):
        def race(method: str = method) -> str:
            r = nad.best_of_n(m, MSGS, n=8, method=method, early_stop=32, max_tokens=96, seed=4)
            assert r.sample.n_tokens == 96 and r.sample.tokens[:32] == r.candidates[r.index].tokens[:32]
            assert r.tokens_generated < 8 * 96
            return f"winner {r.index} of 8 at 32 tokens, {r.tokens_generated} tokens sampled (all 8 to the end: 768)"
        timed(rows, f"best_of_n {method} n=8 early_stop=32", race)

    def rad_complete() -> str:
        r = nad.best_of_n(m, MSGS, n=4, method="rad", early_stop=None, max_tokens=48, seed=2)
        assert len(r.candidates) == 4 and r.sample.tokens == r.candidates[r.index].tokens
        return f"winner {r.index} of 4 complete answers"
    timed(rows, "best_of_n rad on complete answers", rad_complete)

    def nex() -> str:
        s = m.sample(MSGS, n=3, max_tokens=70, seed=5, reducers=race_reducers(["nex"]), chunk=1)
        pick = select(s, "nex")
        assert pick in (0, 1, 2)
        return f"NEX picks sample {pick} of 3"
    timed(rows, "NEX n=3, 70 tokens", nex)

    tasks = arith(4, 1)
    cal_box: Dict[str, Any] = {}

    def neat_calibrate() -> str:
        gs = [m.generate([{"role": "user", "content": format_prompt(t)}], temperature=0, max_tokens=48).tokens
              for t in tasks]
        # The most shared token whose text is that one token again (a stop string must round-trip).
        marker = next(text for tok, _ in Counter(x for g in gs for x in set(g[1:])).most_common()
                      for text in [m.detokenize([tok])]
                      if m.tokenize(text, add_special=False, parse_special=True) == [tok])
        L = i.n_layers
        cal = neat.calibrate(m, tasks, problems=4, layers=(L - 2, L), marker=marker, max_tokens=48, progress=False)
        assert cal.neurons and all(L - 2 <= layer < L for layer, _ in cal.neurons)
        experts = sorted({int(i.expert_of(u)[0]) for _, u in cal.neurons})
        cal_box["neat"] = cal
        return f"{len(cal.neurons)} exit neurons in experts {experts[:6]}{'...' if len(experts) > 6 else ''}"
    timed(rows, "NEAT calibrate (4 arith tasks)", neat_calibrate)

    def neat_generate() -> str:
        g = m.generate(MSGS, max_tokens=64, neat=cal_box["neat"], temperature=0)
        return f"{g.n_tokens} tokens, exit at {g.neat_exit_at if g.neat_exit_at >= 0 else 'none'}"
    timed(rows, "generate with NEAT", neat_generate)

    def nr_calibrate() -> str:
        register_labeller("moe-paths", every_third)
        try:
            cal = nr.calibrate(m, tasks, n=2, max_tokens=48, window=8, labeller="moe-paths", progress=False)
        finally:
            LABELLERS.pop("moe-paths")
        comps = [c for lv in cal.levels.values() for c in lv.components]
        assert comps
        cal_box["nr"] = cal
        return f"{len(comps)} monitored components at layer {cal.layer}"
    timed(rows, "NeuReasoner calibrate (4 tasks x 2)", nr_calibrate)

    def nr_generate() -> str:
        g = m.generate(MSGS, max_tokens=64, neureasoner=cal_box["nr"], temperature=0.7, seed=3)
        return f"{g.n_tokens} tokens, {len(g.neureasoner_events)} detections"
    timed(rows, "generate with NeuReasoner", nr_generate)
    m.close()

    def serve() -> str:
        import openai

        port = free_port()
        base = f"http://127.0.0.1:{port}"
        proc = start([sys.executable, "-m", "neurotap", "serve", a.model, "--port", str(port), "--threads",
                      str(a.threads), "--ctx", "1024", "--parallel", "8"], base + "/health", dict(os.environ))
        try:
            c = openai.OpenAI(base_url=base + "/v1", api_key="none")
            r = c.chat.completions.create(model="m", messages=MSGS, max_tokens=24, seed=1)
            assert r.usage.completion_tokens == 24
            chunks = c.chat.completions.create(model="m", messages=MSGS, max_tokens=16, n=2, seed=2, stream=True)
            got = Counter(choice.index for ch in chunks for choice in ch.choices if choice.delta.content)
            assert set(got) == {0, 1}
            race = c.chat.completions.create(model="m", messages=MSGS, max_tokens=48, seed=3, extra_body={
                "nad": {"n": 8, "method": "rad", "early_stop": 32}})
            e = race.to_dict()["neurotap"]["nad"]
            # Random weights end no sample early: 8 prefixes of 32 tokens, then the winner's 16 more.
            assert len(e["candidates"]) == 8 and e["candidates"][e["pick"]]["tokens"] == 32
            assert race.usage.completion_tokens == 8 * 32 + 16, race.usage
            return f"chat, n=2 streamed, RAD race of 8: winner {e['pick']}, {race.usage.completion_tokens} tokens sampled"
        finally:
            stop(proc)
    timed(rows, "serve (openai client)", serve)
    if a.out:
        save_rows(a.out, rows)


if __name__ == "__main__":
    main()
