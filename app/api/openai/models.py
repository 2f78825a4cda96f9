"""``GET /v1/models`` and ``GET /v1/models/{model}``."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from app.api.errors import ApiError
from app.api.keys import ENGINE
from app.engine.facade import ModelInfoView

routes = web.RouteTableDef()


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


def model_object(m: ModelInfoView) -> dict[str, Any]:
    return {"id": m.name, "object": "model", "created": m.created, "owned_by": "exllama-tray",
            "context_length": m.context_length, "format": m.format, "state": m.state}
