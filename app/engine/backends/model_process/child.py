"""The model process's side: build the backend, load the model, then step while there is work.

The process first imports torch and the backend's library (the backend class's ``warm_up``, reported
as load progress: minutes when exllamav2's CUDA extension is built), waits for :class:`Load`, loads
while a listener thread takes :class:`CancelLoad`, and then serves (:func:`serve`): it keeps stepping
while it has jobs and never waits for the server; between two steps it takes the server's commands.
"""

from __future__ import annotations

import importlib
import logging
import os
import select
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from app.engine.backends.contract import Backend, BackendLoadError, LoadCancelled, StepFailed
from app.engine.backends.model_process import protocol as p
from app.engine.events import BackendJob, StepEvent

log = logging.getLogger(__name__)
MEMORY_EVERY_S = 1.0
#: the model process's own resident memory in its memory report (the app's is "rss")
RSS_KEY = "model-process-rss"


def child_main(conn: Any, target: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s model-process %(levelname)s %(name)s: %(message)s")
    module_name, class_name = target.split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    limit_host_threads(cls.host_threads)
    try:  # the heavy imports first, reported as load progress (minutes when a CUDA build runs)
        cls.warm_up(lambda f, m: conn.send(p.pack(p.Progress(f, m))))
    except (EOFError, OSError):
        return  # the server has gone
    except Exception:  # noqa: BLE001 - load() meets the same problem and reports it readably
        log.warning("warming up %s failed", target, exc_info=True)
    limit_host_threads(cls.host_threads)  # torch is imported now
    try:
        msg = p.unpack(conn.recv())
    except (EOFError, OSError):
        return
    if not isinstance(msg, p.Load):
        return
    backend = _load(cls(msg.model_dir, **msg.kwargs), conn)
    if backend is not None:
        serve(backend, conn)


def limit_host_threads(threads: int | None) -> None:
    """Cap the CPU threads of torch's operators in this process at ``threads`` (a backend's
    ``host_threads``; None leaves torch's default of one per core). For a GPU backend: its host work is one
    thread launching kernels, and torch's idle OpenMP workers spin beside it. Measured on the H200 (16
    cores; TinyLlama-shaped EXL3 model, 32 streams through HTTP): with the default the model process kept
    9.2 cores busy and took 25-31 ms a step; with one thread, 1.0 core and 13 ms (the direct loop alone 12.5
    to 17.7 ms; with two busy processes beside it, 40 ms with the default, 17.5 ms with one thread)."""
    if not threads:
        return
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # read when torch is first imported
        os.environ[var] = str(threads)
    torch = sys.modules.get("torch")
    if torch is not None:  # imported already (by a fork server's preload or the warm-up)
        torch.set_num_threads(threads)


def _load(backend: Backend, conn: Any) -> Backend | None:
    """Load the model, taking a cancel from the server meanwhile; the backend once loaded, else None."""
    cancel = threading.Event()
    send_lock = threading.Lock()

    def send(out: p.Message) -> None:
        with send_lock:
            conn.send(p.pack(out))

    def listen_while_loading() -> None:
        while True:
            try:
                got = p.unpack(conn.recv())
            except (EOFError, OSError):
                cancel.set()
                return
            if isinstance(got, p.CancelLoad):
                cancel.set()
            elif isinstance(got, p.Serve):
                return

    listener = threading.Thread(target=listen_while_loading, name="load-commands", daemon=True)
    listener.start()
    try:
        backend.load(lambda f, m: send(p.Progress(f, m)), cancel)
    except LoadCancelled as exc:
        send(p.LoadFailed(True, str(exc)))
        return None
    except BackendLoadError as exc:
        send(p.LoadFailed(False, str(exc)))
        return None
    except Exception as exc:  # noqa: BLE001 - anything else is still a readable load failure
        log.exception("loading failed")
        send(p.LoadFailed(False, f"{type(exc).__name__}: {exc}"))
        return None
    send(p.Loaded(p.LoadedInfo(backend.batching, backend.notice, backend.vocab_size, set(backend.eos_token_ids()),
                               backend.encoder_spec(), memory_report(backend).memory)))
    listener.join()  # it ends on Serve: from here on this thread reads the pipe itself
    return backend


@dataclass
class _OutJob:
    """What the outbox keeps of one job until its end."""

    stream: bool
    started: bool = False
    #: [end of its first step, later steps, time in them, end of its last step] once it has had an event
    times: list | None = field(default=None)


class Outbox:
    """A step's events on their way to the server.

    Every message wakes the server's event loop, and on a virtual machine the write that wakes a
    sleeping reader costs the writer (this process, between two steps) tens of microseconds. A
    streaming job needs each token at once; a non-streaming job only needs its end. So a job's first
    event (time to first token), its last, and all of a streaming job's go at once; a non-streaming
    job's others are merged and held for at most ``HOLD_S`` (the server's token counters stay live).

    It also times each job's steps after its first (:class:`~app.engine.events.DecodeTimes`, sent with
    its last event): what the server's request log shows of the model process's side of decoding.
    """

    HOLD_S = 0.1

    def __init__(self, send: Callable[[tuple], None]) -> None:
        self._send = send
        self._jobs: dict[int, _OutJob] = {}
        #: a non-streaming job's merged events not sent yet, in the order they came
        self._held: dict[int, StepEvent] = {}
        self._held_since: float | None = None

    def submitted(self, job: BackendJob) -> None:
        self._jobs[job.job_id] = _OutJob(job.stream)

    def forget(self, job_id: int) -> None:
        self._jobs.pop(job_id, None)
        self._held.pop(job_id, None)

    def _time(self, events: list[StepEvent], t_start: float, t_end: float) -> None:
        """Every step counts for every job between its first event and its last (a step may give a job
        no event: the backend can hold back text that may begin a stop string)."""
        for job in self._jobs.values():
            if job.times is not None:
                job.times[1] += 1
                job.times[2] += t_end - t_start
                job.times[3] = t_end
        for event in events:
            job = self._jobs.get(event.job_id)
            if job is not None and job.times is None:
                job.times = [t_end, 0, 0.0, t_end]

    def step(self, events: list[StepEvent], batch: int, t_start: float, t_end: float) -> None:
        self._time(events, t_start, t_end)
        if self._held_since is None and len(events) == 1:
            job = self._jobs.get(events[0].job_id)
            if job is None or job.stream:  # the common case (one streaming job): straight out
                self._send(p.events_wire(self.wire(events), batch, t_start, t_end))
                return
        urgent = False
        loose = []  # events of jobs not known here (cancelled meanwhile): sent as they came
        for event in events:
            job = self._jobs.get(event.job_id)
            if job is None:
                loose.append(event)
                urgent = True
                continue
            if event.finished or job.stream or not job.started:
                urgent = True
            job.started = True
            held = self._held.get(event.job_id)
            self._held[event.job_id] = event if held is None else StepEvent(
                event.job_id, held.text + event.text, held.new_tokens + event.new_tokens, event.finished,
                event.finish_reason, event.error, event.decode_times, held.logprobs + event.logprobs,
                event.error_kind)
            if self._held_since is None:
                self._held_since = t_start
        if urgent or (self._held_since is not None and t_end - self._held_since >= self.HOLD_S):
            self.flush(batch, t_start, t_end, loose)

    def flush(self, batch: int = 0, t_start: float = 0.0, t_end: float = 0.0,
              loose: list[StepEvent] | None = None) -> None:
        events = [*self._held.values(), *(loose or [])]
        self._held, self._held_since = {}, None
        if events:
            self._send(p.events_wire(self.wire(events), batch, t_start, t_end))

    def wire(self, events: list[StepEvent]) -> list[tuple]:
        """``events`` as sent; a finished job's decode times go with its last event and it is forgotten."""
        out = []
        for e in events:
            job = self._jobs.pop(e.job_id, None) if e.finished else None
            rec = None if job is None else job.times
            out.append(p.event_tuple(e, None if rec is None else (rec[1], rec[2], rec[3] - rec[0])))
        return out


def serve(backend: Backend, conn: Any) -> None:
    """Step while there is work; between steps take commands; report memory while working."""
    memory_at = time.monotonic()
    outbox = Outbox(p.pipe_writer(conn))
    # between two steps the pipe is only glanced at: a poll object is cheaper than conn.poll(0)
    poller = select.poll() if hasattr(select, "poll") else None
    if poller is not None:
        poller.register(conn.fileno(), select.POLLIN)

    def has_command(busy: bool) -> bool:
        if busy and poller is not None:
            return bool(poller.poll(0))
        return bool(conn.poll(0 if busy else None))

    while True:
        busy = was_busy = backend.has_work()
        try:
            while has_command(busy):
                if not handle(backend, conn, p.unpack(conn.recv()), outbox):
                    return
                busy = backend.has_work()
        except (EOFError, OSError):  # the server went away
            backend.unload()
            return
        if not busy:
            if was_busy:  # its last jobs were cancelled: say it holds none
                conn.send(p.pack(memory_report(backend)))
            continue
        _step(backend, conn, outbox)
        now = time.monotonic()
        done = not backend.has_work()
        if done:
            outbox.flush()
        if done or now - memory_at >= MEMORY_EVERY_S:
            memory_at = now
            conn.send(p.pack(memory_report(backend)))


def memory_report(backend: Backend) -> p.Memory:
    """The backend's memory figures with this process's RSS, and how many jobs it holds."""
    memory = dict(backend.memory_used())
    try:
        import psutil

        memory[RSS_KEY] = psutil.Process().memory_info().rss
    except (ImportError, OSError):
        pass
    return p.Memory(memory, backend.active_jobs())


def _step(backend: Backend, conn: Any, outbox: Outbox) -> None:
    t_start = time.monotonic()
    try:
        events = backend.step()
    except StepFailed as exc:
        outbox.flush()
        surviving = outbox.wire(backend.take_surviving_events())
        conn.send(p.pack(p.StepFailedMsg(exc.job_ids, str(exc), surviving, backend.last_step_batch)))
        for job_id in exc.job_ids:
            outbox.forget(job_id)
    except Exception as exc:  # noqa: BLE001 - the server fails the jobs with this reason
        log.exception("step failed")
        outbox.flush()
        conn.send(p.pack(p.StepError(f"{type(exc).__name__}: {exc}")))
    else:
        outbox.step(events, backend.last_step_batch, t_start, time.monotonic())


def handle(backend: Backend, conn: Any, msg: p.Message, outbox: Outbox) -> bool:
    """One command from the server; False when the process should end."""
    if isinstance(msg, p.Submit):
        outbox.submitted(msg.job)
        backend.submit(msg.job)
    elif isinstance(msg, p.Cancel):
        outbox.forget(msg.job_id)
        backend.cancel(msg.job_id)
    elif isinstance(msg, (p.Encode, p.Census)):
        try:
            if isinstance(msg, p.Encode):
                answer: Any = backend.encode(msg.text, add_bos=msg.add_bos)
            else:
                from app.engine.observability.diagnostics import cuda_tensor_census

                answer = cuda_tensor_census()
        except Exception as exc:  # noqa: BLE001 - the caller gets the reason
            answer = exc
        conn.send(p.pack(p.Reply(msg.request_id, answer)))
    elif isinstance(msg, p.Unload):
        backend.unload()
        conn.send(p.pack(p.Unloaded()))
        return False
    return True
