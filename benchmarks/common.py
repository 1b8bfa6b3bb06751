"""What the benchmarks share: each model measured in a process of its own (the memory of one model
must not carry into the next), and the rows saved atomically."""
from __future__ import annotations

import json
import subprocess
import sys
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
