"""Long native calls, interruptible and with an optional progress bar, without Python inside the
native loop.

The native call always runs on a worker thread with the GIL released; this thread waits for it in
short slices, so Ctrl-C is seen at once (a call on the main thread would only see it when the
native loop returns). On Ctrl-C the native loop is told to cancel, and this thread waits until it
has stopped before re-raising: nothing goes on decoding in the background, and the next call on
the same model finds its context idle. With a bar, it polls the loop's atomic token counter.
"""
from __future__ import annotations

import sys
import threading
from typing import Callable, Optional, TypeVar

T = TypeVar("T")


def run_with_progress(fn: Callable[[], T], poll: Callable[[], int], cancel: Callable[[], None],
                      total: int, desc: str, unit: str = "tok", enabled: Optional[bool] = None,
                      postfix: Optional[Callable[[], dict]] = None) -> T:
    if enabled is None:
        enabled = sys.stderr.isatty()
    box: dict = {}

    def work() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # re-raised on the caller's thread
            box["error"] = e

    worker = threading.Thread(target=work, name="neurotap-native", daemon=True)
    bar = None
    if enabled:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr, dynamic_ncols=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.1)
            if bar is not None:
                bar.n = poll()
                if postfix is not None:
                    bar.set_postfix(postfix(), refresh=False)
                bar.refresh()
    except KeyboardInterrupt:
        cancel()
        _join_through_interrupts(worker)
        raise
    finally:
        if bar is not None:
            bar.close()
    if "error" in box:
        raise box["error"]
    return box["value"]


def _join_through_interrupts(worker: threading.Thread) -> None:
    """Waits for the cancelled native loop to stop (within one decode step), even through more
    Ctrl-C presses: returning earlier would leave it decoding in a context the caller may reuse."""
    while worker.is_alive():
        try:
            worker.join()
        except KeyboardInterrupt:
            continue
