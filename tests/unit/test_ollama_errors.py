"""The Ollama error middleware on a real aiohttp app on loopback (no model): engine errors get the statuses
app/api/errors.from_engine gives them, in Ollama's shape."""

from __future__ import annotations

from typing import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from app.api.errors import from_engine
from app.api.ollama.errors import ollama_error_middleware
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
