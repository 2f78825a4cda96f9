"""The Ollama error middleware on a real aiohttp app on loopback (no model): engine errors get the statuses
app/api/errors.from_engine gives them, in Ollama's shape; a failure after a stream began ends that stream
with an in-band ``{"error": ...}`` line instead of a second response written into its body."""

from __future__ import annotations

import json
from typing import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from app.api.errors import from_engine
from app.api.ollama.errors import ollama_error_middleware
from app.api.ollama.streaming import NDJSON, STREAM, line
from app.engine.errors import (ContextLengthExceeded, EngineError, InvalidRequest, ModelLoadError,
                               ModelNotFound)

ENGINE_ERRORS: list[EngineError] = [
    ModelNotFound("model 'x' not found"), InvalidRequest("bad response_format", "response_format"),
    ContextLengthExceeded("too long", "messages"), ModelLoadError("out of memory"), EngineError("other")]


def _app() -> web.Application:
    app = web.Application(middlewares=[ollama_error_middleware])

    async def engine_error(request: web.Request) -> web.Response:
        raise ENGINE_ERRORS[int(request.match_info["i"])]

    app.router.add_get("/api/engine/{i}", engine_error)
    app.router.add_get("/api/stream", _fails_mid_stream)
    return app


@pytest.fixture
async def http() -> AsyncIterator[tuple[TestServer, aiohttp.ClientSession]]:
    server = TestServer(_app())
    await server.start_server()
    async with aiohttp.ClientSession() as session:
        yield server, session
    await server.close()


async def test_engine_errors_have_the_statuses_of_from_engine(http: tuple[TestServer, aiohttp.ClientSession]) -> None:
    server, session = http
    for i, exc in enumerate(ENGINE_ERRORS):
        async with session.get(server.make_url(f"/api/engine/{i}")) as resp:
            assert resp.status == from_engine(exc).status, exc
            body = await resp.json()
        assert body == {"error": str(exc).replace("response_format", "format")}


async def _fails_mid_stream(request: web.Request) -> web.StreamResponse:
    """A stream whose handler fails after its first line, without ending the stream itself."""
    response = web.StreamResponse(headers={"Content-Type": NDJSON})
    await response.prepare(request)
    request[STREAM] = response
    await response.write(line({"response": "a", "done": False}))
    raise RuntimeError("boom")


async def test_a_failure_after_a_stream_began_ends_it_in_band(http: tuple[TestServer, aiohttp.ClientSession],
                                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.allowed_errors = True  # the failure is logged with its traceback
    server, session = http
    async with session.get(server.make_url("/api/stream")) as resp:
        assert resp.status == 200 and resp.content_type == NDJSON
        lines = [json.loads(raw) for raw in (await resp.read()).splitlines() if raw]
    assert lines[0] == {"response": "a", "done": False}
    assert list(lines[1]) == ["error"] and "internal server error" in lines[1]["error"] and len(lines) == 2
    async with session.get(server.make_url("/api/engine/0")) as resp:  # and the server still answers
        assert resp.status == 404 and "not found" in (await resp.json())["error"]
    assert any(r.exc_info and str(r.exc_info[1]) == "boom" for r in caplog.records)
