"""`neurotap eval`: best-of-N selection methods side by side on a task set, with labels.

Per task, one full run samples N complete answers (seeded by the run's seed and the task's
position), and every method picks from them. With early_stop=B a second run with the same seeds
decides after B tokens, stops the other samples and continues only the picks (the union of all
early methods' picks, continued together): its tokens are counted exactly per method (every
sample's first B draws plus that method's winner's remaining draws), its seconds are that run's
time. Samples continued after pruning draw the same tokens as in the full run (tested in
tests/test_sampling.py); the report counts any divergence.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ..core.io import atomic_path, write_atomic
from ..methods.nad import check_early_stop, decision_chunk, early_stop_tokens, set_sizes, similarity
from ..methods.neat import load_calibration
from ..methods.selection import METHODS, TOP_LOGPROBS, check_methods, select
from ..runtime.model import Model
from ..scoring.answers import extract_answer, is_correct, majority_vote
from ..scoring.stats import bootstrap_ci
from ..scoring.tasks import DEFAULT_PROMPT, Task, format_prompt

DEFAULT_METHODS = ("knn", "medoid", "dbscan", "minact", "majority", "avg", "random", "deepconf", "selfcert")
# nex (issue 6) is opt-in: --methods ...,nex


def _task_seed(seed: int, index: int) -> int:
    return (int(seed) * 1_000_003 + index) % (2**32)


def evaluate(model: Model, tasks: Sequence[Task], *, n: int = 16, methods: Sequence[str] = DEFAULT_METHODS,
             early_stop: Optional[int] = None, max_tokens: int = 256, seed: int = 0, temperature: float = 0.6,
             top_p: float = 0.95, top_k: int = 40, k: int = 3, template: str = DEFAULT_PROMPT,
             progress: bool = True, neat: Any = None) -> Dict[str, Any]:
    methods = check_methods(list(methods), n)
    # A wrong or corrupt NEAT file fails before any sampling.
    neat_cal = load_calibration(neat, model) if neat is not None else None
    check_early_stop(early_stop, max_tokens)
    if not tasks:
        raise ValueError("no tasks to evaluate")
    early = [m for m in methods if METHODS[m].early] if early_stop is not None else []
    chunk = decision_chunk(early_stop)
    if "nex" in methods:
        chunk = 1  # NEX reads per-token sets; NAD's chunk sets are their unions (same result)
    logprobs = TOP_LOGPROBS if any(METHODS[m].needs_logprobs for m in methods) else 0
    sampling = dict(n=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                    reducers=("contributions",), chunk=chunk, logprobs=logprobs)
    V = model.info.n_vocab

    from tqdm.auto import tqdm

    rows: List[Dict[str, Any]] = []
    full_tokens = full_seconds = es_seconds = 0.0
    es_tokens: Dict[str, int] = {m: 0 for m in early}
    diverged = 0
    neat_tokens, neat_seconds = 0, 0.0
    bar = tqdm(tasks, desc=f"eval n={n}", unit="task", disable=not progress, dynamic_ncols=True)
    for ti, task in enumerate(bar):
        prompt = [{"role": "user", "content": format_prompt(task, template)}]
        s_seed = _task_seed(seed, ti)
        t0 = time.perf_counter()
        run = model.start_sampling(prompt, seed=s_seed, **sampling)
        run.advance()
        samples = run.samples()
        full_seconds += time.perf_counter() - t0
        full_tokens += run.tokens_sampled
        row: Dict[str, Any] = {"id": task.id, "question": task.question, "answer": task.answer,
                               **_judge(samples, task, methods, k=k, seed=s_seed, n_vocab=V)}
        for rec, na in zip(row["samples"], set_sizes(samples)):
            rec["set_size"] = int(na)
        if early:
            t1 = time.perf_counter()
            es = model.start_sampling(prompt, seed=s_seed, **sampling)
            es.advance(early_stop)
            prefix = es.samples()
            early_picks = {m: select(prefix, m, tokens=early_stop, k=k, seed=s_seed, n_vocab=V) for m in early}
            es.keep(sorted(set(early_picks.values())))
            es.advance()
            final = es.samples()
            es_seconds += time.perf_counter() - t1
            row["early_picks"] = early_picks
            row["early_tokens"] = {}
            row["early_correct"] = {}
            for m, p in early_picks.items():
                toks = early_stop_tokens(prefix, final, p, early_stop)
                es_tokens[m] += toks
                row["early_tokens"][m] = toks
                row["early_correct"][m] = is_correct(extract_answer(final[p].text), task.answer)
                if final[p].tokens != samples[p].tokens:
                    diverged += 1
            row["similarity_early"] = np.round(similarity(prefix, early_stop), 4).tolist()
        if neat_cal is not None:
            t2 = time.perf_counter()
            nr = model.start_sampling(prompt, seed=s_seed, neat=neat_cal, **sampling)
            nr.advance()
            ns = nr.samples()
            neat_seconds += time.perf_counter() - t2
            neat_tokens += nr.tokens_sampled
            row["neat"] = _judge(ns, task, methods, k=k, seed=s_seed, n_vocab=V)
            for rec, s in zip(row["neat"]["samples"], ns):
                rec["exit_at"] = s.neat_exit_at
                rec["bans"] = sum(1 for e in s.neat_events if e[1] == 1)
            # Identical to the run without NEAT up to each sample's first intervention.
            row["neat"]["tokens_saved"] = int(run.tokens_sampled - nr.tokens_sampled)
        row["similarity"] = np.round(similarity(samples), 4).tolist()
        rows.append(row)
        rate = full_tokens / full_seconds if full_seconds else 0.0
        bar.set_postfix(tok_s=f"{rate:.0f}", acc_avg=f"{np.mean([np.mean([x['correct'] for x in r['samples']]) for r in rows]):.2f}")
    bar.close()
    return _report(model, tasks, rows, methods, early, n=n, early_stop=early_stop, max_tokens=max_tokens, seed=seed,
                   temperature=temperature, top_p=top_p, top_k=top_k, k=k, template=template,
                   full_tokens=int(full_tokens), full_seconds=full_seconds, es_tokens=es_tokens,
                   es_seconds=es_seconds, diverged=diverged, neat_tokens=neat_tokens, neat_seconds=neat_seconds,
                   neat_used=neat_cal is not None)


def _judge(samples, task: Task, methods: Sequence[str], *, k: int, seed: int, n_vocab: int) -> Dict[str, Any]:
    """One run's samples judged against the task's answer, with every method's pick."""
    answers = [extract_answer(s.text) for s in samples]
    return {
        "samples": [{"answer": a, "correct": is_correct(a, task.answer), "tokens": s.n_tokens,
                     "finish": s.finish_reason, "text": s.text} for a, s in zip(answers, samples)],
        "picks": {m: select(samples, m, k=k, seed=seed, n_vocab=n_vocab) for m in methods if m not in ("avg", "majority")},
        "majority_answer": majority_vote(answers) if "majority" in methods else None,
    }


