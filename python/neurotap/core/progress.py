"""Long native calls with an optional progress bar, interruptible, without Python inside the
native loop.

The native call runs on the caller's own thread (llama.cpp's OpenMP thread team belongs to the
thread that decodes: moving the decode to another thread, even a persistent one, was measured to
halve decode speed here). Between decode steps the native loop checks for a pending Ctrl-C
(bindings.cpp), stops, and the KeyboardInterrupt arrives once it has stopped: nothing goes on
decoding in the background. A bar, when shown, is drawn by a small thread that only polls the
loop's atomic token counter.
"""
from __future__ import annotations

import sys
import threading
from typing import Callable, Optional, TypeVar

T = TypeVar("T")


def run_with_progress(fn: Callable[[], T], poll: Callable[[], int], total: int, desc: str, unit: str = "tok",
                      enabled: Optional[bool] = None,
                      postfix: Optional[Callable[[], dict]] = None) -> T:
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return fn()
    from tqdm import tqdm

    done = threading.Event()
    bar = tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr, dynamic_ncols=True)

    def draw() -> None:
        while not done.wait(0.1):
            bar.n = poll()
            if postfix is not None:
                bar.set_postfix(postfix(), refresh=False)
            bar.refresh()

    drawer = threading.Thread(target=draw, name="neurotap-progress", daemon=True)
    drawer.start()
    try:
        return fn()
    finally:
        done.set()
        drawer.join()
        bar.close()
