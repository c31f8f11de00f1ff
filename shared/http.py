"""The HTTP edge every service shares: FastAPI app with JSON errors, auth by scope, /health, /ready, /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.auth import AuthError, KeyRing
from shared.config import ApiKey
from shared.logs import redact_text
from shared.metrics import ServiceMetrics

log = logging.getLogger(__name__)
ReadyCheck = Callable[[], Awaitable[dict[str, bool]]]


class ApiError(Exception):
    """An error answered as `{"error", "message", "details"}` with its status."""

    def __init__(self, status: int, code: str, message: str,
                 details: list[dict] | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or []
        self.headers = headers


def error_response(status: int, code: str, message: str, details: list | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "message": message, "details": details or []},
                        status_code=status, headers=headers)


def _field_path(loc: tuple | list) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts)


def create_app(service: str, *, keyring: KeyRing, metrics: ServiceMetrics, ready: ReadyCheck,
               title: str | None = None, version: str = "1.0.0") -> FastAPI:
    """A FastAPI app with the shared endpoints and error shapes; routes are added by the service."""
    app = FastAPI(title=title or f"omnicrm {service}", version=version,
                  openapi_url="/openapi.json", docs_url="/docs", redoc_url=None)
    app.state.keyring = keyring
    app.state.metrics = metrics

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)

    @app.exception_handler(AuthError)
    async def _auth_error(_: Request, exc: AuthError) -> JSONResponse:
        return error_response(exc.status, exc.code, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = [{"field": _field_path(e.get("loc", ())), "message": redact_text(str(e.get("msg", "")))}
                   for e in exc.errors()]
        return error_response(422, "invalid_request", "the request is not valid", details)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, redact_text(str(exc.detail)))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error: %s", type(exc).__name__, exc_info=exc)
        return error_response(500, "internal", "internal error")

    @app.middleware("http")
    async def _count(request: Request, call_next):
        response = await call_next(request)
        route = request.scope.get("route")
        metrics.http_requests.labels(route=getattr(route, "path", "unmatched"),
                                     status=str(response.status_code)).inc()
        return response

    @app.get("/health", include_in_schema=True, tags=["ops"])
    async def health() -> dict:
        """Liveness: the process answers."""
        return {"status": "ok", "service": service}

    @app.get("/ready", tags=["ops"], responses={503: {"description": "not ready"}})
    async def ready_endpoint() -> JSONResponse:
        """Readiness: 200 only when connected to broker and database."""
        checks = await ready()
        ok = all(checks.values())
        metrics.ready.set(1 if ok else 0)
        return JSONResponse({"ready": ok, "checks": checks}, status_code=200 if ok else 503)

    @app.get("/metrics", tags=["ops"])
    async def metrics_endpoint() -> Response:
        """Prometheus exposition."""
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    return app


def require(scope: str):
    """FastAPI dependency: the calling key, which must hold `scope` (401/403 otherwise)."""

    def dependency(request: Request) -> ApiKey:
        keyring: KeyRing = request.app.state.keyring
        return keyring.authorize(request.headers.get("authorization"), scope)

    return Depends(dependency)


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the service runtime owns shutdown."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield

    def install_signal_handlers(self) -> None:  # older uvicorn
        return None


async def serve_http(app: FastAPI, host: str, port: int, stop: asyncio.Event) -> None:
    """Serve `app` on the running loop until `stop` is set."""
    config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False,
                            lifespan="off", timeout_graceful_shutdown=5)
    server = _Server(config)

    async def _watch() -> None:
        await stop.wait()
        server.should_exit = True

    watcher = asyncio.create_task(_watch())
    try:
        try:
            await server.serve()
        except SystemExit as exc:  # uvicorn exits when it cannot bind
            raise OSError(f"cannot listen on {host}:{port} (port in use?)") from exc
        if not server.started:
            raise OSError(f"cannot listen on {host}:{port} (port in use?)")
    finally:
        watcher.cancel()
