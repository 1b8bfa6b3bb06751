"""Token-level failure labels of reasoning traces, without an LLM judge (NeuReasoner's calibration).

The three levels of NeuReasoner (arXiv 2604.02972), labelled from text a program can check:
- intra-step: a stated calculation whose result is wrong ("19 + 2 = 31"): its tokens, from the
  expression's start through its result;
- inter-step: a step that repeats or circles back: a calculation already written earlier in the
  trace, or a line equal (case, spacing and punctuation aside) to an earlier one;
- instance: overthinking: every token after the line where the correct answer was first stated
  as a result ("= 122", "is 122", "Answer: 122"), when the trace goes on for at least
  `min_after` tokens more.

Labellers are pluggable: `register_labeller(name, fn)` with fn(text, ends, answer) -> {level: bool
array over tokens}, where ends[j] is the end offset of token j in `text`. "arith" is the one for
arithmetic word problems (neurotap's `arith` tasks and numeric JSONL tasks).
"""
from __future__ import annotations

import ast
import operator
import re
from decimal import Decimal, InvalidOperation
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

LEVELS = ("intra", "inter", "instance")
Labeller = Callable[[str, Sequence[int], str], Dict[str, np.ndarray]]

# An arithmetic expression of numbers, + - * x × / and parentheses, "=", then a number.
_NUM = r"\d+(?:,\d{3})*(?:\.\d+)?"
_EQUATION = re.compile(rf"((?:\(\s*)*{_NUM}(?:\s*\)*\s*[-+*/×x÷]\s*(?:\(\s*)*{_NUM}\s*\)*)+)\s*=\s*(-?{_NUM})")
_RESULT = re.compile(rf"(?:=|\bis\b|[Aa]nswer\s*(?:is)?\s*:?)\s*\$?\s*(-?{_NUM})")
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _value(expr: str) -> Optional[Decimal]:
    """The exact value of a + - * / expression of decimals, or None (malformed, division by zero)."""
    src = expr.replace(",", "").replace("×", "*").replace("x", "*").replace("÷", "/")

    def ev(node: ast.AST) -> Decimal:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return Decimal(str(node.value))
        raise ValueError("not arithmetic")

    try:
        return ev(ast.parse(src, mode="eval"))
    except (SyntaxError, ValueError, ArithmeticError, InvalidOperation, RecursionError):
        return None


def _dec(s: str) -> Optional[Decimal]:
    try:
        return Decimal(s.replace(",", ""))
    except InvalidOperation:
        return None


def _tokens_in(ends: Sequence[int], a: int, b: int) -> Tuple[int, int]:
    """Indices [i, j) of the tokens overlapping text span [a, b)."""
    e = np.asarray(ends)
    starts = np.concatenate([[0], e[:-1]]) if len(e) else e
    i = int(np.searchsorted(e, a, side="right"))
    j = int(np.searchsorted(starts, b, side="left"))
    return i, max(i, j)


def _norm_line(line: str) -> str:
    return re.sub(r"[\W_]+", "", line.lower())


def label_arith(text: str, ends: Sequence[int], answer: str, *, min_after: int = 8) -> Dict[str, np.ndarray]:
    """Token labels per level for an arithmetic trace (see the module docstring)."""
    n = len(ends)
    out = {level: np.zeros(n, dtype=bool) for level in LEVELS}
    seen_eq = set()
    for m in _EQUATION.finditer(text):
        lhs, rhs = m.group(1), m.group(2)
        v, r = _value(lhs), _dec(rhs)
        key = re.sub(r"\s+", "", lhs) + "=" + rhs
        i, j = _tokens_in(ends, m.start(), m.end())
        if v is not None and r is not None and abs(v - r) > Decimal("1e-6") * max(Decimal(1), abs(v)):
            out["intra"][i:j] = True
        if key in seen_eq:
            out["inter"][i:j] = True
        seen_eq.add(key)
    seen_lines = set()
    pos = 0
    for line in text.split("\n"):
        key = _norm_line(line)
        if len(key) >= 8:
            if key in seen_lines:
                i, j = _tokens_in(ends, pos, pos + len(line))
                out["inter"][i:j] = True
            seen_lines.add(key)
        pos += len(line) + 1
    gold = _dec(answer.strip().replace("$", "")) if answer else None
    if gold is not None:
        for m in _RESULT.finditer(text):
            d = _dec(m.group(1))
            if d is not None and d == gold:
                line_end = text.find("\n", m.end())
                line_end = len(text) if line_end < 0 else line_end
                first = _tokens_in(ends, line_end, line_end + 1)[0]
                if n - first >= min_after:
                    out["instance"][first:] = True
                break
    return out


LABELLERS: Dict[str, Labeller] = {"arith": label_arith}


def register_labeller(name: str, fn: Labeller) -> None:
    """Make a labeller available to `neurotap neureasoner calibrate --labeller NAME`."""
    if not name or not callable(fn):
        raise ValueError("register_labeller needs a name and a callable")
    LABELLERS[name] = fn


def get_labeller(name: str) -> Labeller:
    if name not in LABELLERS:
        raise ValueError(f"unknown labeller {name!r}; available: {', '.join(sorted(LABELLERS))}")
    return LABELLERS[name]


def token_ends(pieces: Sequence[bytes]) -> Tuple[str, List[int]]:
    """The text of the tokens' byte pieces and each token's end offset in it (a character split
    over tokens ends with its last byte)."""
    import codecs

    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    parts, out, pos = [], [], 0
    for p in pieces:
        s = dec.decode(p)
        parts.append(s)
        pos += len(s)
        out.append(pos)
    tail = dec.decode(b"", final=True)
    if tail:
        parts.append(tail)
        if out:
            out[-1] += len(tail)
    return "".join(parts), out


__all__ = ["LEVELS", "label_arith", "register_labeller", "get_labeller", "LABELLERS", "token_ends"]
