"""What /api/generate and /api/chat share: NDJSON streaming, one body when ``stream`` is false, and the
final object's ``done_reason`` and timings (nanoseconds, from the engine's own clocks)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, AsyncIterator, Callable, Protocol

from aiohttp import web

from app.api.errors import ApiError, mark_response_started
from app.engine.facade import EngineError, JobFinished, JobHandle, TextDelta

log = logging.getLogger(__name__)
NDJSON = "application/x-ndjson"
#: the request's key for its stream once the head is sent: a failure after that is answered in band
STREAM = web.RequestKey("ollama_stream", web.StreamResponse)
MID_STREAM_ERROR = "internal server error: the answer ended early (the server's log has the cause)"


def created_at() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def ns(seconds: float) -> int:
    return max(int(seconds * 1e9), 0)


def line(data: dict[str, Any]) -> bytes:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


class Output(Protocol):
    """How model text becomes parts of the answer's objects (see output.py)."""

    def feed(self, text: str) -> list[dict[str, Any]]: ...

    def finish(self) -> list[dict[str, Any]]: ...

    def whole(self, text: str) -> dict[str, Any]: ...

    def empty(self) -> dict[str, Any]: ...


@dataclass
class Answer:
    """How one generation is answered: the model name as the client sent it, when the request came in
    (``time.perf_counter``), and how its text sits in the body."""

    model: str
    started: float
    output: Output

    def head(self) -> dict[str, Any]:
        return {"model": self.model, "created_at": created_at()}

    def final(self, handle: JobHandle, finished: JobFinished, part: dict[str, Any]) -> dict[str, Any]:
        usage = finished.usage
        first = finished.ttft_s if finished.ttft_s is not None else finished.duration_s
        return {**self.head(), **part, "done": True, "done_reason": done_reason(finished),
                "total_duration": ns(time.perf_counter() - self.started), "load_duration": ns(handle.prepare_s),
                "prompt_eval_count": usage.prompt_tokens, "prompt_eval_duration": ns(first),
                "eval_count": usage.completion_tokens, "eval_duration": ns(finished.duration_s - first)}

    def empty(self, reason: str) -> web.Response:
        """The one object of a load or unload request (no generation)."""
        return web.json_response({**self.head(), **self.output.empty(), "done": True, "done_reason": reason})


def done_reason(finished: JobFinished) -> str:
    return "length" if finished.finish_reason == "length" else "stop"


async def respond(request: web.Request, handle: JobHandle, answer: Answer, stream: bool,
                  keep_alive: Callable[[], None]) -> web.StreamResponse:
    """Answer a submitted job; ``keep_alive`` is applied first, while the job holds the model."""
    try:
        keep_alive()
    except BaseException:
        handle.cancel()
        raise
    if not stream:
        return web.json_response(await _whole(handle, answer))
    return await _stream(request, handle, _lines(handle, answer))


async def _whole(handle: JobHandle, answer: Answer) -> dict[str, Any]:
    try:
        finished = await handle.result()
    finally:
        handle.cancel()
    if finished.finish_reason in ("error", "cancelled"):
        # the backend refusing what the request asked for (a grammar it cannot follow) is the request's fault
        raise ApiError(400 if finished.error_kind == "request" else 500, finished.error or "generation failed")
    return answer.final(handle, finished, answer.output.whole(finished.text))


async def _lines(handle: JobHandle, answer: Answer) -> AsyncIterator[bytes]:
    try:
        async for line_ in _event_lines(handle, answer):
            yield line_
    except EngineError as exc:  # e.g. the model began unloading before the job started: say why, in band
        yield line({"error": str(exc)})


async def _event_lines(handle: JobHandle, answer: Answer) -> AsyncIterator[bytes]:
    async for event in handle:
        if isinstance(event, TextDelta):
            for part in answer.output.feed(event.text):
                yield line({**answer.head(), **part, "done": False})
        elif isinstance(event, JobFinished):
            if event.finish_reason in ("error", "cancelled"):
                yield line({"error": event.error or f"generation ended: {event.finish_reason}"})
                return
            for part in answer.output.finish():
                yield line({**answer.head(), **part, "done": False})
            yield line(answer.final(handle, event, answer.output.empty()))


async def _stream(request: web.Request, handle: JobHandle, lines: AsyncIterator[bytes]) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": NDJSON, "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    try:
        handle.start_early()
        await response.prepare(request)
        mark_response_started(request)  # for app/api/errors' middleware too: never a second response
        request[STREAM] = response
        async for chunk in lines:
            await response.write(chunk)
        await response.write_eof()
    except ConnectionResetError:  # the client left: nobody is there to answer
        log.info("client left during a stream: job %d cancelled", handle.job.job_id)
    except asyncio.CancelledError:  # the handler was cancelled because the client disconnected
        log.info("client left during a stream: job %d cancelled", handle.job.job_id)
        raise
    except Exception:
        if not response.prepared:  # nothing sent yet: the error middleware answers with a status
            raise
        log.exception("stream of job %d failed", handle.job.job_id)
        await end_with_error(response, MID_STREAM_ERROR)
    finally:
        handle.cancel()
    return response


async def end_with_error(response: web.StreamResponse, message: str) -> None:
    """End a begun stream with Ollama's mid-stream error, an ``{"error": ...}`` line (its status is sent)."""
    try:
        await response.write(line({"error": message}))
        await response.write_eof()
    except (ConnectionResetError, RuntimeError):  # the client left, or the stream had already ended
        log.info("could not end a failed stream in band: the client left or it had ended")
