"""``POST /v1/completions`` (and Continue's ``/v1/fim/completions``): text and fill-in-the-middle."""

from __future__ import annotations

import time
import uuid
from typing import AsyncIterator

from aiohttp import web

from app.api.body import read_json_body
from app.api.keys import ENGINE
from app.api.openai.protocol import CompletionRequest, parse
from app.api.openai.streaming import (
    finish_reason, in_band_error, sse, stream_response, timing_headers, usage_body, whole_result,
)
from app.engine.facade import CompletionRequest as EngineCompletion, JobFinished, TextDelta

routes = web.RouteTableDef()


@routes.post("/v1/completions")
@routes.post("/v1/fim/completions")  # Continue's fill-in-the-middle path (prompt + suffix)
async def completions(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    req: CompletionRequest = parse(CompletionRequest, await read_json_body(request))
    stream = bool(req.stream)
    handle = await engine.submit_completion(EngineCompletion(
        model=req.model, prompt=req.prompt_value(), settings=req.to_settings(), suffix=req.suffix,
        stream=stream, logit_bias=req.bias(), response_format=req.response_format))
    cid = "cmpl-" + uuid.uuid4().hex
    created = int(time.time())
    base = {"id": cid, "object": "text_completion", "created": created, "model": req.model}
    if not stream:
        finished = await whole_result(handle)
        return web.json_response({**base, "choices": [{"index": 0, "text": finished.text, "logprobs": None,
                                                       "finish_reason": finish_reason(finished)}],
                                  "usage": usage_body(finished)}, headers=timing_headers(handle))
    include_usage = req.include_usage()

    async def chunks() -> AsyncIterator[bytes]:
        async for event in handle:
            if isinstance(event, TextDelta):
                yield sse({**base, "choices": [{"index": 0, "text": event.text, "logprobs": None,
                                                "finish_reason": None}]})
            elif isinstance(event, JobFinished):
                if event.finish_reason in ("error", "cancelled"):
                    yield sse(in_band_error(event))
                    return
                yield sse({**base, "choices": [{"index": 0, "text": "", "logprobs": None,
                                                "finish_reason": finish_reason(event)}]})
                if include_usage:
                    yield sse({**base, "choices": [], "usage": usage_body(event)})

    return await stream_response(request, handle, chunks())
