"""Evaluation tasks: a JSONL loader with line-precise errors and a shipped arithmetic generator."""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import Optional, Union

from .answers import extract_answer


@dataclass(frozen=True)
class Task:
    id: str
    question: str
    answer: str


#: Asks for a fixed final line so answers.extract_answer finds the number last.
# Measured on SmolLM2-135M-Instruct (12 arith tasks x 8 samples): this wording gives 15% correct
# samples; "think step by step" gave 4% (the model rambles and never concludes).
DEFAULT_PROMPT = "{question}\nReply with one line: Answer: <number>"
#: Asks for written steps (what NeuReasoner watches and corrects), still ending on the answer line.
REASONING_PROMPT = ("{question}\nSolve it step by step, writing one calculation per line, "
                    "then end with the line: Answer: <number>")
TEMPLATES = {"default": DEFAULT_PROMPT, "reasoning": REASONING_PROMPT}


def resolve_template(template: str) -> str:
    """A template name ("default", "reasoning") or a template containing {question}."""
    t = TEMPLATES.get(template, template)
    if "{question}" not in t:
        raise ValueError(f"prompt template must be one of {', '.join(TEMPLATES)} or contain '{{question}}', got {template!r}")
    return t


def format_prompt(task: Task, template: str = DEFAULT_PROMPT) -> str:
    """The template with `{question}` replaced. A plain replace, not str.format, so templates may
    contain other braces (JSON, LaTeX) without escaping."""
    if "{question}" not in template:
        raise ValueError("prompt template must contain '{question}'")
    return template.replace("{question}", task.question)


def _field(obj: dict, key: str, where: str) -> str:
    if key not in obj or obj[key] is None:
        raise ValueError(f"{where}: missing key '{key}'")
    value = obj[key]
    if isinstance(value, (dict, list, bool)):
        raise ValueError(f"{where}: '{key}' must be a string or number, got {type(value).__name__}")
    text = str(value)
    if not text.strip():
        raise ValueError(f"{where}: empty '{key}'")
    return text


def load_jsonl(path: Union[str, os.PathLike]) -> list[Task]:
    """Tasks from lines {"id": ..., "question": ..., "answer": ...}; blank lines are skipped.

    Errors name `path:line` so a bad line in a long file is found at once.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"task file not found: {path}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory, not a JSONL task file")
    tasks: list[Task] = []
    first_line: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            if "question" in obj and obj["question"] is not None and not isinstance(obj["question"], str):
                raise ValueError(f"{where}: 'question' must be a string, got {type(obj['question']).__name__}")
            task = Task(id=_field(obj, "id", where), question=_field(obj, "question", where),
                        answer=_field(obj, "answer", where))
            if extract_answer(task.answer) is None:
                raise ValueError(f"{where}: answer {task.answer!r} holds no number: answers are checked "
                                 "numerically (the last number of the reply)")
            if task.id in first_line:
                raise ValueError(f"{where}: duplicate id '{task.id}' (first on line {first_line[task.id]})")
            first_line[task.id] = lineno
            tasks.append(task)
    if not tasks:
        raise ValueError(f"{path}: no tasks (the file is empty)")
    return tasks


_NAMES = ["Tom", "Maria", "Ali", "Sofia", "Ken", "Lena", "Omar", "Priya", "Jack", "Mei"]
_OBJECTS = ["apples", "marbles", "stickers", "books", "pencils", "cards", "coins", "shells"]
# Sums: none of these contain "left", the word that marks a difference (the tests rely on it).
_SUM_TEMPLATES = [
    "{name} has {a} {obj} and buys {b} more. How many {obj} does {name} have now?",
    "{name} collected {a} {obj} on Monday and {b} {obj} on Tuesday. How many {obj} did {name} collect in total?",
    "A box holds {a} {obj}. {name} puts {b} more {obj} into it. How many {obj} are in the box now?",
    "{name} had {a} {obj}. A friend gave {name} {b} more. How many {obj} does {name} have?",
    "There are {a} {obj} on the table and {name} brings {b} more. How many {obj} are on the table?",
]
# Differences: every one ends with "left?".
_DIFF_TEMPLATES = [
    "{name} has {a} {obj} and gives away {b}. How many {obj} does {name} have left?",
    "{name} had {a} {obj} and lost {b} of them. How many {obj} are left?",
    "A shop had {a} {obj} and sold {b}. How many {obj} does the shop have left?",
]
_DIFF_SHARE = 0.25  # sums stay the clear majority


def arith(n: int = 50, seed: int = 0) -> list[Task]:
    """`n` seeded two-operand word problems (operands 10..99, integer answers, mostly sums).

    Uses its own random.Random(seed), never the global state, so a seed always gives the same list.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    tasks = []
    for i in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        name, obj = rng.choice(_NAMES), rng.choice(_OBJECTS)
        if rng.random() < _DIFF_SHARE:
            a, b = max(a, b), min(a, b)  # a non-negative result
            template, answer = rng.choice(_DIFF_TEMPLATES), a - b
        else:
            template, answer = rng.choice(_SUM_TEMPLATES), a + b
        question = template.format(name=name, obj=obj, a=a, b=b)
        tasks.append(Task(id=f"arith-{i:04d}", question=question, answer=str(answer)))
    return tasks


def resolve_tasks(spec: str, limit: Optional[int], seed: int) -> list[Task]:
    """"arith" -> the generator (`limit` problems, 50 by default); anything else -> a JSONL path,
    cut to its first `limit` tasks."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if spec == "arith":
        return arith(50 if limit is None else limit, seed)
    return load_jsonl(spec)[:limit]


__all__ = ["Task", "DEFAULT_PROMPT", "format_prompt", "load_jsonl", "arith", "resolve_tasks"]
