"""`neurotap serve`: an OpenAI-compatible HTTP server on one model (FastAPI + uvicorn +
sse-starlette, as llama-cpp-python's server).

/v1/chat/completions, /v1/completions, /v1/models, /health, /metrics (Prometheus). `n` samples
decode as one parallel batch and stream as OpenAI's indexed choices; extra body fields add NAD
best-of-N ("nad": {"n", "method", "early_stop", "k"}), NEAT ("neat": "default" or a calibration
named at start), NeuReasoner ("neureasoner": a calibration named at start), a reasoning budget
("reasoning_budget": N tokens of thinking before "</think>" is forced) and "ignore_eos";
logit_bias and (completions) echo are OpenAI's; chat answers of models that think in
<think>...</think> come with "reasoning_content". --api-key guards /v1/* and /metrics.

All native work runs on one worker thread, which decodes the running requests together in one
batch (continuous batching over --parallel sequence slots of one context); requests wait in a
bounded queue (--max-queue) and get a 503 when it is full. Prompts reuse the KV cells a slot
holds (--prompt-reuse) or that a host-memory prompt cache kept when a slot was taken (--cache-ram). A client that disconnects cancels its request: a waiting one is dropped, a running one's native decode
loop is told to stop at its next step.

The package: protocol (requests, OpenAI's formats), engine (the worker and its runs),
prompt_cache (slots' cells saved aside), streaming (deltas and server-sent events), routes (the
FastAPI app and `serve`), metrics (/metrics).
"""
from .engine import Cancelled, Job, QueueFull, Server
from .protocol import FINISH, FORCED_CLOSE, THINK_CLOSE, THINK_OPEN, GenRequest, RequestError, format_response, split_reasoning
from .routes import create_app, parse_neat_args, parse_neureasoner_args, serve
from .streaming import Streamer, sse_events

__all__ = ["Server", "Job", "QueueFull", "Cancelled", "GenRequest", "RequestError", "FINISH", "FORCED_CLOSE",
           "THINK_OPEN", "THINK_CLOSE", "format_response", "split_reasoning", "create_app", "parse_neat_args",
           "parse_neureasoner_args", "serve", "Streamer", "sse_events"]
