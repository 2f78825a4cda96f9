"""A submitted job as its caller sees it: an async iterator of its events, and its cancellation."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from app.engine.errors import ModelLoadError
from app.engine.events import BackendJob, JobEvent, JobFinished, TextDelta
from app.engine.serving.manager import ModelManager, Resident


class JobHandle:
    """The events of one job. Iterate it once; leaving the iteration early cancels the job."""

    def __init__(self, manager: ModelManager, resident: Resident, job: BackendJob, model: str) -> None:
        self._manager = manager
        self._resident = resident
        self.job = job
        self._queue: asyncio.Queue[JobEvent] | None = None
        self.model = model
        self.prompt_tokens = len(job.prompt_ids)
        self.finished: JobFinished | None = None
        self._released = False
        #: seconds from the request reaching the engine to the job entering the runner
        self.prepare_s = 0.0
        #: the format the model writes tool calls in, when the request gave tools (None: not parsed)
        self.tool_format: str | None = None

    def start_early(self) -> None:
        """Hand the job over now if nothing here competes with the event loop for it (a model process
        steps on its own), so that the first step overlaps the response headers."""
        runner = self._resident.runner
        if runner is not None and runner.steps_elsewhere:
            self.start()

    def start(self) -> None:
        """Hand the job to the runner. Done on first iteration, so that the event loop has finished
        its own work for the request (headers written) before the GPU thread starts competing with
        it for the GIL."""
        if self._queue is not None:
            return
        runner = self._resident.runner
        if runner is None:
            raise ModelLoadError(f"model {self.model} is not loaded any more")
        self._queue = runner.submit(self.job)

    async def events(self) -> AsyncIterator[JobEvent]:
        try:
            self.start()
            assert self._queue is not None
            first_text = True
            while True:
                event = await self._queue.get()
                if isinstance(event, JobFinished):
                    self.finished = event
                    self._release()
                    yield event
                    return
                yield event
                if first_text and isinstance(event, TextDelta):
                    # the consumer asked for more: it has sent the first text; the GPU thread goes on
                    first_text = False
                    runner = self._resident.runner
                    if runner is not None:
                        runner.first_text_sent(self.job.job_id)
        finally:
            self.cancel()

    def __aiter__(self) -> AsyncIterator[JobEvent]:
        return self.events()

    async def result(self) -> JobFinished:
        """Wait for the end (for non-streaming jobs, the final event carries the whole text)."""
        async for event in self.events():
            if isinstance(event, JobFinished):
                return event
        raise RuntimeError("job ended without a result")  # pragma: no cover - events() always finishes

    def cancel(self) -> None:
        """Cancel the job if it is still running (idempotent)."""
        if self.finished is None and not self._released:
            runner = self._resident.runner
            if runner is not None and self._queue is not None:
                runner.cancel(self.job.job_id)
            self._release()

    def _release(self) -> None:
        if not self._released:
            self._released = True
            self._manager.release(self._resident)
