"""The worker thread that drives one loaded backend and hands events to asyncio.

:class:`RunnerBase` is what every runner does with a backend's events (tracking, delivery, metrics);
:class:`Runner` is the thread described here; :class:`~app.engine.serving.pipe_runner.PipeRunner` drives a
backend in a model process from the event loop itself.

The backend's step loop never runs on the event loop. Jobs and cancels reach the thread through a
condition-guarded inbox; events go back with ``loop.call_soon_threadsafe`` into each job's
unbounded asyncio queue (unbounded so that one slow client can never stall the step loop).
Non-streaming jobs get a single final event with the whole text.

Time to first text: when a step produces a streaming job's first text, the thread waits (briefly,
at most ``HANDOFF_WAIT_S``) until the consumer has written it before it runs the next step. Without
that, the next step takes the GIL back while the event loop is still encoding and sending the first
chunk, and every client waits for the GPU thread's next switch interval.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from app.engine.errors import ModelLoadError
from app.engine.backends.contract import Backend, StepFailed
from app.engine.events import BackendJob, DecodeTimes, ErrorKind, JobEvent, JobFinished, StepEvent, TextDelta, Usage
from app.engine.observability.metrics import EngineMetrics, RequestRecord

log = logging.getLogger(__name__)
SWITCH_INTERVAL = 0.0005
HANDOFF_WAIT_S = 0.002


@dataclass
class _Tracked:
    job: BackendJob
    queue: asyncio.Queue[JobEvent]
    submitted: float = field(default_factory=time.monotonic)
    picked: float | None = None  # the GPU thread took the job
    first_text: float | None = None  # the backend produced the first visible text
    sent: float | None = None  # the consumer has written the first text (streaming jobs)
    first_token: float | None = None
    #: (start, end, read) of the model-process step that gave the first text (process backends)
    step_times: tuple[float, float, float] | None = None
    last_token: float | None = None
    tokens: int = 0
    text: list[str] = field(default_factory=list)
    #: log-probabilities not yet handed on (jobs that asked for them)
    logprobs: list = field(default_factory=list)


class RunnerBase:
    """What every runner does with a backend's events: track jobs, deliver text and the end, metrics.

    Subclasses say how jobs reach the backend and how events reach the loop (:meth:`_flush`).
    """

    #: the backend steps outside this process (no GIL shared with the event loop)
    steps_elsewhere = False

    def __init__(self, model: str, backend: Backend, metrics: EngineMetrics,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.model = model
        self.backend = backend
        self._metrics = metrics
        self._loop = loop
        self._tracked: dict[int, _Tracked] = {}
        self._stopping = False
        self._outbox: list[tuple[asyncio.Queue, JobEvent]] = []
        self.steps = 0

    def first_text_sent(self, job_id: int) -> None:
        """The consumer has written a streaming job's first text."""
        tracked = self._tracked.get(job_id)
        if tracked is not None and tracked.sent is None:
            tracked.sent = time.monotonic()

    def _apply_step(self, step: Callable[[], list[StepEvent]]) -> bool:
        """Run ``step`` (one backend step, or the reading of one) and deliver its events; False when the
        backend failed as a whole (every job it had has been ended with the reason)."""
        backend = self.backend
        try:
            events = step()
        except StepFailed as exc:  # only some jobs failed; the backend has dropped them
            for job_id in exc.job_ids:
                if job_id in self._tracked:
                    self._finish(self._tracked[job_id], "error", "", error=f"generation failed: {exc}")
            events = backend.take_surviving_events()
        except Exception as exc:  # a backend fault fails the jobs it affected, not the engine
            log.exception("backend step failed for model %s", self.model)
            self._fail_all(f"generation failed: {exc}")
            return False
        self.steps += 1
        self._metrics.record_step(backend.last_step_batch)
        for event in events:
            tracked = self._tracked.get(event.job_id)
            if tracked is not None:
                self._deliver(tracked, event)
        return True

    def _fail_all(self, reason: str) -> None:
        """Cancel every job in the backend and end it with an error saying ``reason``."""
        for tracked in list(self._tracked.values()):
            self.backend.cancel(tracked.job.job_id)
            self._finish(tracked, "error", "", error=reason)

    def _first_text(self, tracked: _Tracked) -> None:
        """A job's first visible text has just come (a hook for the subclasses)."""

    @staticmethod
    def _take_logprobs(tracked: _Tracked) -> tuple:
        out = tuple(tracked.logprobs)
        tracked.logprobs.clear()
        return out

    def _deliver(self, tracked: _Tracked, event: StepEvent) -> None:
        now = time.monotonic()
        if event.text and tracked.first_text is None:
            tracked.first_text = now
            self._first_text(tracked)
        if event.new_tokens:
            if tracked.first_token is None:
                tracked.first_token = now
            elif tracked.last_token is not None:
                self._metrics.token_latency.observe((now - tracked.last_token) / event.new_tokens)
            tracked.last_token = now
            tracked.tokens += event.new_tokens
            self._metrics.record_tokens(event.new_tokens)
        tracked.logprobs.extend(event.logprobs)
        if event.finished:
            self._finish(tracked, event.finish_reason or "stop", event.text, error=event.error,
                         decode=event.decode_times, error_kind=event.error_kind)
        elif event.text:
            if tracked.job.stream:
                self._post(tracked, TextDelta(event.text, self._take_logprobs(tracked)))
            else:
                tracked.text.append(event.text)

    def _finish(self, tracked: _Tracked, reason: str, text: str, error: str | None = None,
                decode: DecodeTimes | None = None, error_kind: ErrorKind | None = None) -> None:
        """End a job; ``decode``: the model process's timing of its later steps (process backends)."""
        self._tracked.pop(tracked.job.job_id, None)
        now = time.monotonic()
        if tracked.job.stream and text:
            self._post(tracked, TextDelta(text, self._take_logprobs(tracked)))
            text = ""
        full = "".join(tracked.text) + text
        ttft = None if tracked.first_token is None else tracked.first_token - tracked.submitted
        usage = Usage(len(tracked.job.prompt_ids), tracked.tokens)
        self._post(tracked, JobFinished(reason, usage, full, ttft, now - tracked.submitted, error,  # type: ignore[arg-type]
                                        self._take_logprobs(tracked), error_kind))
        self._metrics.running.dec()
        gen_time = (now - tracked.first_token) if tracked.first_token else 0.0
        tps = (tracked.tokens - 1) / gen_time if tracked.tokens > 1 and gen_time > 0 else None
        picked, first, sent, steps = tracked.picked, tracked.first_text, tracked.sent, tracked.step_times
        self._metrics.record_finished(RequestRecord(
            self.model, usage.prompt_tokens, usage.completion_tokens, ttft, tps, reason, time.time(),
            queued_s=None if picked is None else picked - tracked.submitted,
            first_step_s=None if picked is None or first is None else first - picked,
            handoff_s=None if first is None or sent is None else sent - first,
            to_model_step_s=None if steps is None or picked is None else steps[0] - picked,
            model_step_s=None if steps is None else steps[1] - steps[0],
            from_model_s=None if steps is None else steps[2] - steps[1],
            model_decode_steps=None if decode is None else decode.steps,
            model_decode_in_steps_s=None if decode is None else decode.in_steps_s,
            model_decode_span_s=None if decode is None else decode.span_s))

    def _post(self, tracked: _Tracked, event: JobEvent) -> None:
        self._outbox.append((tracked.queue, event))

    def _flush(self) -> None:
        raise NotImplementedError


