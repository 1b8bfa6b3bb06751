"""The HTTP side: the FastAPI app (/v1/chat/completions, /v1/completions, /v1/models, /health,
/metrics), its door (API key, request counts) and `serve`, which runs it with uvicorn."""
from __future__ import annotations

import asyncio
import hmac
import json
from typing import Any, Dict, List, Optional

from starlette.requests import Request  # module level: FastAPI reads the endpoints' annotations by name

from ...runtime.model import Model
from .engine import Job, QueueFull, Server
from .metrics import CONTENT_TYPE, Metrics
from .protocol import RequestError, decode_body, error_body, format_response
from .streaming import sse_events


class Door:
    """ASGI middleware in front of every route: with an API key, /v1/* and /metrics answer only a
    request that carries `Authorization: Bearer KEY` (401 in OpenAI's format otherwise; /health
    stays open for load balancers); every answer is counted by route and status for /metrics."""

    def __init__(self, app: Any, metrics: Metrics, api_key: Optional[str]):
        self.app, self.metrics = app, metrics
        self.key = api_key.encode("utf-8") if api_key else None

    def _allowed(self, scope: Dict[str, Any]) -> bool:
        path = scope.get("path", "")
        if self.key is None or not (path.startswith("/v1") or path == "/metrics"):
            return True
        auth = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = auth.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)

    async def __call__(self, scope: Dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if not self._allowed(scope):
            body = json.dumps(error_body("Incorrect or missing API key: send it as 'Authorization: Bearer KEY'",
                                         "invalid_request_error", None, "invalid_api_key")).encode()
            await send({"type": "http.response.start", "status": 401,
                        "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            self.metrics.count(path, 401)
            return
        started = False

        async def counted(message: Dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.metrics.count(path, message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counted)
        except Exception:
            if not started:  # Starlette's outer handler answers 500 (in OpenAI's format, see create_app)
                self.metrics.count(path, 500)
            raise


def create_app(srv: Server, api_key: Optional[str] = None) -> Any:
    """The FastAPI app of the endpoints on a Server (started and stopped with the app); with
    `api_key`, /v1/* and /metrics need it as a Bearer token."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from sse_starlette.sse import EventSourceResponse
    from starlette.exceptions import HTTPException

    @asynccontextmanager
    async def lifespan(app: Any) -> Any:
        srv.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, srv.stop)

    app = FastAPI(title="neurotap", lifespan=lifespan)
    metrics = Metrics()
    app.add_middleware(Door, metrics=metrics, api_key=api_key)

    def err(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> Any:
        kind = "invalid_request_error" if status < 500 else "server_error"
        headers = {"Retry-After": "1"} if status == 503 else None
        return JSONResponse(error_body(message, kind, param, code), status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Any, exc: Any) -> Any:
        return err(400, str(exc))

    @app.exception_handler(HTTPException)
    async def _http(request: Any, exc: Any) -> Any:
        return err(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def _bug(request: Any, exc: Exception) -> Any:  # a server bug: still OpenAI's format, never bare
        return err(500, f"{type(exc).__name__}: {exc}")

    @app.get("/health")
    async def health() -> Any:
        return srv.health()

    @app.get("/metrics")
    async def scrape() -> Any:
        from starlette.responses import Response

        return Response(metrics.render(srv), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> Any:
        i = srv.model.info
        return {"object": "list", "data": [{"id": srv.name, "object": "model", "created": srv.created,
                                            "owned_by": "neurotap",
                                            "meta": {"path": i.path, "architecture": i.architecture,
                                                     "n_ctx": srv.model.n_ctx, "n_layers": i.n_layers, "n_ff": i.n_ff,
                                                     "n_vocab": i.n_vocab, "n_params": i.n_params,
                                                     "chat_template": srv.model.chat_template,
                                                     "neat": sorted(srv.neat)}}]}

    async def handle(request: Request, kind: str) -> Any:
        try:
            req = srv.parse(decode_body(await request.body()), kind)
        except RequestError as e:
            return err(e.status, str(e), e.param, e.code)
        except (ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError, RecursionError) as e:
            # A body the checks let through that the template or the tokenizer cannot take: still
            # the client's (a 400 naming what failed), not a 500.
            return err(400, f"the request could not be read: {type(e).__name__}: {e}")
        job = Job(req, asyncio.get_running_loop())
        try:
            srv.submit(job)
        except QueueFull as e:
            return err(503, str(e), code="queue_full")
        if req.stream:
            return EventSourceResponse(sse_events(job, srv.name, srv.piece), sep="\n", ping=15)
        try:
            while True:
                try:
                    kind_, payload = await asyncio.wait_for(job.events.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        job.cancel()
                        return err(499, "client disconnected", code="cancelled")
                    continue
                if kind_ == "done":
                    return format_response(job, payload, srv.name, srv.piece)
                if kind_ == "error":
                    if isinstance(payload, RequestError):
                        return err(payload.status, str(payload), payload.param, payload.code)
                    return err(500, f"{type(payload).__name__}: {payload}")
        finally:
            if not job.finished:
                job.cancel()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await handle(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await handle(request, "completion")

    return app


def _named(items: List[str], flag: str, load: Any, model: Model) -> Dict[str, Any]:
    """NAME=PATH items (a bare path, or 'default', names itself), each loaded for the model."""
    out: Dict[str, Any] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            path = name
        if not name or not path:
            raise ValueError(f"{flag} takes NAME=PATH, got {item!r}")
        out[name] = load(path, model)
    return out


def parse_neat_args(items: List[str], model: Model) -> Dict[str, Any]:
    """--neat NAME=PATH (or 'default'): calibrations resolved for the model at start."""
    from ...methods.neat import load_calibration

    return _named(items, "--neat", load_calibration, model)


def parse_neureasoner_args(items: List[str], model: Model) -> Dict[str, Any]:
    """--neureasoner NAME=PATH: NeuReasoner calibrations resolved for the model at start."""
    from ...methods.neureasoner import load_calibration

    return _named(items, "--neureasoner", load_calibration, model)


def serve(model: Model, *, host: str = "127.0.0.1", port: int = 8080, name: Optional[str] = None,
          neat: Optional[Dict[str, Any]] = None, max_queue: int = 64, log_level: str = "warning",
          neureasoner: Optional[Dict[str, Any]] = None, api_key: Optional[str] = None, parallel: int = 4,
          reuse_prompt: Any = "exact", cache_ram: int = 2048) -> None:
    import sys

    import uvicorn

    srv = Server(model, name=name or model.info.name, neat=neat, max_queue=max_queue, neureasoner=neureasoner,
                 parallel=parallel, reuse_prompt=reuse_prompt, cache_ram=cache_ram)
    app = create_app(srv, api_key=api_key)
    print(f"neurotap serve: {srv.name} on http://{host}:{port}/v1 (max queue {max_queue}"
          f"{', NEAT: ' + ', '.join(sorted(srv.neat)) if srv.neat else ''}"
          f"{', NeuReasoner: ' + ', '.join(sorted(srv.neureasoner)) if srv.neureasoner else ''}"
          f"{', API key required' if api_key else ''})", file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
