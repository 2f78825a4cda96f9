"""``POST /v1/completions`` (and Continue's ``/v1/fim/completions``): text and fill-in-the-middle, one
job per choice, with log-probabilities when asked for."""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any, AsyncIterator

from aiohttp import web

from app.api.body import read_json_body
from app.api.keys import ENGINE
from app.api.openai.choices import (
    HandleGroup, choice_seed, completion_logprobs, merged, submit_choices, summed_usage, whole_results,
)
from app.api.openai.protocol import CompletionRequest, parse
from app.api.openai.streaming import finish_reason, in_band_error, sse, stream_response, timing_headers
from app.engine.facade import CompletionRequest as EngineCompletion, Engine, JobFinished, JobHandle, TextDelta

routes = web.RouteTableDef()


async def _submit(engine: Engine, req: CompletionRequest, index: int) -> JobHandle:
    settings = req.to_settings()
    if req.seed is not None:
        settings.seed = choice_seed(settings.seed, index)
    return await engine.submit_completion(EngineCompletion(
        model=req.model, prompt=req.prompt_value(), settings=settings, suffix=req.suffix, stream=bool(req.stream),
        logit_bias=req.bias(), response_format=req.response_format, logprobs=req.logprobs))


@routes.post("/v1/completions")
@routes.post("/v1/fim/completions")  # Continue's fill-in-the-middle path (prompt + suffix)
async def completions(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    req: CompletionRequest = parse(CompletionRequest, await read_json_body(request))
    handles = await submit_choices(req.n or 1, lambda i: _submit(engine, req, i))
    base = {"id": "cmpl-" + uuid.uuid4().hex, "object": "text_completion", "created": int(time.time()),
            "model": req.model}
    if req.stream:
        group = HandleGroup(handles)
        return await stream_response(request, group, _chunks(req, group, base))  # type: ignore[arg-type]
    finished = await whole_results(handles)
    choices = [{"index": i, "text": done.text, "finish_reason": finish_reason(done),
                "logprobs": completion_logprobs(done.logprobs, 0) if req.logprobs is not None else None}
               for i, done in enumerate(finished)]
    return web.json_response({**base, "choices": choices, "usage": summed_usage(finished)},
                             headers=timing_headers(handles[0]))


async def _chunks(req: CompletionRequest, group: HandleGroup, base: dict[str, Any]) -> AsyncIterator[bytes]:
    offsets = [0] * len(group.handles)
    finished: list[JobFinished] = []

    def logprobs(index: int, items: tuple) -> Any:
        if req.logprobs is None:
            return None
        out = completion_logprobs(items, offsets[index])
        offsets[index] += sum(len(t.token) for t in items)
        return out

    async for index, event in merged(group.handles):
        if isinstance(event, TextDelta):
            yield sse({**base, "choices": [{"index": index, "text": event.text, "finish_reason": None,
                                            "logprobs": logprobs(index, event.logprobs)}]})
        elif isinstance(event, JobFinished):
            if event.finish_reason in ("error", "cancelled"):
                yield sse(in_band_error(event))
                return
            yield sse({**base, "choices": [{"index": index, "text": "", "finish_reason": finish_reason(event),
                                            "logprobs": logprobs(index, event.logprobs)}]})
            finished.append(dataclasses.replace(event, text=""))
    if req.include_usage():
        yield sse({**base, "choices": [], "usage": summed_usage(finished)})
