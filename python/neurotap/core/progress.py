"""Progress bars for long native calls, without Python inside the native loop.

The native call runs on a worker thread with the GIL released; this thread polls its atomic
token counter and draws a tqdm bar. Ctrl-C cancels the native loop at the next token.
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
    if not enabled:
        return fn()
    from tqdm import tqdm

    box: dict = {}

    def work() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # re-raised on the caller's thread
            box["error"] = e

    worker = threading.Thread(target=work, name="neurotap-native", daemon=True)
    with tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr, dynamic_ncols=True) as bar:
        worker.start()
        try:
            while worker.is_alive():
                worker.join(0.1)
                bar.n = poll()
                if postfix is not None:
                    bar.set_postfix(postfix(), refresh=False)
                bar.refresh()
        except KeyboardInterrupt:
            cancel()
            worker.join()
            raise
    if "error" in box:
        raise box["error"]
    return box["value"]
