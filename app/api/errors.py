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


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render every failure in the API's error shape; unexpected exceptions are logged once -> 500."""
    try:
        return await handler(request)
    except ApiError as exc:
        return web.json_response(exc.body(), status=exc.status)
    except EngineError as exc:  # raised before any output: answered in the API's shape
        error = from_engine(exc)
        return web.json_response(error.body(), status=error.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = {404: f"Unknown path {request.path}", 405: f"Method {request.method} not allowed on {request.path}",
                   413: "Request body too large"}.get(exc.status, exc.reason)
        resp = web.json_response(ApiError(exc.status, message).body(), status=exc.status)
        for header in ("Allow",):
            if header in exc.headers:
                resp.headers[header] = exc.headers[header]
        return resp
    except ConnectionResetError:
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return web.json_response(error_body("Internal server error", "server_error"), status=500)
