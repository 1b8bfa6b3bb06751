"""`neurotap rank-models`: rank variants of a model (quantizations, typically) by their mean NEX
score on unlabeled tasks, and, with labels, check that ranking against measured accuracy.

Per variant, every task is sampled n times with per-token activated sets; NEX's neuron weights
come from all of that variant's responses (neurons are the variant's own), and the variant's
score is the mean Good-Mass Fraction of its responses. Same seeds for every variant.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ..core.defaults import SAMPLE
from ..methods.selection import nex_input
from ..runtime.model import load
from ..scoring.answers import extract_answer, is_correct
from ..scoring.nex import nex_scores
from ..scoring.tasks import DEFAULT_PROMPT, Task, format_prompt


def spearman(a: Sequence[float], b: Sequence[float]) -> Optional[float]:
    """Spearman rank correlation (average ranks for ties); None when either side is constant
    (every variant equally accurate, say): the correlation is then undefined, not 0."""
    from scipy.stats import spearmanr

    if len(a) < 2:
        raise ValueError("a rank correlation needs at least two variants")
    if len(set(a)) < 2 or len(set(b)) < 2:
        return None
    return float(spearmanr(a, b).statistic)


def rank_models(paths: Sequence[str], tasks: Sequence[Task], *, n: int = 8, max_tokens: int = 256,
                seed: int = SAMPLE.seed, labels: bool = False, threads: Optional[int] = None,
                temperature: float = SAMPLE.temperature,
                template: str = DEFAULT_PROMPT, progress: bool = True, row: int = 32,
                chat_template: Optional[str] = None) -> Dict[str, Any]:
    from tqdm.auto import tqdm

    if row < 1:
        raise ValueError(f"row must be at least 1 token, got {row}")
    if len(paths) < 2:
        raise ValueError("rank-models needs at least two model variants")
    if not tasks:
        raise ValueError("no tasks")
    variants: List[Dict[str, Any]] = []
    for path in paths:
        t0 = time.perf_counter()
        model = load(path, n_threads=threads, chat_template=chat_template)
        responses, correct = [], []
        bar = tqdm(tasks, desc=Path(path).name, unit="task", disable=not progress, dynamic_ncols=True)
        for i, task in enumerate(bar):
            prompt = [{"role": "user", "content": format_prompt(task, template)}]
            for s in model.sample(prompt, n=n, max_tokens=max_tokens, seed=seed * 1_000_003 + i,
                                  temperature=temperature, reducers=("contributions",), chunk=1):
                responses.append(nex_input(s, row=row))
                correct.append(is_correct(extract_answer(s.text), task.answer))
        scores = nex_scores(responses)
        v = {"model": str(path), "nex": float(np.mean(scores)), "nex_scores": [round(float(x), 5) for x in scores],
             "responses": len(responses), "seconds": round(time.perf_counter() - t0, 1),
             "size_bytes": model.info.size_bytes}
        if labels:
            v["accuracy"] = float(np.mean(correct))
        variants.append(v)
        del model, responses
    order = sorted(range(len(variants)), key=lambda i: -variants[i]["nex"])
    for r, i in enumerate(order):
        variants[i]["nex_rank"] = r + 1
    out: Dict[str, Any] = {"version": 1, "config": {"n": n, "max_tokens": max_tokens, "seed": seed,
                                                    "n_tasks": len(tasks), "temperature": temperature, "row": row},
                           "variants": variants}
    if labels:
        out["spearman_nex_vs_accuracy"] = spearman([v["nex"] for v in variants], [v["accuracy"] for v in variants])
    return out


def format_ranking(rep: Dict[str, Any]) -> str:
    labels = "spearman_nex_vs_accuracy" in rep
    head = "| rank | model | mean NEX (GMF) |" + (" accuracy |" if labels else "")
    lines = [head, "|---|---|---|" + ("---|" if labels else "")]
    for v in sorted(rep["variants"], key=lambda v: v["nex_rank"]):
        acc = f" {v['accuracy']:.3f} |" if labels else ""
        lines.append(f"| {v['nex_rank']} | {Path(v['model']).name} | {v['nex']:.4f} |{acc}")
    if labels:
        rho = rep["spearman_nex_vs_accuracy"]
        lines.append("\nSpearman(NEX, accuracy) = " + (f"{rho:.3f}" if rho is not None else
                                                        "undefined (a ranking is constant)"))
    return "\n".join(lines)
