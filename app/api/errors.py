"""One error shape everywhere: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import logging
from typing import Awaitable, Callable

from aiohttp import web

from app.engine.errors import EngineError, ModelLoadError, ModelNotFound

log = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
          415: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 error_type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type or _TYPES.get(status, "invalid_request_error")

    def body(self) -> dict:
        return error_body(self.message, self.error_type, self.param, self.code)


def error_body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def from_engine(exc: EngineError) -> ApiError:
    """An engine error as the API answers it: its HTTP status by kind, its OpenAI code from its type."""
    if isinstance(exc, ModelNotFound):
        return ApiError(404, str(exc), param=exc.param, code=exc.code)
    if isinstance(exc, ModelLoadError):
        return ApiError(503, str(exc), param=exc.param, code=exc.code, error_type="server_error")
    return ApiError(400, str(exc), param=exc.param, code=exc.code)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_STARTED = web.RequestKey("api.response_started", bool)


def mark_response_started(request: web.Request) -> None:
    """Say that ``request``'s response is being written (a stream's headers are about to go out): from
    then on a failure cannot become an error response, the middleware lets it end the connection."""
    request[_STARTED] = True


def response_started(request: web.Request) -> bool:
    """Whether ``request``'s response was marked as started (see :func:`mark_response_started`)."""
    return bool(request.get(_STARTED))


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render every failure in the API's error shape; unexpected exceptions are logged once -> 500. A
    failure after the response started (see :func:`mark_response_started`) is not answered again: the
    handler has said what it could in band, and the connection ends."""
    try:
        return await handler(request)
    except Exception as exc:
        if response_started(request):  # its status line is sent: a second response would corrupt the body
            if not isinstance(exc, (ConnectionResetError, web.HTTPException)):
                log.exception("error after the response started on %s %s", request.method, request.path)
            raise
        return _error_response(request, exc)


def _error_response(request: web.Request, exc: Exception) -> web.StreamResponse:
    if isinstance(exc, ApiError):
        return web.json_response(exc.body(), status=exc.status)
    if isinstance(exc, EngineError):  # raised before any output: answered in the API's shape
        error = from_engine(exc)
        return web.json_response(error.body(), status=error.status)
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            raise exc
        message = {404: f"Unknown path {request.path}", 405: f"Method {request.method} not allowed on {request.path}",
                   413: "Request body too large"}.get(exc.status, exc.reason)
        resp = web.json_response(ApiError(exc.status, message).body(), status=exc.status)
        for header in ("Allow",):
            if header in exc.headers:
                resp.headers[header] = exc.headers[header]
        return resp
    if isinstance(exc, ConnectionResetError):
        raise exc
    log.exception("unhandled error on %s %s", request.method, request.path, exc_info=exc)
    return web.json_response(error_body("Internal server error", "server_error"), status=500)
