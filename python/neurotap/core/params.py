"""Checks and normalisation of the parameters shared by generate and sample."""
from __future__ import annotations

import random
from typing import Any, List, Optional, Sequence, Union

import numpy as np


INT32_MAX = 2**31 - 1


def positive_int(name: str, value: Any, limit: int = INT32_MAX) -> int:
    """A positive integer no larger than `limit` (what the native core takes: a C int)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if value > limit:
        raise ValueError(f"{name} must be at most {limit}, got {value}")
    return int(value)


def int_in(name: str, value: Any, lo: int, hi: int) -> int:
    """An integer in [lo, hi)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value < hi:
        raise ValueError(f"{name} {value!r} is out of range: it must be an integer in [{lo}, {hi})")
    return int(value)


def stop_list(stop: Optional[Union[str, Sequence[str]]]) -> List[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


def seed_value(seed: Optional[int]) -> int:
    """A 32-bit seed; None draws one from the OS."""
    if seed is None:
        return random.SystemRandom().randrange(2**32)
    if not 0 <= int(seed) < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    return int(seed)
