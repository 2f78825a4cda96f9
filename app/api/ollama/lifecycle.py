"""Ollama's way to load and unload a model: a generate or chat request with nothing to generate, and
``keep_alive`` (how long the model stays loaded after a request, over its idle-unload setting)."""

from __future__ import annotations

from aiohttp import web

from app.api.ollama.streaming import Answer
from app.engine.facade import Engine


async def load_or_unload(engine: Engine, model: str, keep_alive_s: float | None, answer: Answer) -> web.Response:
    """Nothing to generate: ``keep_alive`` 0 unloads the model, anything else loads it and keeps it for
    that long (done_reason "unload" / "load")."""
    if keep_alive_s == 0:
        engine.model_entry(model)  # an unknown model is a 404, as for a load
        await engine.unload(model)
        return answer.empty("unload")
    await engine.load(model)
    engine.keep_alive(model, keep_alive_s)
    return answer.empty("load")
