"""Run a backend in a process of its own (the "model process"), behind the same backend contract.

Why: a backend's step loop is mostly Python launching GPU kernels. In the server's process it shares
the GIL with the event loop, so every chunk the loop sends and every request it parses stalls the
step loop, and the first token waits for the loop's turn. In its own process the step loop runs as
fast as a bare generator loop; the server only relays events. Unloading ends the process, which
also returns every byte of GPU memory the backend's libraries kept for themselves.

A new process first imports torch and the backend's library (seconds; the first time ever, the
exllamav2 extension's CUDA build: minutes) and says so as load progress, then loads the model. After a
first load one spare process with those imports done waits for the next (:class:`SparePool`).

Messages over a ``multiprocessing`` pipe (pickled tuples):

- to the model process: ``("load", model_dir, kwargs)``, ``("cancel_load",)`` and ``("serve",)``
  while loading; then ``("submit", job)``, ``("cancel", job_id)``, ``("encode", request_id, text,
  add_bos)``, ``("census", request_id)``, ``("unload",)``
- from it: ``("progress", fraction, message)``, ``("loaded", info)``,
  ``("load_failed", cancelled, message)``; then ``("events", events, batch, t_start, t_end)`` after
  a step (see :class:`Outbox` for the steps of non-streaming jobs; events travel as plain tuples,
  :func:`to_wire`), ``("step_failed", job_ids, message, events, batch)``, ``("step_error", message)``,
  ``("memory", {device: bytes})`` (while working), ``("reply", request_id, answer)``, ``("unloaded",)``

The model process keeps stepping while it has jobs and never waits for this side. On this side
whoever needs a message reads the pipe: the event loop through :meth:`ProcessBackend.read_available`
(see :mod:`app.engine.serving.pipe_runner`), or where a loop cannot watch it the runner thread in
:meth:`ProcessBackend.step` and a caller of :meth:`ProcessBackend.encode`; no relay thread between.
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import os
import pickle
import select
import struct
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from app.engine.backends.contract import BackendLoadError, LoadCancelled, ProgressFn, StepFailed
from app.engine.events import BackendJob, DecodeTimes, StepEvent
from app.engine.catalog.tokenizer import EncoderSpec, FolderTokenizer, TokenizerError, with_bos

log = logging.getLogger(__name__)
MEMORY_EVERY_S = 1.0
POLL_S = 0.05
CANCEL_GRACE_S = 2.0


@dataclass
class LoadedInfo:
    """What the model process reports once the model is loaded."""

    batching: str
    notice: str
    vocab_size: int | None
    eos_ids: set[int]
    encoder: EncoderSpec | None
    memory: dict[str, int] = field(default_factory=dict)


def start_process(target: str) -> tuple[Any, Any]:
    ctx = multiprocessing.get_context("spawn")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=child_main, args=(there, target), name=f"model-process:{target}", daemon=True)
    proc.start()
    there.close()
    return proc, here


class SparePool:
    """At most one started, model-less model process per backend, kept from a first load on.

    A model process spends seconds importing torch and the backend's library before it can load
    anything (about 10 s for exllamav2 on the GPU test machine), which every model switch would pay.
    The spare has done those imports and waits for a model; it costs that process's memory and no GPU
    memory (nothing touches CUDA before a model is loaded). It ends with the server, by itself when
    the server's end of its pipe closes, or ``idle_s`` after the last model of its backend was
    unloaded (an app left idle gives the memory back).
    """

    def __init__(self, idle_s: float = 600.0) -> None:
        self.idle_s = idle_s
        self._lock = threading.Lock()
        self._spares: dict[str, tuple[Any, Any]] = {}
        self._loaded: dict[str, int] = {}
        self._timers: dict[str, threading.Timer] = {}

    def loaded(self, target: str) -> None:
        """A model of ``target`` is loaded: keep its spare."""
        with self._lock:
            self._loaded[target] = self._loaded.get(target, 0) + 1
            timer = self._timers.pop(target, None)
        if timer is not None:
            timer.cancel()

    def unloaded(self, target: str) -> None:
        """A model of ``target`` is gone; with none left, its spare ends after ``idle_s``."""
        with self._lock:
            self._loaded[target] = max(self._loaded.get(target, 0) - 1, 0)
            if self._loaded[target] or target not in self._spares or target in self._timers:
                return
            timer = self._timers[target] = threading.Timer(self.idle_s, self._expire, [target])
        timer.daemon = True
        timer.start()

    def _expire(self, target: str) -> None:
        with self._lock:
            self._timers.pop(target, None)
            spare = None if self._loaded.get(target) else self._spares.pop(target, None)
        if spare is not None:
            log.info("no %s model loaded for %.0f s: the spare model process ends", target, self.idle_s)
            _end(*spare)

    def take(self, target: str) -> tuple[Any, Any] | None:
        with self._lock:
            spare = self._spares.pop(target, None)
        if spare is not None and spare[0].is_alive():
            return spare
        if spare is not None:
            spare[1].close()
        return None

    def refill(self, target: str) -> None:
        with self._lock:
            if target in self._spares and self._spares[target][0].is_alive():
                return
        started = start_process(target)  # outside the lock: /health reads the pool on the event loop
        with self._lock:
            extra = self._spares.get(target)
            self._spares[target] = started
        if extra is not None:  # a dead spare, or one that another refill started meanwhile: end it
            _end(*extra)

    def describe(self) -> list[dict[str, Any]]:
        with self._lock:
            return [{"backend": t, "pid": proc.pid, "alive": proc.is_alive()} for t, (proc, _) in self._spares.items()]

    def close(self) -> None:
        with self._lock:
            spares, self._spares = list(self._spares.values()), {}
            timers, self._timers = list(self._timers.values()), {}
        for timer in timers:
            timer.cancel()
        for proc, conn in spares:
            _end(proc, conn)


def _end(proc: Any, conn: Any) -> None:
    conn.close()
    proc.kill()
    proc.join(5)


SPARES = SparePool()


class ProcessBackend:
    """A backend of class ``target`` ("module:Class") built and driven in a model process.

    ``keep_spare``: after loading, have a spare process of the same backend ready for the next load
    (see :class:`SparePool`).
    """

    def __init__(self, target: str, name: str, model_dir: str, *, keep_spare: bool = True, **kwargs: Any) -> None:
        self.target = target
        self.name = name
        self.model_dir = model_dir
        self.context_length = int(kwargs["context_length"])
        self.max_batch = int(kwargs["max_batch"])
        self.batching = "single"
        self.notice = ""
        self.vocab_size: int | None = None
        self.last_step_batch = 0
        #: start and end of the model process's last step and when this side read its events
        #: (time.monotonic: one clock for all processes)
        self.last_step_times: tuple[float, float, float] | None = None
        #: encode() needs a round trip to the model process (no tokenizer.json that matches)
        self.encode_blocks = True
        #: the event loop reads the pipe (see PipeRunner): nobody else may, callers wait for it
        self.loop_reads = False
        self._kwargs = kwargs
        self._keep_spare = keep_spare
        self._counted = False  # SPARES knows this backend as loaded
        self._proc: Any = None
        self._conn: Any = None
        self._send_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._inbox: deque[tuple] = deque()
        self._active: set[int] = set()
        self._eos: set[int] = set()
        self._memory: dict[str, int] = {}
        self._encoder: FolderTokenizer | None = None
        self._encoder_bos: int | None = None
        self._replies: dict[int, Future] = {}
        self._next_request = 0
        self._dead: str | None = None
        self._surviving: list[StepEvent] = []

    # -- lifecycle ---------------------------------------------------------------------
    def load(self, progress: ProgressFn, cancel: threading.Event) -> None:
        spare = SPARES.take(self.target) if self._keep_spare else None
        progress(0.0, "starting the model process" if spare is None else "handing the model to a ready process")
        self._proc, self._conn = spare or start_process(self.target)
        try:
            self._send(("load", self.model_dir, self._kwargs))
        except (BrokenPipeError, OSError):  # a spare that ended in the meantime: start a fresh one
            self._reap()
            self._proc, self._conn = start_process(self.target)
            self._send(("load", self.model_dir, self._kwargs))
        cancel_deadline: float | None = None
        while True:
            if cancel.is_set() and cancel_deadline is None:
                self._send(("cancel_load",))
                cancel_deadline = time.monotonic() + CANCEL_GRACE_S
            if cancel_deadline is not None and time.monotonic() > cancel_deadline:
                # still busy (importing, building, reading a large file): the process just ends
                self._reap()
                raise LoadCancelled("load cancelled")
            try:
                if not self._conn.poll(0.1):
                    if not self._proc.is_alive():
                        raise EOFError
                    continue
                msg = self._conn.recv()
            except (EOFError, OSError):
                code = self._proc.exitcode
                self._reap()
                raise BackendLoadError(f"the model process exited while loading (exit code {code})") from None
            if msg[0] == "progress":
                progress(msg[1], msg[2])
            elif msg[0] == "load_failed":
                self._reap()
                raise (LoadCancelled if msg[1] else BackendLoadError)(msg[2])
            elif msg[0] == "loaded":
                self._send(("serve",))
                self._loaded(msg[1])
                if self._keep_spare:
                    SPARES.loaded(self.target)
                    self._counted = True
                    SPARES.refill(self.target)
                return

    def _loaded(self, info: LoadedInfo) -> None:
        self.batching, self.notice, self.vocab_size = info.batching, info.notice, info.vocab_size
        self._eos = set(info.eos_ids)
        self._memory = dict(info.memory)
        if info.encoder is not None:
            try:
                self._encoder = FolderTokenizer(info.encoder.model_dir)
                self._encoder_bos = info.encoder.bos_id
                self.encode_blocks = False
            except TokenizerError:
                log.info("encoding through the model process (tokenizer.json unreadable here)")

    def unload(self) -> None:
        if self._proc is None:
            return
        if self._proc.is_alive():
            try:
                self._send(("unload",))
            except (BrokenPipeError, OSError):
                pass
            deadline = time.monotonic() + 60
            while self._proc.is_alive() and self._dead is None and time.monotonic() < deadline:
                with self._read_lock:  # keep reading so that it is never stuck writing to us
                    self._read_one(0.1)
            self._proc.join(5)
        self._reap()

    def _reap(self) -> None:
        if self._counted:
            self._counted = False
            SPARES.unloaded(self.target)
        proc, self._proc = self._proc, None
        if proc is not None and proc.is_alive():
            proc.kill()
            proc.join(10)
        if self._conn is not None:
            self._conn.close()
        self._memory = {}
        self._active.clear()

    def memory_used(self) -> dict[str, int]:
        """The model process's latest memory report (read off the pipe here when nobody else reads it)."""
        if not self.loop_reads and self._conn is not None and self._read_lock.acquire(blocking=False):
            try:
                self._drain()
            finally:
                self._read_lock.release()
        return dict(self._memory)

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def dead(self) -> str | None:
        """Why the model process is gone (it crashed or was killed), or None while it runs."""
        if self._dead is None and self._proc is not None and not self._proc.is_alive():
            self._mark_dead()
        return self._dead

    # -- the pipe ----------------------------------------------------------------------
    def fileno(self) -> int:
        """The pipe's descriptor, for an event loop that reads it (readable: call read_available)."""
        return self._conn.fileno()

    def read_available(self) -> list[tuple]:
        """What the model process has sent, without waiting: replies and memory reports are dispatched
        here; step messages come back in order, for :meth:`take_step`. The end of the process shows
        as :attr:`dead`."""
        with self._read_lock:
            self._drain()
            out = list(self._inbox)
            self._inbox.clear()
        return out

    def _drain(self) -> None:
        """Read and dispatch everything already sent. Hold ``_read_lock``."""
        try:
            while self._dead is None and self._conn.poll(0):
                self._read_one(0)
        except (EOFError, OSError):
            self._mark_dead()

    def has_pending(self) -> bool:
        """Step messages already read (or made here for a job the dead process never got)."""
        return bool(self._inbox)

    def _send(self, msg: tuple) -> None:
        with self._send_lock:
            self._conn.send(msg)

    def _read_one(self, timeout: float) -> None:
        """Read and dispatch one message if one comes within ``timeout``. Hold ``_read_lock``."""
        try:
            if not self._conn.poll(timeout):
                if not self._proc.is_alive():
                    self._mark_dead()
                return
            msg = self._conn.recv()
        except (EOFError, OSError):
            self._mark_dead()
            return
        kind = msg[0]
        if kind == "memory":
            self._memory = msg[1]
        elif kind == "reply":
            future = self._replies.pop(msg[1], None)
            if future is not None and isinstance(msg[2], Exception):
                future.set_exception(msg[2])
            elif future is not None:
                future.set_result(msg[2])
        elif kind in ("events", "step_failed", "step_error"):
            self._inbox.append(msg)

    def _mark_dead(self) -> None:
        if self._dead is None:
            if self._proc is not None:
                self._proc.join(1)
            code = None if self._proc is None else self._proc.exitcode
            self._dead = f"the model process has exited (exit code {code})"
        for future in list(self._replies.values()):
            future.set_exception(RuntimeError(self._dead))
        self._replies.clear()

    # -- tokens ------------------------------------------------------------------------
    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        if self._encoder is not None:
            return with_bos(self._encoder.encode_plain(text), self._encoder_bos, add_bos)
        return self._call("encode", text, add_bos)

    def cuda_tensor_census(self) -> dict[str, Any]:
        """The model process's live CUDA tensors (see app.engine.observability.diagnostics)."""
        return self._call("census")

    def _call(self, kind: str, *args: Any) -> Any:
        """Ask the model process (answered between two of its steps). Blocks: not on the event loop."""
        if self.dead or self._conn is None:
            raise RuntimeError(self._dead or "the model is not loaded")
        future: Future = Future()
        with self._send_lock:
            self._next_request += 1
            request = self._next_request
            self._replies[request] = future
            self._conn.send((kind, request, *args))
        if self.loop_reads:  # the event loop dispatches the reply (this is never called on the loop)
            return future.result(timeout=120)
        deadline = time.monotonic() + 120
        while not future.done() and time.monotonic() < deadline:
            if self._read_lock.acquire(timeout=POLL_S):  # else the runner is reading: it dispatches our reply
                try:
                    if not future.done():
                        self._read_one(POLL_S)
                finally:
                    self._read_lock.release()
        return future.result(timeout=0)

    def decode(self, ids: Sequence[int]) -> str:
        if self._encoder is None:
            raise RuntimeError("decoding needs tokenizer.json")
        return self._encoder.decode(ids)

    def eos_token_ids(self) -> set[int]:
        return set(self._eos)

    # -- jobs (runner thread) ------------------------------------------------------------
    def submit(self, job: BackendJob) -> None:
        self._active.add(job.job_id)
        if not self.dead:
            try:
                self._send(("submit", job))
                return
            except (BrokenPipeError, OSError):
                self._mark_dead()
        self._inbox.append(("events", to_wire([StepEvent(job.job_id, finished=True, finish_reason="error",
                                                         error=self._dead)]), 0, 0.0, 0.0))

    def cancel(self, job_id: int) -> None:
        if job_id in self._active:
            self._active.discard(job_id)
            if not self._dead:
                try:
                    self._send(("cancel", job_id))
                except (BrokenPipeError, OSError):
                    self._mark_dead()

    def has_work(self) -> bool:
        return bool(self._active)

    def active_jobs(self) -> int:
        return len(self._active)

    def step(self) -> list[StepEvent]:
        """The events of the model process's next step (blocks until it has stepped)."""
        while self._active:
            if self._inbox:
                return self.take_step(self._inbox.popleft())
            if self._dead:  # nothing more will come for the jobs still here
                raise RuntimeError(self._dead)
            with self._read_lock:
                if not self._inbox:
                    self._read_one(POLL_S)
        return []

    def take_step(self, msg: tuple) -> list[StepEvent]:
        """The events of one step message (raises StepFailed / RuntimeError as :meth:`step` does)."""
        kind = msg[0]
        if kind == "step_error":
            raise RuntimeError(msg[1])
        if kind == "step_failed":
            _, job_ids, message, events, batch = msg
            self.last_step_batch = batch
            self._active.difference_update(job_ids)
            self._surviving = self._keep(from_wire(events))
            raise StepFailed(job_ids, message)
        _, events, batch, t_start, t_end = msg
        self.last_step_batch = batch
        self.last_step_times = (t_start, t_end, time.monotonic())
        return self._keep(from_wire(events))

    def take_surviving_events(self) -> list[StepEvent]:
        events, self._surviving = self._surviving, []
        return events

    def _keep(self, events: list[StepEvent]) -> list[StepEvent]:
        kept = [e for e in events if e.job_id in self._active]  # a cancelled job's late events are dropped
        for e in kept:
            if e.finished:
                self._active.discard(e.job_id)
        return kept


