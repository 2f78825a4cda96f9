"""``POST /v1/chat/completions``: a chat request to the engine, its events back as OpenAI chunks."""

from __future__ import annotations

import time
import uuid
from typing import AsyncIterator

from aiohttp import web

from app.api.body import read_json_body
from app.api.keys import ENGINE
from app.api.openai.protocol import ChatCompletionRequest, parse
from app.api.openai.tool_output import ChatOutput
from app.api.openai.streaming import (
    finish_reason, in_band_error, sse, stream_response, timing_headers, usage_body, whole_result,
)
from app.engine.facade import ChatRequest, JobFinished, TextDelta

routes = web.RouteTableDef()


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    req: ChatCompletionRequest = parse(ChatCompletionRequest, await read_json_body(request))
    stream = bool(req.stream)
    handle = await engine.submit_chat(ChatRequest(
        model=req.model, messages=[m.to_engine() for m in req.messages], settings=req.to_settings(),
        tools=req.tools, stream=stream, logit_bias=req.bias(), response_format=req.response_format,
        tool_choice=req.tool_choice, parallel_tool_calls=req.parallel_tool_calls is not False))
    cid = "chatcmpl-" + uuid.uuid4().hex
    created = int(time.time())
    base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": req.model}
    fmt = handle.tool_format if req.tool_choice_kind() != "none" else None
    output = ChatOutput(fmt, req.tools, req.parallel_tool_calls is not False)
    if not stream:
        finished = await whole_result(handle)
        message = output.message(finished.text)
        return web.json_response({
            "id": cid, "object": "chat.completion", "created": created, "model": req.model,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": output.finish_reason(finish_reason(finished))}],
            "usage": usage_body(finished),
        }, headers=timing_headers(handle))
    include_usage = req.include_usage()
    usage_field = {"usage": None} if include_usage else {}

    async def chunks() -> AsyncIterator[bytes]:
        yield sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}], **usage_field})
        async for event in handle:
            if isinstance(event, TextDelta):
                for delta in output.feed(event.text):
                    yield sse({**base, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                    "finish_reason": None}], **usage_field})
            elif isinstance(event, JobFinished):
                if event.finish_reason in ("error", "cancelled"):
                    yield sse(in_band_error(event))
                    return
                for delta in output.finish():
                    yield sse({**base, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                    "finish_reason": None}], **usage_field})
                yield sse({**base, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                                "finish_reason": output.finish_reason(finish_reason(event))}],
                           **usage_field})
                if include_usage:
                    yield sse({**base, "choices": [], "usage": usage_body(event)})

    return await stream_response(request, handle, chunks())
