"""The HTTP side: the FastAPI app (/v1/chat/completions, /v1/completions, /v1/models, /health)
and `serve`, which runs it with uvicorn."""
from __future__ import annotations

import asyncio
import json
from typing import Any, Dict, List, Optional

from starlette.requests import Request  # module level: FastAPI reads the endpoints' annotations by name

from ...runtime.model import Model
from .engine import Job, QueueFull, Server
from .protocol import RequestError, error_body, format_response
from .streaming import sse_events


def create_app(srv: Server) -> Any:
    """The FastAPI app of the endpoints on a Server (started and stopped with the app)."""
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

    @app.get("/health")
    async def health() -> Any:
        return srv.health()

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
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as e:
            return err(400, f"the request body is not valid JSON: {e}")
        try:
            req = srv.parse(body, kind)
        except RequestError as e:
            return err(e.status, str(e), e.param, e.code)
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


def parse_neat_args(items: List[str], model: Model) -> Dict[str, Any]:
    """--neat NAME=PATH (or 'default'): calibrations resolved for the model at start."""
    from ...methods.neat import load_calibration

    out: Dict[str, Any] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:  # a bare path (or 'default') names itself
            path = name
        if not name or not path:
            raise ValueError(f"--neat takes NAME=PATH, got {item!r}")
        out[name] = load_calibration(path, model)
    return out


def serve(model: Model, *, host: str = "127.0.0.1", port: int = 8080, name: Optional[str] = None,
          neat: Optional[Dict[str, Any]] = None, max_queue: int = 64, log_level: str = "warning", parallel: int = 4,
          reuse_prompt: bool = True) -> None:
    import sys

    import uvicorn

    srv = Server(model, name=name or model.info.name, neat=neat, max_queue=max_queue, parallel=parallel,
                 reuse_prompt=reuse_prompt)
    app = create_app(srv)
    print(f"neurotap serve: {srv.name} on http://{host}:{port}/v1 (max queue {max_queue}"
          f"{', NEAT: ' + ', '.join(sorted(srv.neat)) if srv.neat else ''})", file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