def to_wire(events: list[StepEvent], times: dict[int, list] | None = None) -> list[tuple]:
    """Events as plain tuples: a dataclass costs ten times as much to pickle and unpickle, on the path
    of every token. A finished job's decode times (kept in ``times``) go with its last event."""
    out = []
    for e in events:
        rec = times.pop(e.job_id, None) if e.finished and times is not None else None
        out.append((e.job_id, e.text, e.new_tokens, e.finished, e.finish_reason, e.error,
                    None if rec is None else (rec[1], rec[2], rec[3] - rec[0])))
    return out


def from_wire(items: list[tuple]) -> list[StepEvent]:
    return [StepEvent(job_id, text, n, finished, reason, error, None if times is None else DecodeTimes(*times))
            for job_id, text, n, finished, reason, error, times in items]


def pipe_writer(conn: Any) -> Callable[[tuple], None]:
    """``conn.send`` without its per-call overhead (the same framing: a 4-byte big-endian length, then
    the pickle), for the model process's per-token messages."""
    fd = conn.fileno()
    pack = struct.Struct("!i").pack
    dumps = pickle.dumps
    protocol = pickle.HIGHEST_PROTOCOL

    def send(msg: tuple) -> None:
        data = dumps(msg, protocol)
        if len(data) >= 0x7FFFFFFF:  # conn.send's longer header
            conn.send(msg)
            return
        view = memoryview(pack(len(data)) + data)
        while view:
            view = view[os.write(fd, view):]

    return send


