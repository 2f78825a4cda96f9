"""``n`` choices as ``n`` jobs (submitted together, so they share the batch), their events merged by
choice index, their usage summed; and log-probabilities in OpenAI's two wire shapes."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator, Awaitable, Callable

from app.api.errors import from_engine
from app.api.openai.streaming import whole_result
from app.engine.errors import EngineError
from app.engine.events import JobEvent, TokenLogprob, Usage
from app.engine.facade import JobFinished, JobHandle

log = logging.getLogger(__name__)


class HandleGroup:
    """The jobs of one request's choices, as the streaming response sees a job."""

    def __init__(self, handles: list[JobHandle]) -> None:
        self.handles = handles
        self.job = handles[0].job
        self.prepare_s = max(h.prepare_s for h in handles)

    def start_early(self) -> None:
        for h in self.handles:
            h.start_early()

    def cancel(self) -> None:
        for h in self.handles:
            h.cancel()


async def submit_choices(n: int, submit: Callable[[int], Awaitable[JobHandle]]) -> list[JobHandle]:
    """``submit(i)`` for each choice; if one is refused, the ones already submitted are cancelled."""
    handles: list[JobHandle] = []
    try:
        for i in range(n):
            handles.append(await submit(i))
    except BaseException:
        for h in handles:
            h.cancel()
        raise
    return handles


async def whole_results(handles: list[JobHandle]) -> list[JobFinished]:
    """Every choice's whole result (non-streaming): all jobs are handed to the runner before any is
    waited for, so that they run in one batch rather than one after another."""
    tasks: list[asyncio.Future[JobFinished]] = []
    try:
        for h in handles:
            h.start()
        tasks = [asyncio.ensure_future(whole_result(h)) for h in handles]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:  # the first failure answers the request; the other choices are cancelled
            if task.done() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        return [task.result() for task in tasks]
    finally:
        for h in handles:
            h.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def choice_seed(seed: int | None, index: int) -> int | None:
    """Choice ``index`` samples with ``seed + index``: reproducible, and not n copies of one answer."""
    return None if seed is None else (seed + index) % (2**63)


async def merged(handles: list[JobHandle]) -> AsyncIterator[tuple[int, JobEvent]]:
    """Every choice's events as they come, with the choice's index; ends when all have finished."""
    queue: asyncio.Queue[tuple[int, JobEvent]] = asyncio.Queue()

    async def pump(index: int, handle: JobHandle) -> None:
        try:
            async for event in handle:
                await queue.put((index, event))
        except Exception as exc:  # the job could not start or its events failed: it still finishes
            await queue.put((index, failed(handle, exc)))

    tasks = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(handles)]
    left = len(handles)
    try:
        while left:
            index, event = await queue.get()
            if isinstance(event, JobFinished):
                left -= 1
            yield index, event
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def failed(handle: JobHandle, exc: Exception) -> JobFinished:
    """The finish of a job whose events could not be had (it never started, or its events failed)."""
    kind = None
    if isinstance(exc, EngineError):
        reason = str(exc)
        kind = "request" if from_engine(exc).status == 400 else None  # an invalid request, not our fault
    else:
        log.exception("job %d of model %s failed outside its backend", handle.job.job_id, handle.model)
        reason = f"generation failed ({type(exc).__name__}: {exc})"
    return JobFinished("error", Usage(handle.prompt_tokens, 0), "", None, 0.0, error=reason, error_kind=kind)


def summed_usage(finished: list[JobFinished]) -> dict[str, int]:
    """One prompt (the choices share it), every choice's completion tokens."""
    prompt = finished[0].usage.prompt_tokens
    completion = sum(f.usage.completion_tokens for f in finished)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _entry(token: str, logprob: float, raw: bytes | None = None) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8") if raw is None else raw)}


def chat_logprobs(items: tuple[TokenLogprob, ...] | list[TokenLogprob], top: int) -> dict[str, Any]:
    """A chat choice's ``logprobs``: ``content`` with each token, its bytes (the token's own where the
    backend gave them, else its text's) and ``top_logprobs``."""
    def alternatives(t: TokenLogprob) -> list[dict[str, Any]]:
        raws = t.top_raw if len(t.top_raw) == len(t.top) else (None,) * len(t.top)
        return [_entry(a, lp, r) for (a, lp), r in zip(t.top[:top], raws)]

    return {"content": [{**_entry(t.token, t.logprob, t.raw), "top_logprobs": alternatives(t)} for t in items],
            "refusal": None}


def completion_logprobs(items: tuple[TokenLogprob, ...] | list[TokenLogprob], offset: int) -> dict[str, Any]:
    """A text completion choice's ``logprobs`` (the legacy shape); ``offset``: where its text starts."""
    offsets = []
    for t in items:
        offsets.append(offset)
        offset += len(t.token)
    return {"tokens": [t.token for t in items], "token_logprobs": [t.logprob for t in items],
            "top_logprobs": [dict(t.top) for t in items], "text_offset": offsets}