class Runner(RunnerBase):
    """Owns a loaded backend and its worker thread."""

    def __init__(self, model: str, backend: Backend, metrics: EngineMetrics,
                 loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(model, backend, metrics, loop)
        self._cond = threading.Condition()
        self._inbox: list[_Tracked] = []
        self._cancels: set[int] = set()
        self._cancel_all = False
        self._cancel_reason = ""
        self._handoff_lock = threading.Lock()
        self._handoff_pending: set[int] = set()
        self._handoff_new: list[int] = []
        self._handoff_done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"runner:{model}", daemon=True)

    def start(self) -> None:
        # The step loop and the event loop share the GIL. While this thread runs Python between
        # kernel launches, the event loop waits for the GIL up to the switch interval (5 ms by
        # default) each time it wakes: that alone added tens of ms to time-to-first-token on the GPU.
        if sys.getswitchinterval() > SWITCH_INTERVAL:
            sys.setswitchinterval(SWITCH_INTERVAL)
        self._thread.start()

    # -- called on the event loop ----------------------------------------------
    def submit(self, job: BackendJob) -> asyncio.Queue[JobEvent]:
        queue: asyncio.Queue[JobEvent] = asyncio.Queue()
        with self._cond:
            if self._stopping:
                raise ModelLoadError(f"model {self.model} is unloading; send the request again to load it anew")
            self._inbox.append(_Tracked(job, queue))
            self._cond.notify()
        self._metrics.running.inc()
        self._metrics.record_prompt(len(job.prompt_ids))
        return queue

    def first_text_sent(self, job_id: int) -> None:
        """The consumer has written a streaming job's first text (lets the GPU thread go on at once)."""
        super().first_text_sent(job_id)
        with self._handoff_lock:
            self._handoff_pending.discard(job_id)
            if not self._handoff_pending:
                self._handoff_done.set()

    def cancel(self, job_id: int) -> None:
        with self._cond:
            self._cancels.add(job_id)
            self._cond.notify()

    def cancel_all(self, reason: str = "the server is shutting down") -> None:
        """End every job with an error saying ``reason`` (used at shutdown)."""
        with self._cond:
            self._cancel_all = True
            self._cancel_reason = reason
            self._cond.notify()

    def job_count(self) -> int:
        with self._cond:
            return len(self._tracked) + len(self._inbox)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the thread; jobs still inside are ended with an error. Blocks: call off the loop."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # -- the worker thread ------------------------------------------------------
    def _run(self) -> None:
        backend = self.backend
        while True:
            with self._cond:
                while not (self._inbox or self._cancels or self._stopping or self._cancel_all
                           or self._tracked or backend.has_work()):
                    self._cond.wait()
                new, self._inbox = self._inbox, []
                cancels, self._cancels = self._cancels, set()
                stopping, cancel_all, self._cancel_all = self._stopping, self._cancel_all, False
            for tracked in new:
                tracked.picked = time.monotonic()
                self._tracked[tracked.job.job_id] = tracked
                backend.submit(tracked.job)
            if cancel_all:
                self._fail_all(self._cancel_reason)
            for job_id in cancels:
                if job_id in self._tracked:
                    backend.cancel(job_id)
                    self._finish(self._tracked[job_id], "cancelled", "")
            if stopping:
                self._fail_all("the model was unloaded while generating")
                self._flush()
                return
            self._flush()
            if not (self._tracked or backend.has_work()):
                continue
            if self._apply_step(backend.step):
                self._flush_and_hand_off()
            else:
                self._flush()

    def _flush_and_hand_off(self) -> None:
        """Flush; if this step carried a streaming job's first text, let the loop send it first."""
        new, self._handoff_new = self._handoff_new, []
        if not new:
            self._flush()
            return
        with self._handoff_lock:
            self._handoff_pending = set(new)
            self._handoff_done.clear()
        self._flush()
        self._handoff_done.wait(HANDOFF_WAIT_S)  # releases the GIL; the consumer sets it when written
        with self._handoff_lock:
            self._handoff_pending.clear()

    def _first_text(self, tracked: _Tracked) -> None:
        if tracked.job.stream:
            self._handoff_new.append(tracked.job.job_id)

    def _flush(self) -> None:
        """Hand this step's events to the loop in one wake-up (one self-pipe write per step)."""
        if not self._outbox:
            return
        batch, self._outbox = self._outbox, []
        try:
            self._loop.call_soon_threadsafe(_distribute, batch)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


def _distribute(batch: list[tuple[asyncio.Queue, JobEvent]]) -> None:
    for queue, event in batch:
        queue.put_nowait(event)
