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

from ..core.defaults import SAMPLE
from ..core.io import atomic_path, check_output, write_atomic
from ..methods.nad import check_early_stop, decision_chunk, early_stop_tokens, set_sizes, similarity
from ..methods.race import NadRace, race_reducers
from ..methods.neat import load_calibration
from ..methods.neureasoner import ACTIONS, LEVELS
from ..methods.neureasoner import load_calibration as load_neureasoner
from ..methods.selection import METHODS, TOP_LOGPROBS, check_methods, select
from ..runtime.model import Model
from ..scoring.answers import extract_answer, is_correct, majority_vote
from ..scoring.stats import bootstrap_ci
from ..scoring.tasks import DEFAULT_PROMPT, Task, format_prompt

DEFAULT_METHODS = ("knn", "medoid", "dbscan", "minact", "majority", "avg", "random", "deepconf", "selfcert")
# nex is opt-in (--methods ...,nex): it needs per-token sets (chunk=1)


def _task_seed(seed: int, index: int) -> int:
    return (int(seed) * 1_000_003 + index) % (2**32)


def evaluate(model: Model, tasks: Sequence[Task], *, n: int = 16, methods: Sequence[str] = DEFAULT_METHODS,
             early_stop: Optional[int] = None, max_tokens: int = 256, seed: int = SAMPLE.seed,
             temperature: float = SAMPLE.temperature, top_p: float = SAMPLE.top_p, top_k: int = SAMPLE.top_k, k: int = 3, template: str = DEFAULT_PROMPT,
             progress: bool = True, neat: Any = None, neureasoner: Any = None, out: Optional[os.PathLike] = None,
             resume: bool = False) -> Dict[str, Any]:
    """Every method on every task; returns the report. With `out`, the report is written there
    (atomically) after every task, so an interrupted or failing run keeps what it finished; with
    `resume`, the tasks already in that report (same configuration) are not run again. A task that
    fails (too long for the context, say) is reported with its error and the others go on."""
    methods = check_methods(list(methods), n)
    # A wrong or corrupt NEAT file, or an output that cannot be written, fails before any sampling.
    neat_cal = load_calibration(neat, model) if neat is not None else None
    nr_cal = load_neureasoner(neureasoner, model) if neureasoner is not None else None
    check_early_stop(early_stop, max_tokens)
    if not tasks:
        raise ValueError("no tasks to evaluate")
    if out is not None:
        check_output(out, "report")
    early = [m for m in methods if METHODS[m].early] if early_stop is not None else []
    chunk = decision_chunk(early_stop)
    if "nex" in methods:
        chunk = 1  # NEX reads per-token sets; NAD's chunk sets are their unions (same result)
    logprobs = TOP_LOGPROBS if any(METHODS[m].needs_logprobs for m in methods) else 0
    sampling: Dict[str, Any] = dict(n=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                    reducers=tuple(dict.fromkeys(("contributions", *race_reducers(methods)))),
                                    chunk=chunk, logprobs=logprobs)
    config = dict(n=n, early_stop=early_stop, max_tokens=max_tokens, seed=seed, temperature=temperature, top_p=top_p,
                  top_k=top_k, k=k, template=template, methods=list(methods),
                  neat=None if neat_cal is None else neat_cal.model.get("sha256", "") + ":" + str(neat_cal.neurons),
                  neureasoner=None if nr_cal is None else _nr_key(nr_cal))
    done = _resumable_rows(out, config, model, tasks) if resume and out is not None else {}

    from tqdm.auto import tqdm

    rows: List[Dict[str, Any]] = []
    bar = tqdm(tasks, desc=f"eval n={n}", unit="task", disable=not progress, dynamic_ncols=True)
    for ti, task in enumerate(bar):
        row = done.get(ti)
        if row is None:
            try:
                row = _evaluate_task(model, task, ti, methods, early, early_stop, neat_cal, sampling, k=k, seed=seed,
                                     template=template, nr_cal=nr_cal)
            except (ValueError, RuntimeError) as e:  # this task only (ContextError is a ValueError)
                row = {"id": task.id, "question": task.question, "answer": task.answer,
                       "error": f"{type(e).__name__}: {e}"}
        rows.append(row)
        if out is not None:
            save_report(_report(model, rows, methods, early, neat_cal is not None, config, len(tasks),
                                nr_cal is not None), out)
        ok = [r for r in rows if "error" not in r]
        if ok:
            bar.set_postfix(acc_avg=f"{np.mean([np.mean([x['correct'] for x in r['samples']]) for r in ok]):.2f}",
                            failed=len(rows) - len(ok))
    bar.close()
    return _report(model, rows, methods, early, neat_cal is not None, config, len(tasks), nr_cal is not None)


def _nr_key(cal: Any) -> str:
    """What identifies a NeuReasoner configuration in a report (a resumed run must use the same)."""
    import hashlib
    from dataclasses import asdict

    blob = json.dumps({k: v for k, v in asdict(cal).items() if k != "details"}, sort_keys=True).encode()
    return cal.model.get("sha256", "")[:16] + ":" + hashlib.sha256(blob).hexdigest()[:16]


