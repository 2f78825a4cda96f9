"""Drive a backend that runs in a model process from the event loop itself.

The model process steps on its own; all this side does is write jobs to its pipe and read its events.
Doing both on the event loop (the pipe is one more descriptor the loop waits on) leaves no thread in
between: a request's job reaches the model process as soon as the loop has prepared it, and a step's
events wake the loop directly, which writes them to the clients. With the thread-based
:class:`~app.engine.serving.runner.Runner` each of those crossings was two wake-ups (loop -> runner thread ->
model process, and back), each a few hundred microseconds on a busy or virtualised machine, on the
path of every first token.

Once every running job has its first text and the model steps fast, the loop stops waiting on the
pipe and reads it on a short timer instead (:data:`POLL_FASTER_THAN_S`). A write that wakes a
sleeping reader costs the writer, here the model process between two of its steps, tens of
microseconds on a virtual machine: a few per cent of a 2.5 ms step. With nobody waiting on the pipe,
the write costs nothing more than the copy; the tokens reach the clients up to one poll interval later
(half a step, 1 to 2 ms), and time to first token is untouched.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from app.engine.errors import ModelLoadError
from app.engine.backends.contract import Backend, PipeBacked
from app.engine.backends.model_process.protocol import Events, StepMessage
from app.engine.events import BackendJob, JobEvent
from app.engine.observability.metrics import EngineMetrics
from app.engine.serving.runner import RunnerBase, _distribute, _Tracked

log = logging.getLogger(__name__)
#: poll instead of waiting when the model's steps come faster than this
POLL_FASTER_THAN_S = 0.010
#: the poll interval: half a step, within these (qasync's timers count whole milliseconds: less than
#: 1 ms would be a timer of 0, a busy loop)
POLL_MIN_S, POLL_MAX_S = 0.001, 0.002


def loop_can_read(loop: asyncio.AbstractEventLoop, backend: Backend) -> bool:
    """Whether ``backend`` offers its pipe and ``loop`` can watch a descriptor (not every loop can)."""
    if not isinstance(backend, PipeBacked):
        return False
    try:
        fd = backend.fileno()
        loop.add_reader(fd, lambda: None)
        loop.remove_reader(fd)
    except (NotImplementedError, AttributeError, OSError, ValueError):
        return False
    return True


class PipeRunner(RunnerBase):
    """Same contract as :class:`~app.engine.serving.runner.Runner`; call everything but :meth:`stop` on the event loop."""

    steps_elsewhere = True

    def __init__(self, model: str, backend: PipeBacked, metrics: EngineMetrics,
                 loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(model, backend, metrics, loop)  # type: ignore[arg-type]
        self.pipe = backend
        self._fd: int | None = None  # set while the loop waits on the pipe
        self._timer: asyncio.TimerHandle | None = None  # set while it polls the pipe instead
        self._step_s: float | None = None  # how long the model process's recent steps took
        #: how many pipe reads came from the timer and from the pipe's readiness (diagnostics, tests)
        self.polled_reads = 0
        self.woken_reads = 0

    def start(self) -> None:
        self.pipe.loop_reads = True
        self._wait_on_pipe()

    def submit(self, job: BackendJob) -> asyncio.Queue[JobEvent]:
        if self._stopping:
            raise ModelLoadError(f"model {self.model} is unloading; send the request again to load it anew")
        queue: asyncio.Queue[JobEvent] = asyncio.Queue()
        tracked = _Tracked(job, queue)
        tracked.picked = tracked.submitted
        self._tracked[job.job_id] = tracked
        self._metrics.running.inc()
        self._metrics.record_prompt(len(job.prompt_ids))
        self.backend.submit(job)  # a write to the pipe; the model process reads it between two steps
        if self.pipe.has_pending():  # the process is gone: the job's error is already here
            self._loop.call_soon(self._read)
        self._choose_mode()  # a job waits for its first text: wake on the pipe
        return queue

    def cancel(self, job_id: int) -> None:
        tracked = self._tracked.get(job_id)
        if tracked is not None:
            self.backend.cancel(job_id)
            self._finish(tracked, "cancelled", "")
            self._flush()

    def cancel_all(self, reason: str = "the server is shutting down") -> None:
        self._end_all(reason)

    def job_count(self) -> int:
        return len(self._tracked)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop reading; jobs still inside end with an error. Called off the loop (or on it)."""
        done = threading.Event()

        def stop_here() -> None:
            self._stopping = True
            self._stop_reading()
            self._end_all("the model was unloaded while generating")
            self.pipe.loop_reads = False
            done.set()

        if self._loop.is_closed():
            stop_here()
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            stop_here()
            return
        try:
            self._loop.call_soon_threadsafe(stop_here)
        except RuntimeError:  # closed in between
            stop_here()
            return
        if not done.wait(timeout):
            log.warning("model %s: the event loop did not stop the pipe reader in %.0f s", self.model, timeout)

    # -- on the event loop -------------------------------------------------------------
    def _woken(self) -> None:
        self.woken_reads += 1
        self._read()

    def _polled(self) -> None:
        self._timer = None
        self.polled_reads += 1
        self._read()

    def _read(self) -> None:
        pipe = self.pipe
        for msg in pipe.read_available():
            self._apply_step(lambda m=msg: pipe.take_step(m))
            self._note_step(msg)
        dead = pipe.dead
        if dead is not None:
            self._stop_reading()
            self._end_all(dead)
        self._flush()
        if dead is None and not self._stopping:
            self._choose_mode()

    def _note_step(self, msg: StepMessage) -> None:
        """Follow how long the model process's steps take (its own clock: idle time does not count)."""
        if not isinstance(msg, Events) or msg.t_end <= msg.t_start:
            return
        took = msg.t_end - msg.t_start
        self._step_s = took if self._step_s is None else 0.7 * self._step_s + 0.3 * took

    def _choose_mode(self) -> None:
        """Poll while a job streams, every job has its first text and steps are fast; else wait on the
        pipe (non-streaming jobs alone get a message every tenth of a second: waking for those is
        cheaper than polling, and their end is read at once)."""
        if self._stopping:
            return
        tracked = self._tracked.values()
        fast = self._step_s is not None and self._step_s < POLL_FASTER_THAN_S
        if not (tracked and fast and all(t.first_text is not None for t in tracked)
                and any(t.job.stream for t in tracked)):
            self._wait_on_pipe()
            return
        if self._fd is not None:
            self._loop.remove_reader(self._fd)
            self._fd = None
        if self._timer is None:
            interval = min(max((self._step_s or 0.0) / 2, POLL_MIN_S), POLL_MAX_S)
            self._timer = self._loop.call_later(interval, self._polled)

    def _wait_on_pipe(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._fd is None:
            self._fd = self.pipe.fileno()
            self._loop.add_reader(self._fd, self._woken)

    def _stop_reading(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._fd is not None:
            self._loop.remove_reader(self._fd)
            self._fd = None

    def _end_all(self, reason: str) -> None:
        self._fail_all(reason)
        self._flush()

    def _first_text(self, tracked: _Tracked) -> None:
        tracked.step_times = self.pipe.last_step_times

    def _flush(self) -> None:
        """On the loop already: the events go straight into the jobs' queues."""
        if self._outbox:
            batch, self._outbox = self._outbox, []
            _distribute(batch)
