"""What the benchmarks share: each model measured in a process of its own (the memory of one model
must not carry into the next), and the rows saved atomically."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from typing import Any, Dict, Iterator, List, Sequence


def rows_per_model(script: str, models: Sequence[str], args: Sequence[str]) -> Iterator[Dict[str, Any]]:
    """Runs `script --one MODEL *args` for each model; each prints its row as the last JSON line."""
    for model in models:
        r = subprocess.run([sys.executable, script, "--one", model, *args], capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(r.stderr[-3000:])
        yield json.loads(r.stdout.strip().splitlines()[-1])


def save_rows(path: str, rows: List[Dict[str, Any]]) -> None:
    from neurotap.core.io import write_atomic

    write_atomic(path, json.dumps({"time": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}, indent=1).encode())


def status_mb(field: str) -> float:
    """A field of /proc/self/status in MiB (RssAnon: private resident memory; VmHWM: peak resident)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def rss_anon_mb() -> float:
    return status_mb("RssAnon")


class PeakAnon:
    """Polls RssAnon (peak: private memory) and VmRSS (peak_rss: resident, mapped weights included)
    every 20 ms while a run is in flight."""

    def __enter__(self) -> "PeakAnon":
        self.peak, self.peak_rss, self._stop = rss_anon_mb(), status_mb("VmRSS"), threading.Event()
        self._t = threading.Thread(target=self._poll, daemon=True)
        self._t.start()
        return self

    def _read(self) -> None:
        self.peak = max(self.peak, rss_anon_mb())
        self.peak_rss = max(self.peak_rss, status_mb("VmRSS"))

    def _poll(self) -> None:
        while not self._stop.wait(0.02):
            self._read()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self._read()