def _score(judged: Dict[str, Any], method: str, answer: str) -> float:
    """A task's score for one method from a _judge record: 0/1, or the mean for avg."""
    if method == "avg":
        return float(np.mean([s["correct"] for s in judged["samples"]]))
    if method == "majority":
        return float(judged["majority_answer"] is not None and is_correct(judged["majority_answer"], answer))
    pick = judged["picks"][method]
    return float(pick is not None and judged["samples"][pick]["correct"])


def _report(model, tasks, rows, methods, early, *, full_tokens, full_seconds, es_tokens, es_seconds, diverged,
            neat_tokens=0, neat_seconds=0.0, neat_used=False, **config) -> Dict[str, Any]:
    table: Dict[str, Dict[str, Any]] = {}

    def entry(scores: List[float], tokens: int, seconds: float, note: str = "") -> Dict[str, Any]:
        lo, hi = bootstrap_ci(np.asarray(scores, dtype=float))
        d = {"accuracy": float(np.mean(scores)), "ci95": [lo, hi], "tokens": int(tokens),
             "tokens_per_task": tokens / len(rows), "seconds": round(seconds, 2)}
        if note:
            d["note"] = note
        return d

    for m in methods:
        table[m] = entry([_score(r, m, r["answer"]) for r in rows], full_tokens, full_seconds)
    if neat_used:
        for m in methods:
            table[f"{m}+neat"] = entry([_score(r["neat"], m, r["answer"]) for r in rows], neat_tokens, neat_seconds)
    for m in early:
        scores = [float(r["early_correct"][m]) for r in rows]
        table[f"{m}@{config['early_stop']}"] = entry(
            scores, es_tokens[m], es_seconds,
            "seconds: the whole early-stopped run, shared by every early method (their picks continue together)")
    info = model.info
    return {
        "version": 1,
        "model": {"name": info.name, "path": info.path, "architecture": info.architecture, "n_layers": info.n_layers,
                  "n_ff": info.n_ff},
        "config": {**config, "n_tasks": len(rows), "methods": list(methods)},
        "methods": table,
        "full_run": {"tokens": full_tokens, "seconds": round(full_seconds, 2)},
        "early_run": {"tokens": {m: int(t) for m, t in es_tokens.items()}, "seconds": round(es_seconds, 2),
                      "picks_diverged_from_full_run": diverged} if early else None,
        "neat_run": {"tokens": int(neat_tokens), "seconds": round(neat_seconds, 2),
                     "tokens_saved": int(full_tokens - neat_tokens),
                     "exits": sum(1 for r in rows for s in r["neat"]["samples"] if s["exit_at"] >= 0),
                     "bans": sum(s["bans"] for r in rows for s in r["neat"]["samples"]),
                     "samples": sum(len(r["neat"]["samples"]) for r in rows)} if neat_used else None,
        "tasks": rows,
    }


def format_table(report: Dict[str, Any]) -> str:
    lines = ["| method | accuracy | 95% CI | tokens/task | seconds |", "|---|---|---|---|---|"]
    for m, e in report["methods"].items():
        lo, hi = e["ci95"]
        lines.append(f"| {m} | {e['accuracy']:.3f} | [{lo:.3f}, {hi:.3f}] | {e['tokens_per_task']:.0f} | {e['seconds']:.0f} |")
    return "\n".join(lines)


def save_report(report: Dict[str, Any], path: os.PathLike) -> None:
    write_atomic(path, json.dumps(report, indent=1).encode())


def plot_report(report: Dict[str, Any], path: os.PathLike) -> None:
    """Accuracy against tokens per task, one point per method (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("--plot needs matplotlib: pip install 'neurotap[eval]'") from e
    fig, ax = plt.subplots(figsize=(8, 5))
    labels: Dict[tuple, List[str]] = {}
    for m, e in report["methods"].items():
        lo, hi = e["ci95"]
        x, y = e["tokens_per_task"], e["accuracy"]
        ax.errorbar([x], [y], yerr=[[y - lo], [hi - y]], fmt="o" if "@" in m else "s", capsize=3, alpha=0.8)
        labels.setdefault((round(x / 25) * 25, round(y, 3)), []).append(m)  # one label per crowded point
    for (x, y), names in labels.items():
        ax.annotate(", ".join(names), (x, y), textcoords="offset points", xytext=(6, 3), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("tokens generated per task (log)")
    ax.set_ylabel("accuracy")
    c = report["config"]
    ax.set_title(f"{report['model']['name']}: {c['n_tasks']} tasks, N={c['n']}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
