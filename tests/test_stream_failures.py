"""A failure after a stream's headers went out: the client gets an in-band OpenAI error event and a
proper end (``[DONE]``, a well-formed chunked body), never a second HTTP response written into the
open body. Real aiohttp on loopback with the API's own middleware, read by httpx."""

from __future__ import annotations

import json
from typing import AsyncIterator

import httpx
import pytest
from aiohttp import web

from app.api.errors import error_middleware, mark_response_started, response_started
from app.api.openai.streaming import sse, stream_response


class _Job:
    job_id = 1


class _StartedHandle:
    """What stream_response needs of a job: its timing, and start/cancel (a job already running)."""

    job = _Job()
    prepare_s = 0.0
    cancelled = False

    def start_early(self) -> None:
        pass

    def cancel(self) -> None:
        self.cancelled = True


async def _serve(handler) -> tuple[web.AppRunner, str]:
    app = web.Application(middlewares=[error_middleware])
    app.router.add_post("/stream", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}/stream"


async def _stream_failing_with(handle: _StartedHandle, exc: Exception) -> list[str]:
    """The lines a client reads from a stream that writes one chunk, then fails with ``exc``."""
    async def chunks() -> AsyncIterator[bytes]:
        yield sse({"choices": [{"index": 0, "delta": {"content": "Hel"}}]})
        raise exc

    async def handler(request: web.Request) -> web.StreamResponse:
        return await stream_response(request, handle, chunks())  # type: ignore[arg-type]

    runner, url = await _serve(handler)
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            async with client.stream("POST", url) as resp:
                assert resp.status_code == 200
                return [line async for line in resp.aiter_lines() if line]
    finally:
        await runner.cleanup()


async def test_a_failure_mid_stream_is_an_in_band_error_and_the_stream_ends(caplog: pytest.LogCaptureFixture) -> None:
    caplog.allowed_errors = True  # the failure is logged with its traceback
    handle = _StartedHandle()
    lines = await _stream_failing_with(handle, RuntimeError("a bug while writing the stream"))
    assert lines[-1] == "data: [DONE]"
    assert not any("HTTP/1.1" in line for line in lines)
    error = json.loads(lines[-2][6:])["error"]
    assert error["type"] == "server_error" and error["code"] == "generation_failed" and error["message"]
    assert handle.cancelled
    assert any("stream of job 1 failed" in r.getMessage() for r in caplog.records)


async def test_the_middleware_does_not_answer_again_once_a_response_started(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.allowed_errors = True
    seen: list[bool] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        mark_response_started(request)
        seen.append(response_started(request))
        await response.prepare(request)
        await response.write(b"data: {}\n\n")
        raise RuntimeError("a handler that fails after its headers")

    runner, url = await _serve(handler)
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            async with client.stream("POST", url) as resp:
                assert resp.status_code == 200
                with pytest.raises(httpx.RemoteProtocolError) as caught:
                    _ = [chunk async for chunk in resp.aiter_bytes()]
    finally:
        await runner.cleanup()
    assert seen == [True]
    assert "illegal chunk header" not in str(caught.value)  # the body was cut, not overwritten by a 500


async def test_an_engine_error_mid_stream_keeps_its_own_message_and_type() -> None:
    from app.engine.errors import ModelLoadError

    lines = await _stream_failing_with(_StartedHandle(), ModelLoadError(
        "model tiny:latest is unloading; send the request again to load it anew"))
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2][6:])["error"]
    assert error["type"] == "server_error" and error["code"] == "model_load_failed"
    assert error["message"].startswith("model tiny:latest is unloading")
