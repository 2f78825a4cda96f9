"""``POST /api/generate``: a prompt (templated as a one-turn chat, or ``raw``), or fill-in-the-middle
with ``suffix``; an empty prompt loads the model (and with ``keep_alive`` 0 unloads it)."""

from __future__ import annotations

import time

from aiohttp import web

from app.api.body import read_json_body
from app.api.errors import ApiError
from app.api.keys import ENGINE
from app.api.ollama.lifecycle import load_or_unload
from app.api.ollama.output import GenerateOutput
from app.api.ollama.streaming import Answer, respond
from app.api.ollama.wire import GenerateRequest, parse
from app.engine.facade import ChatRequest, CompletionRequest, Engine, JobHandle, Message

routes = web.RouteTableDef()


@routes.post("/api/generate")
async def generate(request: web.Request) -> web.StreamResponse:
    started = time.perf_counter()
    engine = request.app[ENGINE]
    req: GenerateRequest = parse(GenerateRequest, await read_json_body(request))
    keep_alive = req.keep_alive_s()
    answer = Answer(req.model, started, GenerateOutput())
    if not req.prompt and not req.suffix:
        return await load_or_unload(engine, req.model, keep_alive, answer)
    handle = await _submit(engine, req)
    return await respond(request, handle, answer, req.streaming(), lambda: engine.keep_alive(req.model, keep_alive))


async def _submit(engine: Engine, req: GenerateRequest) -> JobHandle:
    settings = req.settings()
    stream = req.streaming()
    prompt = req.prompt or ""
    if req.suffix and not engine.has_fill_in_middle(req.model):
        raise ApiError(400, f"\"{req.model}\" does not support insert (suffix): it has no fill-in-the-middle form")
    if req.raw or req.suffix:  # raw: the prompt as it is; suffix: the model's fill-in-the-middle form
        return await engine.submit_completion(CompletionRequest(
            model=req.model, prompt=prompt, settings=settings, suffix=req.suffix or None, stream=stream,
            response_format=req.response_format()))
    messages = [Message("system", req.system)] if req.system else []
    messages.append(Message("user", prompt))
    return await engine.submit_chat(ChatRequest(model=req.model, messages=messages, settings=settings,
                                                stream=stream, response_format=req.response_format()))
