"""The HTTP app of ``fedmart serve``: FastAPI over one :class:`~serving.engine.Server`, run by uvicorn.

``create_app`` loads the model (raising :class:`ServeError`) and wires the pieces: the
endpoints (:mod:`serving.routes`), the micro-batcher and its inference thread, the
poller that hot-swaps newly promoted versions and signed catalogs, the title index built in the background,
a body-size limit, and the mapping of every error to an ``ErrorResponse`` body.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.batching import MicroBatcher
from serving.config import ServeConfig, ServeError
from serving.engine import Server
from serving.routes import Routes, add_routes, key_guard
from serving.schemas import ErrorResponse, error_response

__all__ = ["MAX_BODY_BYTES", "create_app", "serve_in_thread", "run_http"]

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20


def create_app(config: ServeConfig, *, server: Server | None = None) -> FastAPI:
    """The FastAPI app. Loads the model now (raising :class:`ServeError`), starts workers on startup."""
    server = server or Server(config)
    executor = ThreadPoolExecutor(1, thread_name_prefix="fedmart-infer")
    batcher = MicroBatcher(server.run_batch, executor, config.max_batch)
    app = FastAPI(
        title="fedmart",
        summary="Recommendations and search from a federated, differentially private model.",
        version="1",
        lifespan=_lifespan(config, server, batcher, executor),
        responses={
            400: {"model": ErrorResponse},
            401: {"model": ErrorResponse},
            413: {"model": ErrorResponse},
            422: {"model": ErrorResponse},
        },
    )
    app.state.server = server
    app.state.batcher = batcher
    app.add_middleware(_BodyLimit, limit=MAX_BODY_BYTES)
    app.add_exception_handler(RequestValidationError, _on_invalid)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(Exception, _on_bug)
    add_routes(app, Routes(server, batcher, executor), key_guard(config.api_key))
    return app


# --- workers: the batcher, the promotion poller, the title index ---------------------------------


def _lifespan(
    config: ServeConfig, server: Server, batcher: MicroBatcher, executor: ThreadPoolExecutor
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        tasks = [asyncio.get_running_loop().create_task(_poll(server, config.reload_interval))]
        if config.search and server.text_available():
            server.text_state = "building"
            tasks.append(asyncio.get_running_loop().run_in_executor(None, server.build_text_index))
        try:
            yield
        finally:
            for t in tasks:
                t.cancel()
            await batcher.stop()
            executor.shutdown(wait=False, cancel_futures=True)

    return lifespan


async def _poll(server: Server, interval: float) -> None:
    """Every ``interval`` seconds, swap in a newly promoted version or signed catalog (off the event loop)."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(interval)
        try:
            await loop.run_in_executor(None, server.maybe_reload)
        except Exception:
            log.exception("checking for a new version or catalog failed; still serving %s", server.snapshot.version)


# --- errors: every failure is an ErrorResponse ----------------------------------------------------


async def _on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    status, msg = _validation_message(exc)
    detail = [
        {"loc": [str(x) for x in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
        for e in exc.errors()[:20]
    ]
    return error_response(status, msg, detail)


async def _on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    msg = exc.detail if isinstance(exc.detail, str) else "request failed"
    if exc.status_code == 404 and msg == "Not Found":
        msg = f"no such endpoint: {request.method} {request.url.path}; see /docs"
    elif exc.status_code == 405:
        msg = f"{request.method} is not allowed on {request.url.path}; see /docs"
    return error_response(exc.status_code, msg, headers=getattr(exc, "headers", None))


async def _on_bug(request: Request, exc: Exception) -> JSONResponse:
    log.exception("internal error on %s %s", request.method, request.url.path)
    return error_response(500, "internal error; see the server log")


def _validation_message(exc: RequestValidationError) -> tuple[int, str]:
    """400 for a body that is not JSON; 422 naming the first five invalid fields otherwise."""
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        e = next(e for e in errors if e.get("type") == "json_invalid")
        ctx = e.get("ctx") or {}
        return 400, f"malformed JSON body: {ctx.get('error', e.get('msg', 'invalid'))}"
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    more = f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""
    return 422, "; ".join(parts) + more


class _BodyLimit:
    """Pure ASGI middleware: 413 for bodies over ``limit`` bytes, declared or streamed."""

    def __init__(self, app: Callable, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.limit
                except ValueError:
                    too_big = False
                if too_big:
                    return await self._refuse(scope, receive, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return msg

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: dict, receive: Callable, send: Callable) -> None:
        await error_response(413, f"request body over {self.limit} bytes")(scope, receive, send)


class _TooLarge(Exception):
    pass


# --- running it ----------------------------------------------------------------------------------


@contextmanager
def serve_in_thread(app: FastAPI, *, host: str = "127.0.0.1", port: int = 0, timeout: float = 60.0) -> Iterator[str]:
    """Run ``app`` under uvicorn in a background thread (tests, notebooks); yields the base URL.

    ``port=0`` binds a free port; the socket is bound before uvicorn starts, so there is no race.
    """
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="fedmart-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            sock.close()
            raise ServeError("the server did not start; see the log above")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def run_http(config: ServeConfig, *, log_level: str = "info") -> None:
    """Load the model and serve until interrupted (uvicorn, one process)."""
    import uvicorn

    app = create_app(config)
    uvicorn.run(app, host=config.host, port=config.port, log_level=log_level, access_log=False, proxy_headers=False)