# -- the model process -----------------------------------------------------------------
def child_main(conn: Any, target: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s model-process %(levelname)s %(name)s: %(message)s")
    module_name, class_name = target.split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    warm_up = getattr(cls, "warm_up", None)
    if warm_up is not None:
        try:  # the heavy imports first, reported as load progress (minutes when a CUDA build runs)
            warm_up(lambda f, m: conn.send(("progress", f, m)))
        except (EOFError, OSError):
            return  # the server has gone
        except Exception:  # noqa: BLE001 - load() meets the same problem and reports it readably
            log.warning("warming up %s failed", target, exc_info=True)
    try:
        msg = conn.recv()
    except (EOFError, OSError):
        return
    if msg[0] != "load":
        return
    _, model_dir, kwargs = msg
    cancel = threading.Event()
    send_lock = threading.Lock()

    def send(out: tuple) -> None:
        with send_lock:
            conn.send(out)

    def listen_while_loading() -> None:
        while True:
            try:
                got = conn.recv()
            except (EOFError, OSError):
                cancel.set()
                return
            if got[0] == "cancel_load":
                cancel.set()
            elif got[0] == "serve":
                return

    listener = threading.Thread(target=listen_while_loading, name="load-commands", daemon=True)
    listener.start()
    backend = cls(model_dir, **kwargs)
    try:
        backend.load(lambda f, m: send(("progress", f, m)), cancel)
    except LoadCancelled as exc:
        send(("load_failed", True, str(exc)))
        return
    except BackendLoadError as exc:
        send(("load_failed", False, str(exc)))
        return
    except Exception as exc:  # noqa: BLE001 - anything else is still a readable load failure
        log.exception("loading failed")
        send(("load_failed", False, f"{type(exc).__name__}: {exc}"))
        return
    spec = getattr(backend, "encoder_spec", lambda: None)()
    send(("loaded", LoadedInfo(backend.batching, getattr(backend, "notice", ""), getattr(backend, "vocab_size", None),
                               set(backend.eos_token_ids()), spec, backend.memory_used())))
    listener.join()  # it ends on "serve": from here on this thread reads the pipe itself
    serve(backend, conn)


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
        self._streaming: dict[int, bool] = {}
        self._started: set[int] = set()
        self._held: dict[int, StepEvent] = {}
        self._held_since: float | None = None
        #: job id -> [end of its first step, later steps, time in them, end of its last step]
        self._times: dict[int, list] = {}

    def submitted(self, job: BackendJob) -> None:
        self._streaming[job.job_id] = job.stream

    def forget(self, job_id: int) -> None:
        self._streaming.pop(job_id, None)
        self._started.discard(job_id)
        self._held.pop(job_id, None)
        self._times.pop(job_id, None)

    def _time(self, events: list[StepEvent], t_start: float, t_end: float) -> None:
        """Every step counts for every job between its first event and its last (a step may give a job
        no event: the backend can hold back text that may begin a stop string)."""
        for rec in self._times.values():
            rec[1] += 1
            rec[2] += t_end - t_start
            rec[3] = t_end
        for event in events:
            if event.job_id not in self._times:
                self._times[event.job_id] = [t_end, 0, 0.0, t_end]

    def step(self, events: list[StepEvent], batch: int, t_start: float, t_end: float) -> None:
        self._time(events, t_start, t_end)
        if not self._held and len(events) == 1 and self._streaming.get(events[0].job_id, True):
            # the common case (one streaming job): straight out, nothing to merge
            event = events[0]
            if event.finished:
                self._streaming.pop(event.job_id, None)
            self._send(("events", self.wire(events), batch, t_start, t_end))
            return
        urgent = False
        for event in events:
            if event.finished or self._streaming.get(event.job_id, True) or event.job_id not in self._started:
                urgent = True
            self._started.add(event.job_id)
            held = self._held.get(event.job_id)
            self._held[event.job_id] = event if held is None else StepEvent(
                event.job_id, held.text + event.text, held.new_tokens + event.new_tokens, event.finished,
                event.finish_reason, event.error)
            if event.finished:
                self._streaming.pop(event.job_id, None)
                self._started.discard(event.job_id)
        if self._held and self._held_since is None:
            self._held_since = t_start
        if urgent or (self._held and t_end - (self._held_since or t_end) >= self.HOLD_S):
            self.flush(batch, t_start, t_end)

    def flush(self, batch: int = 0, t_start: float = 0.0, t_end: float = 0.0) -> None:
        if self._held:
            events, self._held, self._held_since = list(self._held.values()), {}, None
            self._send(("events", self.wire(events), batch, t_start, t_end))

    def wire(self, events: list[StepEvent]) -> list[tuple]:
        return to_wire(events, self._times)


def serve(backend: Any, conn: Any) -> None:
    """Step while there is work; between steps take commands; report memory while working."""
    memory_at = time.monotonic()
    outbox = Outbox(pipe_writer(conn))
    # between two steps the pipe is only glanced at: a poll object is cheaper than conn.poll(0)
    poller = getattr(select, "poll", None)
    if poller is not None:
        poller = poller()
        poller.register(conn.fileno(), select.POLLIN)

    def has_command(busy: bool) -> bool:
        if busy and poller is not None:
            return bool(poller.poll(0))
        return conn.poll(0 if busy else None)

    while True:
        busy = backend.has_work()
        try:
            while has_command(busy):
                msg = conn.recv()
                if not handle(backend, conn, msg, outbox):
                    return
                busy = backend.has_work()
        except (EOFError, OSError):  # the server went away
            backend.unload()
            return
        if not busy:
            continue
        t_start = time.monotonic()
        try:
            events = backend.step()
        except StepFailed as exc:
            outbox.flush()
            take = getattr(backend, "take_surviving_events", None)
            conn.send(("step_failed", exc.job_ids, str(exc), outbox.wire(take() if take is not None else []),
                       getattr(backend, "last_step_batch", 1)))
            for job_id in exc.job_ids:
                outbox.forget(job_id)
        except Exception as exc:  # noqa: BLE001 - the server fails the jobs with this reason
            log.exception("step failed")
            outbox.flush()
            conn.send(("step_error", f"{type(exc).__name__}: {exc}"))
        else:
            outbox.step(events, getattr(backend, "last_step_batch", 1), t_start, time.monotonic())
        now = time.monotonic()
        done = not backend.has_work()
        if done:
            outbox.flush()
        if done or now - memory_at >= MEMORY_EVERY_S:
            memory_at = now
            conn.send(("memory", backend.memory_used()))


def handle(backend: Any, conn: Any, msg: tuple, outbox: Outbox) -> bool:
    """One command from the server; False when the process should end."""
    kind = msg[0]
    if kind == "submit":
        outbox.submitted(msg[1])
        backend.submit(msg[1])
    elif kind == "cancel":
        outbox.forget(msg[1])
        backend.cancel(msg[1])
    elif kind in ("encode", "census"):
        try:
            if kind == "encode":
                answer: Any = backend.encode(msg[2], add_bos=msg[3])
            else:
                from app.engine.observability.diagnostics import cuda_tensor_census

                answer = cuda_tensor_census()
        except Exception as exc:  # noqa: BLE001 - the caller gets the reason
            answer = exc
        conn.send(("reply", msg[1], answer))
    elif kind == "unload":
        backend.unload()
        conn.send(("unloaded",))
        return False
    return True
