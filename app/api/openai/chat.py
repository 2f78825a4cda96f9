"""``POST /v1/chat/completions``: a chat request to the engine (one job per choice), its events back as
OpenAI chunks, with tool calls parsed out of the model's text and log-probabilities when asked for."""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any, AsyncIterator

from aiohttp import web

from app.api.body import read_json_body
from app.api.keys import ENGINE
from app.api.openai.choices import (
    HandleGroup, chat_logprobs, choice_seed, merged, submit_choices, summed_usage, whole_results,
)
from app.api.openai.protocol import ChatCompletionRequest, parse
from app.api.openai.streaming import finish_reason, in_band_error, sse, stream_response, timing_headers
from app.api.openai.tool_output import ChatOutput
from app.engine.facade import ChatRequest, Engine, JobFinished, JobHandle, TextDelta

routes = web.RouteTableDef()


async def _submit(engine: Engine, req: ChatCompletionRequest, index: int) -> JobHandle:
    settings = req.to_settings()
    if req.seed is not None:
        settings.seed = choice_seed(settings.seed, index)
    return await engine.submit_chat(ChatRequest(
        model=req.model, messages=[m.to_engine() for m in req.messages], settings=settings,
        tools=req.tools, stream=bool(req.stream), logit_bias=req.bias(), response_format=req.response_format,
        tool_choice=req.tool_choice, parallel_tool_calls=req.parallel_tool_calls is not False,
        logprobs=(req.top_logprobs or 0) if req.logprobs else None))


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    req: ChatCompletionRequest = parse(ChatCompletionRequest, await read_json_body(request))
    handles = await submit_choices(req.n or 1, lambda i: _submit(engine, req, i))
    fmt = handles[0].tool_format if req.tool_choice_kind() != "none" else None
    outputs = [ChatOutput(fmt, req.tools, req.parallel_tool_calls is not False) for _ in handles]
    head = {"id": "chatcmpl-" + uuid.uuid4().hex, "created": int(time.time()), "model": req.model}
    if not req.stream:
        return await _whole(req, handles, outputs, head)
    group = HandleGroup(handles)
    return await stream_response(request, group, _chunks(req, group, outputs, head))  # type: ignore[arg-type]


async def _whole(req: ChatCompletionRequest, handles: list[JobHandle], outputs: list[ChatOutput],
                 head: dict[str, Any]) -> web.Response:
    finished = await whole_results(handles)
    choices = []
    for i, (done, output) in enumerate(zip(finished, outputs)):
        logprobs = chat_logprobs(done.logprobs, req.top_logprobs or 0) if req.logprobs else None
        choices.append({"index": i, "message": output.message(done.text), "logprobs": logprobs,
                        "finish_reason": output.finish_reason(finish_reason(done))})
    return web.json_response({**head, "object": "chat.completion", "choices": choices,
                              "usage": summed_usage(finished)}, headers=timing_headers(handles[0]))


async def _chunks(req: ChatCompletionRequest, group: HandleGroup, outputs: list[ChatOutput],
                  head: dict[str, Any]) -> AsyncIterator[bytes]:
    base = {**head, "object": "chat.completion.chunk", **({"usage": None} if req.include_usage() else {})}
    top = req.top_logprobs or 0

    def chunk(index: int, delta: dict[str, Any], reason: str | None = None, logprobs: Any = None) -> bytes:
        return sse({**base, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                         "finish_reason": reason}]})

    for i in range(len(outputs)):
        yield chunk(i, {"role": "assistant", "content": ""})
    finished: list[JobFinished] = []
    async for index, event in merged(group.handles):
        output = outputs[index]
        if isinstance(event, TextDelta):
            deltas = output.feed(event.text)
            logprobs = chat_logprobs(event.logprobs, top) if req.logprobs else None
            for n, delta in enumerate(deltas or ([{"content": ""}] if logprobs else [])):
                yield chunk(index, delta, logprobs=logprobs if n == 0 else None)
        elif isinstance(event, JobFinished):
            if event.finish_reason in ("error", "cancelled"):
                yield sse(in_band_error(event))
                return
            for delta in output.finish():
                yield chunk(index, delta)
            logprobs = chat_logprobs(event.logprobs, top) if req.logprobs and event.logprobs else None
            yield chunk(index, {}, output.finish_reason(finish_reason(event)), logprobs)
            finished.append(dataclasses.replace(event, text=""))
    if req.include_usage():
        yield sse({**base, "choices": [], "usage": summed_usage(finished)})
