"""The OpenAI-compatible routes: thin handlers over the engine facade."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator

from aiohttp import web
from pydantic import BaseModel, ValidationError

from app.api.errors import ApiError
from app.api.keys import ENGINE
from app.api.openai.protocol import ChatCompletionRequest, CompletionRequest, UnsupportedValue
from app.engine.facade import (
    ChatRequest, CompletionRequest as EngineCompletion, Engine, InvalidRequest, JobHandle, ModelLoadError,
    ModelNotFound,
)
from app.engine.events import JobFinished, TextDelta
from app.engine.settings.schema import format_validation_error

log = logging.getLogger(__name__)
routes = web.RouteTableDef()


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def read_json_body(request: web.Request) -> dict[str, Any]:
    # The body must be JSON whatever Content-Type says (curl -d sends form-urlencoded by default).
    raw = await request.read()
    if not raw.strip():
        raise ApiError(400, "The request body is empty; send a JSON object")
    try:
        text = raw.decode("utf-8")
        body = json.loads(text, parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise ApiError(400, "The request body is not valid UTF-8") from None
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"The request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object")
    return body


def parse(model: type[BaseModel], body: dict[str, Any]) -> Any:
    try:
        parsed = model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())) or None
        raise ApiError(400, f"Invalid request: {format_validation_error(exc)}", param=param) from None
    except RecursionError:
        raise ApiError(400, "Invalid request: nested too deeply") from None
    extra = set(parsed.model_extra or {})
    if extra:
        log.debug("ignoring unknown request fields: %s", sorted(extra))
    try:
        parsed.check_supported()
    except UnsupportedValue as exc:
        raise ApiError(400, str(exc), param=exc.param, code="unsupported_value") from None
    return parsed


async def submit(engine: Engine, coro: Any) -> JobHandle:
    """Map the engine's errors (all raised before any output) to HTTP errors."""
    try:
        return await coro
    except ModelNotFound as exc:
        raise ApiError(404, str(exc), param="model", code="model_not_found") from None
    except InvalidRequest as exc:
        code = "context_length_exceeded" if "context length" in str(exc) else None
        raise ApiError(400, str(exc), param=exc.param, code=code) from None
    except ModelLoadError as exc:
        raise ApiError(503, str(exc), code="model_load_failed", error_type="server_error") from None


def timing_headers(handle: JobHandle) -> dict[str, str]:
    return {"X-Prepare-Ms": f"{handle.prepare_s * 1e3:.2f}"}


def sse(data: Any) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def usage_body(finished: JobFinished) -> dict[str, int]:
    u = finished.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens}


def finish_reason(finished: JobFinished) -> str:
    return "length" if finished.finish_reason == "length" else "stop"


async def whole_result(handle: JobHandle) -> JobFinished:
    """Wait for a non-streaming job; a failed one becomes a 500 with the reason."""
    try:
        finished = await handle.result()
    finally:
        handle.cancel()
    if finished.finish_reason in ("error", "cancelled"):
        raise ApiError(500, finished.error or "generation failed", code="generation_failed")
    return finished


def in_band_error(finished: JobFinished) -> dict[str, Any]:
    message = finished.error or f"generation ended: {finished.finish_reason}"
    return {"error": {"message": message, "type": "server_error", "param": None, "code": "generation_failed"}}


async def stream_response(request: web.Request, handle: JobHandle,
                          chunks: AsyncIterator[bytes]) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no", **timing_headers(handle)})
    try:
        handle.start_early()
        await response.prepare(request)
        async for chunk in chunks:
            await response.write(chunk)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    except ConnectionResetError:  # the client left: cancel its job, nobody is there to answer
        log.info("client left during a stream: job %d cancelled", handle.job.job_id)
    except asyncio.CancelledError:  # the handler was cancelled because the client disconnected
        log.info("client left during a stream: job %d cancelled", handle.job.job_id)
        raise
    finally:
        handle.cancel()
    return response


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    return web.json_response({"object": "list", "data": [model_object(m) for m in engine.list_models()]})


