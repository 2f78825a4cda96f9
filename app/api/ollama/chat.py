"""``POST /api/chat``: the next assistant message of a chat, with tool calls parsed out of it when the
request has ``tools``; no messages loads the model (and with ``keep_alive`` 0 unloads it)."""

from __future__ import annotations

import time

from aiohttp import web

from app.api.body import read_json_body
from app.api.keys import ENGINE
from app.api.ollama.lifecycle import load_or_unload
from app.api.ollama.output import ChatOutput
from app.api.ollama.streaming import Answer, respond
from app.api.ollama.wire import ChatRequest as WireChat, parse
from app.engine.facade import ChatRequest

routes = web.RouteTableDef()


@routes.post("/api/chat")
async def chat(request: web.Request) -> web.StreamResponse:
    started = time.perf_counter()
    engine = request.app[ENGINE]
    req: WireChat = parse(WireChat, await read_json_body(request))
    keep_alive = req.keep_alive_s()
    if not req.messages:
        return await load_or_unload(engine, req.model, keep_alive, Answer(req.model, started, ChatOutput(None, None)))
    tools = req.tools or None
    handle = await engine.submit_chat(ChatRequest(
        model=req.model, messages=[m.to_engine() for m in req.messages], settings=req.settings(),
        tools=tools, stream=req.streaming(), response_format=req.response_format()))
    answer = Answer(req.model, started, ChatOutput(handle.tool_format if tools else None, tools))
    return await respond(request, handle, answer, req.streaming(), lambda: engine.keep_alive(req.model, keep_alive))
