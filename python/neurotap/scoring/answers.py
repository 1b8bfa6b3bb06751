"""Numeric answer extraction, checking and majority voting.

A reply's answer is its LAST number: prompts ask for a final "Answer: <number>" line, and models
that ignore the format still tend to end on the result.
"""
from __future__ import annotations

import re
from collections import Counter
from decimal import Decimal, InvalidOperation
from typing import Optional, Sequence, Union

# A number not glued to a preceding digit or '.', so "1.2.3" is not read as ".3". A minus sign
# counts only when it does not follow a word or ")", so "10-3" ends on 3, not -3. Thousands groups
# ("1,234,567") must be complete; decimals need digits, so a sentence-ending "42." is 42.
_NUMBER = re.compile(r"(?<![\d.])((?<![\w)])[-\u2212])?(\d{1,3}(?:,\d{3})+(?!\d)|\d+)(\.\d+)?")


def _canonical(d: Decimal) -> str:
    """"1234", "-3", "2.5": integers without a decimal part, decimals without trailing zeros."""
    if d == d.to_integral_value():
        return str(int(d))  # also turns -0 into 0
    return format(d.normalize(), "f")


def _parse(s: str) -> Optional[Decimal]:
    try:
        return Decimal(s.replace(",", "").replace("\u2212", "-").strip())
    except InvalidOperation:
        return None


def extract_answer(text: str) -> Optional[str]:
    """The last number in `text` in canonical form ("1,234." -> "1234", "4.0" -> "4"), or None."""
    matches = list(_NUMBER.finditer(text))
    if not matches:
        return None
    d = _parse(matches[-1].group(0))
    return None if d is None else _canonical(d)


def is_correct(pred: Optional[str], gold: Union[str, int, float]) -> bool:
    """Whether a predicted answer equals the gold one numerically ("2.50" == 2.5). None is wrong."""
    if pred is None:
        return False
    p = _parse(pred)
    if isinstance(gold, str):
        g_text = extract_answer(gold)  # tolerate "1,234" or "$12" in task files
        g = None if g_text is None else _parse(g_text)
    else:
        g = _parse(repr(gold))  # repr keeps float 0.1 as "0.1", not its binary expansion
    return p is not None and g is not None and p == g


def majority_vote(answers: Sequence[Optional[str]]) -> Optional[str]:
    """The most frequent non-None answer; None when nothing was extracted or the top count is tied
    (a tie is a failure to decide, not a coin flip)."""
    counts = Counter(a for a in answers if a is not None).most_common()
    if not counts or (len(counts) > 1 and counts[0][1] == counts[1][1]):
        return None
    return counts[0][0]


def majority_index(answers: Sequence[Optional[str]]) -> Optional[int]:
    """The index of the first sample carrying the majority answer; None on a tie or no answers."""
    winner = majority_vote(answers)
    return None if winner is None else list(answers).index(winner)


__all__ = ["extract_answer", "is_correct", "majority_vote", "majority_index"]
