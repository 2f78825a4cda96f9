"""Admin routes: load and unload models, the request log, CUDA tensor diagnostics (facade calls only)."""

from __future__ import annotations

import dataclasses
from typing import Any

from aiohttp import web

from app.api.body import read_json_body
from app.api.errors import ApiError
from app.api.keys import ENGINE

routes = web.RouteTableDef()


@routes.post("/admin/load")
async def admin_load(request: web.Request) -> web.Response:
    """Load a model now (``{"model": NAME}``); answers when it is ready."""
    engine = request.app[ENGINE]
    name = _admin_model(await read_json_body(request))
    await engine.load(name)  # a ModelNotFound / ModelLoadError is answered by the error middleware
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
                              "data": [dataclasses.asdict(r) for r in engine.recent_requests()]})


@routes.get("/admin/cuda-tensors")
async def admin_cuda_tensors(request: web.Request) -> web.Response:
    """Diagnostics: the largest live CUDA tensors and what holds them (for VRAM leak reports), in the
    server's process and in each model process."""
    return web.json_response(await request.app[ENGINE].cuda_tensor_census())
