"""/metrics in Prometheus' text exposition format (version 0.0.4), written here: a few counters
and gauges need no client library. Requests are counted by route and status as they answer;
tokens, NAD decisions and reused prompt cells come from Server.stats, the queue and the
sequences in flight from the Server when scraped."""
from __future__ import annotations

import threading
from typing import Any, Dict, List, Tuple

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Metrics:
    """Request counts by (route, status); the rest is read from the Server at scrape time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: Dict[Tuple[str, str], int] = {}

    def count(self, path: str, status: int) -> None:
        route = path if path in ROUTES else "other"  # unknown paths: one series, not one per path
        with self._lock:
            key = (route, str(int(status)))
            self._requests[key] = self._requests.get(key, 0) + 1

    def render(self, srv: Any) -> str:
        with self._lock:
            requests = sorted(self._requests.items())
        stats = srv.stats_snapshot()
        out: List[str] = []

        def metric(name: str, kind: str, help_: str, samples: List[Tuple[Dict[str, str], float]]) -> None:
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                lab = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
                out.append(f"{name}{{{lab}}} {value:g}" if lab else f"{name} {value:g}")

        metric("neurotap_requests_total", "counter", "HTTP requests answered, by route and status code.",
               [({"route": r, "status": s}, n) for (r, s), n in requests])
        metric("neurotap_jobs_total", "counter", "Generation requests that reached the engine, by outcome.",
               [({"outcome": k}, stats.get(k, 0)) for k in ("completed", "cancelled", "failed", "rejected")])
        metric("neurotap_prompt_tokens_total", "counter", "Prompt tokens of completed requests.",
               [({}, stats.get("prompt_tokens", 0))])
        metric("neurotap_completion_tokens_total", "counter",
               "Tokens sampled for completed requests (every sample, NAD's losers included).",
               [({}, stats.get("completion_tokens", 0))])
        metric("neurotap_prompt_cells_reused_total", "counter",
               "Prompt tokens whose KV cells were reused instead of evaluated again.",
               [({}, stats.get("reused_cells", 0))])
        metric("neurotap_prompt_cache_restores_total", "counter",
               "Saved prompt cells moved back into a slot for a request that reuses them (--cache-ram).",
               [({}, stats.get("prompt_cache_restores", 0))])
        metric("neurotap_prompt_cache_bytes", "gauge", "Host memory held by saved prompt cells (--cache-ram).",
               [({}, stats.get("prompt_cache_bytes", 0))])
        metric("neurotap_joint_prompt_decodes_total", "counter",
               "Decodes that evaluated the prompts of several joining requests together.",
               [({}, stats.get("joint_prompt_decodes", 0))])
        metric("neurotap_nad_decisions_total", "counter", "NAD best-of-N races decided.",
               [({}, stats.get("nad_decisions", 0))])
        metric("neurotap_queue_depth", "gauge", "Requests waiting for the engine.", [({}, srv.queue_depth())])
        metric("neurotap_sequences_in_flight", "gauge", "Sequences decoding now, all requests.",
               [({}, srv.sequences_in_flight())])
        return "\n".join(out) + "\n"
