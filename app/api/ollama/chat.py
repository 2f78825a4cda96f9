"""``POST /api/chat``: the next assistant message of a chat; no messages loads the model (and with
``keep_alive`` 0 unloads it)."""

from __future__ import annotations

import time

from aiohttp import web

from app.api.body import read_json_body
from app.api.keys import ENGINE
from app.api.ollama.lifecycle import load_or_unload
from app.api.ollama.streaming import Answer, respond
from app.api.ollama.wire import ChatRequest as WireChat, parse
from app.engine.facade import ChatRequest

routes = web.RouteTableDef()


def _message(text: str) -> dict:
    return {"message": {"role": "assistant", "content": text}}


@routes.post("/api/chat")
async def chat(request: web.Request) -> web.StreamResponse:
    started = time.perf_counter()
    engine = request.app[ENGINE]
    req: WireChat = parse(WireChat, await read_json_body(request))
    keep_alive = req.keep_alive_s()
    answer = Answer(req.model, started, _message)
    if not req.messages:
        return await load_or_unload(engine, req.model, keep_alive, answer)
    handle = await engine.submit_chat(ChatRequest(
        model=req.model, messages=[m.to_engine() for m in req.messages], settings=req.settings(),
        tools=req.tools or None, stream=req.streaming()))
    return await respond(request, handle, answer, req.streaming(), lambda: engine.keep_alive(req.model, keep_alive))