@routes.get("/v1/models/{model:.+}")
async def get_model(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    wanted = request.match_info["model"]
    for m in engine.list_models():
        if m.name == wanted or f"{m.name}:latest" == wanted:
            return web.json_response(model_object(m))
    raise ApiError(404, f"The model '{wanted}' does not exist", param="model", code="model_not_found")


def model_object(m: Any) -> dict[str, Any]:
    return {"id": m.name, "object": "model", "created": m.created, "owned_by": "exllama-tray",
            "context_length": m.context_length, "format": m.format, "state": m.state}


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    req: ChatCompletionRequest = parse(ChatCompletionRequest, await read_json_body(request))
    stream = bool(req.stream)
    handle = await submit(engine, engine.submit_chat(ChatRequest(
        model=req.model, messages=[m.to_engine() for m in req.messages], settings=req.to_settings(),
        tools=req.tools, stream=stream, logit_bias=req.bias())))
    cid = "chatcmpl-" + uuid.uuid4().hex
    created = int(time.time())
    base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": req.model}
    if not stream:
        finished = await whole_result(handle)
        return web.json_response({
            "id": cid, "object": "chat.completion", "created": created, "model": req.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": finished.text, "refusal": None},
                         "logprobs": None, "finish_reason": finish_reason(finished)}],
            "usage": usage_body(finished),
        }, headers=timing_headers(handle))
    include_usage = req.include_usage()
    usage_field = {"usage": None} if include_usage else {}

    async def chunks() -> AsyncIterator[bytes]:
        yield sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}], **usage_field})
        async for event in handle:
            if isinstance(event, TextDelta):
                yield sse({**base, "choices": [{"index": 0, "delta": {"content": event.text}, "logprobs": None,
                                                "finish_reason": None}], **usage_field})
            elif isinstance(event, JobFinished):
                if event.finish_reason in ("error", "cancelled"):
                    yield sse(in_band_error(event))
                    return
                yield sse({**base, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                                "finish_reason": finish_reason(event)}], **usage_field})
                if include_usage:
                    yield sse({**base, "choices": [], "usage": usage_body(event)})

    return await stream_response(request, handle, chunks())


@routes.post("/v1/completions")
@routes.post("/v1/fim/completions")  # Continue's fill-in-the-middle path (prompt + suffix)
async def completions(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    req: CompletionRequest = parse(CompletionRequest, await read_json_body(request))
    stream = bool(req.stream)
    handle = await submit(engine, engine.submit_completion(EngineCompletion(
        model=req.model, prompt=req.prompt_value(), settings=req.to_settings(), suffix=req.suffix,
        stream=stream, logit_bias=req.bias())))
    cid = "cmpl-" + uuid.uuid4().hex
    created = int(time.time())
    base = {"id": cid, "object": "text_completion", "created": created, "model": req.model}
    if not stream:
        finished = await whole_result(handle)
        return web.json_response({**base, "choices": [{"index": 0, "text": finished.text, "logprobs": None,
                                                       "finish_reason": finish_reason(finished)}],
                                  "usage": usage_body(finished)}, headers=timing_headers(handle))
    include_usage = req.include_usage()

    async def chunks() -> AsyncIterator[bytes]:
        async for event in handle:
            if isinstance(event, TextDelta):
                yield sse({**base, "choices": [{"index": 0, "text": event.text, "logprobs": None,
                                                "finish_reason": None}]})
            elif isinstance(event, JobFinished):
                if event.finish_reason in ("error", "cancelled"):
                    yield sse(in_band_error(event))
                    return
                yield sse({**base, "choices": [{"index": 0, "text": "", "logprobs": None,
                                                "finish_reason": finish_reason(event)}]})
                if include_usage:
                    yield sse({**base, "choices": [], "usage": usage_body(event)})

    return await stream_response(request, handle, chunks())


@routes.post("/admin/load")
async def admin_load(request: web.Request) -> web.Response:
    """Load a model now (``{"model": NAME}``); answers when it is ready."""
    engine = request.app[ENGINE]
    name = _admin_model(await read_json_body(request))
    try:
        await engine.load(name)
    except ModelNotFound as exc:
        raise ApiError(404, str(exc), param="model", code="model_not_found") from None
    except ModelLoadError as exc:
        raise ApiError(503, str(exc), code="model_load_failed", error_type="server_error") from None
    return web.json_response({"model": name, "state": "ready"})


@routes.post("/admin/unload")
async def admin_unload(request: web.Request) -> web.Response:
    """Unload a model once its running requests are done (``{"model": NAME}``)."""
    engine = request.app[ENGINE]
    name = _admin_model(await read_json_body(request))
    was_loaded = await engine.unload(name)
    return web.json_response({"model": name, "state": "unloaded", "was_loaded": was_loaded})


def _admin_model(body: dict[str, Any]) -> str:
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise ApiError(400, "send {\"model\": NAME}", param="model")
    return name


@routes.get("/admin/requests")
async def admin_requests(request: web.Request) -> web.Response:
    """The most recent finished requests (newest last) with where their time to first text went."""
    engine = request.app[ENGINE]
    return web.json_response({"object": "list",
                              "data": [dataclasses.asdict(r) for r in engine.metrics.recent_requests()]})


@routes.get("/admin/cuda-tensors")
async def admin_cuda_tensors(request: web.Request) -> web.Response:
    """Diagnostics: the largest live CUDA tensors and what holds them (for VRAM leak reports), in the
    server's process and in each model process."""
    from app.engine.observability.diagnostics import cuda_tensor_census

    engine = request.app[ENGINE]
    out = {"server": await asyncio.to_thread(cuda_tensor_census)}
    for state in engine.model_states():
        resident = engine.manager.resident(state.name)
        census = getattr(resident.backend if resident else None, "cuda_tensor_census", None)
        if census is not None and state.state == "ready":
            try:
                out[state.name] = await asyncio.to_thread(census)
            except Exception as exc:  # a model process that just ended: say so, do not fail the report
                out[state.name] = {"error": str(exc)}
    return web.json_response(out)
