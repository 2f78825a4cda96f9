"""Ollama's error shape, ``{"error": "..."}``, for every failure under ``/api/``, and the endpoints of
Ollama's API this app does not have (pulling, pushing, creating models; embeddings)."""

from __future__ import annotations

import logging

from aiohttp import web

from app.api.errors import ApiError, Handler, from_engine
from app.api.ollama.streaming import MID_STREAM_ERROR, STREAM, end_with_error
from app.engine.errors import EngineError

log = logging.getLogger(__name__)
PREFIX = "/api/"
_ADD_MODELS = ("add models with the tray's 'Add model' dialog or `python -m app add-model NAME FOLDER` "
               "(an EXL2/EXL3/GPTQ/FP16 folder; the Ollama library's template and parameters come along)")

routes = web.RouteTableDef()


def error_response(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _ollama_words(exc: EngineError) -> str:
    """An engine error in the request's own words (its ``format`` is the engine's response_format)."""
    message = str(exc)
    return message.replace("response_format", "format") if exc.param == "response_format" else message


def _http_message(request: web.Request, exc: web.HTTPException) -> str:
    return {404: f"unknown path {request.path}", 405: f"method {request.method} not allowed on {request.path}",
            413: "request body too large"}.get(exc.status, exc.reason)


@web.middleware
async def ollama_error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Failures under /api/ answered as Ollama answers them; other paths pass through untouched. A failure
    after a stream began (its status line is sent) ends that stream with an in-band error line instead."""
    if not request.path.startswith(PREFIX):
        return await handler(request)
    try:
        return await handler(request)
    except Exception as exc:
        begun = request.get(STREAM)
        if begun is None or not begun.prepared:
            return _error_answer(request, exc)
        if isinstance(exc, ConnectionResetError):
            raise
        log.exception("error after the stream began on %s %s", request.method, request.path)
        await end_with_error(begun, MID_STREAM_ERROR)
        return begun


def _error_answer(request: web.Request, exc: Exception) -> web.StreamResponse:
    if isinstance(exc, ApiError):
        return error_response(exc.status, exc.message)
    if isinstance(exc, EngineError):
        return error_response(from_engine(exc).status, _ollama_words(exc))  # the one status mapping
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            raise exc
        response = error_response(exc.status, _http_message(request, exc))
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    if isinstance(exc, ConnectionResetError):
        raise exc
    log.exception("unhandled error on %s %s", request.method, request.path, exc_info=exc)
    return error_response(500, "internal server error")


def _not_here(what: str, hint: str) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        return error_response(501, f"{what} is not supported by this server (ExLlama Tray): {hint}")
    return handler


_MANAGE = _ADD_MODELS + "; the model list is GET /api/tags"
for _method, _path, _what, _hint in (
        ("POST", "/api/pull", "pulling models", _ADD_MODELS),
        ("POST", "/api/push", "pushing models", "models are folders on this machine and are never uploaded"),
        ("POST", "/api/create", "creating models", _ADD_MODELS),
        ("POST", "/api/copy", "copying models", _MANAGE),
        ("DELETE", "/api/delete", "deleting models", "remove a model in the tray or with `python -m app "
                                                    "remove-model NAME` (its folder is kept)"),
        ("POST", "/api/embed", "embeddings", "this server generates text only"),
        ("POST", "/api/embeddings", "embeddings", "this server generates text only"),
        ("HEAD", "/api/blobs/{digest}", "blobs", _ADD_MODELS),
        ("POST", "/api/blobs/{digest}", "blobs", _ADD_MODELS)):
    routes.route(_method, _path)(_not_here(_what, _hint))
