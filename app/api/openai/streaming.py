"""What every OpenAI route shares: SSE framing, the streaming response, usage and finish reasons."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, AsyncIterator

from aiohttp import web

from app.api.errors import ApiError, error_body, from_engine, mark_response_started
from app.engine.facade import EngineError, JobFinished, JobHandle

log = logging.getLogger(__name__)


def timing_headers(handle: JobHandle) -> dict[str, str]:
    return {"X-Prepare-Ms": f"{handle.prepare_s * 1e3:.2f}"}


def sse(data: Any) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def finish_reason(finished: JobFinished) -> str:
    return "length" if finished.finish_reason == "length" else "stop"


async def whole_result(handle: JobHandle) -> JobFinished:
    """Wait for a non-streaming job; a failed one becomes a 500 with the reason (a 400 when the request
    was at fault, e.g. a grammar the backend refused)."""
    try:
        finished = await handle.result()
    finally:
        handle.cancel()
    if finished.finish_reason in ("error", "cancelled"):
        if finished.error_kind == "request":
            raise ApiError(400, finished.error or "the request cannot be served", code="invalid_request")
        raise ApiError(500, finished.error or "generation failed", code="generation_failed")
    return finished


def in_band_error(finished: JobFinished) -> dict[str, Any]:
    message = finished.error or f"generation ended: {finished.finish_reason}"
    if finished.error_kind == "request":
        return error_body(message, "invalid_request_error", code="invalid_request")
    return error_body(message, "server_error", code="generation_failed")


async def stream_response(request: web.Request, handle: JobHandle,
                          chunks: AsyncIterator[bytes]) -> web.StreamResponse:
    """Write ``chunks`` as an SSE stream; a failure once the stream has started becomes an in-band error
    event, and the stream still ends with ``[DONE]``."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no", **timing_headers(handle)})
    try:
        handle.start_early()
        await response.prepare(request)
        mark_response_started(request)  # sent: from here on a failure is answered in band, never anew
        try:
            async for chunk in chunks:
                await response.write(chunk)
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except (ApiError, EngineError) as exc:  # said for the client: its own message and type, in band
            log.info("stream of job %d ended early: %s", handle.job.job_id, exc)
            await response.write(sse((exc if isinstance(exc, ApiError) else from_engine(exc)).body()))
        except Exception:
            log.exception("stream of job %d failed", handle.job.job_id)
            await response.write(sse(error_body("generation failed: internal server error", "server_error",
                                                code="generation_failed")))
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
