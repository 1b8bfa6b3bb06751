"""Checks and normalisation of the parameters shared by generate and sample."""
from __future__ import annotations

import random
from typing import Any, List, Optional, Sequence, Union

import numpy as np


def positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
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