# What a run with NeuReasoner's corrections can be judged by: its rollbacks cut tokens, so it keeps
# no chunked neuron sets (the set-based selectors need a run without corrections).
NR_METHODS = ("avg", "majority")


def _resumable_rows(out: os.PathLike, config: Dict[str, Any], model: Model, tasks: Sequence[Task]
                    ) -> Dict[int, Dict[str, Any]]:
    """Finished rows of an earlier report at `out`, by task position; ValueError when that report
    was made with another configuration, model or task list (mixing them would be meaningless)."""
    path = Path(out)
    if not path.is_file():
        return {}
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
        old_config, old_rows = old["config"], old["tasks"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--resume: {path} is not a neurotap eval report ({e})") from None
    diff = [key for key, v in config.items() if old_config.get(key) != v]
    if diff or old.get("model", {}).get("path") != model.info.path:
        raise ValueError(f"--resume: {path} was made with another configuration "
                         f"({', '.join(diff) or 'model'} differ); use another --out or drop --resume")
    rows = {}
    for ti, row in enumerate(old_rows):
        if ti >= len(tasks) or row.get("id") != tasks[ti].id:
            raise ValueError(f"--resume: {path} holds other tasks (task {ti} is {row.get('id')!r})")
        if "error" not in row:
            rows[ti] = row
    return rows


def _evaluate_task(model: Model, task: Task, ti: int, methods: Sequence[str], early: Sequence[str],
                   early_stop: Optional[int], neat_cal: Any, sampling: Dict[str, Any], *, k: int, seed: int,
                   template: str, nr_cal: Any = None) -> Dict[str, Any]:
    """One task's row: every method's pick on one full run, the early-stopped run and the NEAT run,
    with what each cost (`cost`)."""
    V = model.info.n_vocab
    prompt = [{"role": "user", "content": format_prompt(task, template)}]
    s_seed = _task_seed(seed, ti)
    cost: Dict[str, Any] = {}
    t0 = time.perf_counter()
    with model.start_sampling(prompt, seed=s_seed, **sampling) as run:
        run.advance()
        samples = run.samples()
    cost["full_seconds"] = time.perf_counter() - t0
    cost["full_tokens"] = run.tokens_sampled
    row: Dict[str, Any] = {"id": task.id, "question": task.question, "answer": task.answer,
                           **_judge(samples, task, methods, k=k, seed=s_seed, n_vocab=V)}
    for rec, na in zip(row["samples"], set_sizes(samples)):
        rec["set_size"] = int(na)
    if early:
        assert early_stop is not None
        t1 = time.perf_counter()
        # The early methods' picks (one or several) go on together in the race's context.
        race_sampling = dict(sampling)  # the same records: NAD's sets and what every method reads
        with NadRace(model, prompt, early_stop=early_stop, seed=s_seed, hand_off=False, **race_sampling) as es:
            es.advance()
            prefix = es.candidates
            early_picks = {m: es.select(m, k=k, seed=s_seed) for m in early}
            es.keep(early_picks.values())
            es.advance()
            final = [es.sample(i) for i in range(es.n)]
        cost["early_seconds"] = time.perf_counter() - t1
        row["early_picks"] = early_picks
        row["early_tokens"] = {}
        row["early_correct"] = {}
        cost["diverged"] = 0
        for m, p in early_picks.items():
            row["early_tokens"][m] = early_stop_tokens(prefix, final, p, early_stop)
            row["early_correct"][m] = is_correct(extract_answer(final[p].text), task.answer)
            cost["diverged"] += final[p].tokens != samples[p].tokens
        row["similarity_early"] = np.round(similarity(prefix, early_stop), 4).tolist()
    if neat_cal is not None:
        t2 = time.perf_counter()
        with model.start_sampling(prompt, seed=s_seed, neat=neat_cal, **sampling) as nr:
            nr.advance()
            ns = nr.samples()
        cost["neat_seconds"] = time.perf_counter() - t2
        cost["neat_tokens"] = nr.tokens_sampled
        row["neat"] = _judge(ns, task, methods, k=k, seed=s_seed, n_vocab=V)
        for rec, s in zip(row["neat"]["samples"], ns):
            rec["exit_at"] = s.neat_exit_at
            rec["bans"] = sum(1 for e in s.neat_events if e[1] == 1)
        # Identical to the run without NEAT up to each sample's first intervention.
        row["neat"]["tokens_saved"] = int(run.tokens_sampled - nr.tokens_sampled)
    if nr_cal is not None:
        t3 = time.perf_counter()
        nr_sampling = {**sampling, "reducers": (), "logprobs": 0}
        with model.start_sampling(prompt, seed=s_seed, neureasoner=nr_cal, **nr_sampling) as rr:
            rr.advance()
            rs = rr.samples()
        cost["neureasoner_seconds"] = time.perf_counter() - t3
        cost["neureasoner_tokens"] = sum(s.n_tokens for s in rs)  # kept tokens
        cost["neureasoner_sampled"] = rr.tokens_sampled           # with the rolled-back ones
        cost["full_kept_tokens"] = sum(s.n_tokens for s in samples)
        row["neureasoner"] = _judge(rs, task, [m for m in methods if m in NR_METHODS], k=k, seed=s_seed, n_vocab=V)
        for rec, s in zip(row["neureasoner"]["samples"], rs):
            rec["events"] = [[int(e[0]), int(e[1]), int(e[2]), round(float(e[3]), 4), int(e[4])]
                             for e in s.neureasoner_events]
            rec["exit_at"] = s.neureasoner_exit_at
    row["similarity"] = np.round(similarity(samples), 4).tolist()
    row["cost"] = cost
    return row


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


def _report(model: Model, rows: List[Dict[str, Any]], methods: Sequence[str], early: Sequence[str], neat_used: bool,
            config: Dict[str, Any], n_planned: int, nr_used: bool = False) -> Dict[str, Any]:
    """The report of the rows so far (complete when every planned task has a row); accuracies
    over the tasks that ran, failed tasks listed with their errors."""
    ok = [r for r in rows if "error" not in r]
    failed = [{"id": r["id"], "error": r["error"]} for r in rows if "error" in r]

    def total(key: str) -> float:
        return sum(r["cost"].get(key, 0) for r in ok)

    table: Dict[str, Dict[str, Any]] = {}

    def entry(scores: List[float], tokens: float, seconds: float, note: str = "") -> Dict[str, Any]:
        lo, hi = bootstrap_ci(np.asarray(scores, dtype=float))
        d = {"accuracy": float(np.mean(scores)), "ci95": [lo, hi], "tokens": int(tokens),
             "tokens_per_task": tokens / len(scores), "seconds": round(seconds, 2)}
        if note:
            d["note"] = note
        return d

    full_tokens, full_seconds = total("full_tokens"), total("full_seconds")
    neat_tokens, neat_seconds = total("neat_tokens"), total("neat_seconds")
    if ok:
        for m in methods:
            table[m] = entry([_score(r, m, r["answer"]) for r in ok], full_tokens, full_seconds)
        if neat_used:
            for m in methods:
                table[f"{m}+neat"] = entry([_score(r["neat"], m, r["answer"]) for r in ok], neat_tokens, neat_seconds)
        if nr_used:
            nr_tokens, nr_seconds = total("neureasoner_sampled"), total("neureasoner_seconds")
            for m in methods:
                if m in NR_METHODS:
                    table[f"{m}+neureasoner"] = entry([_score(r["neureasoner"], m, r["answer"]) for r in ok], nr_tokens,
                                                      nr_seconds, "tokens: sampled, rolled-back ones included")
        for m in early:
            table[f"{m}@{config['early_stop']}"] = entry(
                [float(r["early_correct"][m]) for r in ok], sum(r["early_tokens"][m] for r in ok),
                total("early_seconds"),
                "seconds: the whole early-stopped run, shared by every early method (their picks continue together)")
    info = model.info
    return {
        "version": 1,
        "complete": len(rows) == n_planned,
        "model": {"name": info.name, "path": info.path, "architecture": info.architecture, "n_layers": info.n_layers,
                  "n_ff": info.n_ff},
        "config": {**config, "n_tasks": len(ok)},
        "methods": table,
        "failed_tasks": failed,
        "full_run": {"tokens": int(full_tokens), "seconds": round(full_seconds, 2)},
        "early_run": {"tokens": {m: int(sum(r["early_tokens"][m] for r in ok)) for m in early},
                      "seconds": round(total("early_seconds"), 2),
                      "picks_diverged_from_full_run": int(total("diverged"))} if early else None,
        "neat_run": {"tokens": int(neat_tokens), "seconds": round(neat_seconds, 2),
                     "tokens_saved": int(full_tokens - neat_tokens),
                     "exits": sum(1 for r in ok for s in r["neat"]["samples"] if s["exit_at"] >= 0),
                     "bans": sum(s["bans"] for r in ok for s in r["neat"]["samples"]),
                     "samples": sum(len(r["neat"]["samples"]) for r in ok)} if neat_used else None,
        "neureasoner_run": _nr_summary(ok, total) if nr_used else None,
        "tasks": rows,
    }


def _nr_summary(ok: List[Dict[str, Any]], total: Any) -> Dict[str, Any]:
    """What NeuReasoner did over the tasks: detections and actions by level, tokens against the plain run."""
    counts = {lv: {a: 0 for a in ACTIONS} for lv in LEVELS}
    for r in ok:
        for s in r["neureasoner"]["samples"]:
            for e in s["events"]:
                counts[LEVELS[e[1]]][ACTIONS[e[2]]] += 1
    return {"kept_tokens": int(total("neureasoner_tokens")), "sampled_tokens": int(total("neureasoner_sampled")),
            "plain_kept_tokens": int(total("full_kept_tokens")), "seconds": round(total("neureasoner_seconds"), 2),
            "events": counts, "exits": sum(1 for r in ok for s in r["neureasoner"]["samples"] if s["exit_at"] >= 0),
            "samples": sum(len(r["neureasoner"]["samples"]) for r in ok)}


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
