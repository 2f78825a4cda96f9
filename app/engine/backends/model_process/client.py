"""The server's side of a model process: a backend of class ``target`` built and driven in a process
of its own, behind the same backend contract.

Why: a backend's step loop is mostly Python launching GPU kernels. In the server's process it shares
the GIL with the event loop, so every chunk the loop sends and every request it parses stalls the
step loop, and the first token waits for the loop's turn. In its own process the step loop runs as
fast as a bare generator loop; the server only relays events. Unloading ends the process, which
also returns every byte of GPU memory the backend's libraries kept for themselves.

A new process first imports torch and the backend's library (seconds; the first time ever, the
exllamav2 extension's CUDA build: minutes) and says so as load progress, then loads the model. After a
first load one spare process with those imports done waits for the next
(:class:`~app.engine.backends.model_process.spares.SparePool`). The messages are in
:mod:`~app.engine.backends.model_process.protocol`; the process's own loop in
:mod:`~app.engine.backends.model_process.child`.

The model process keeps stepping while it has jobs and never waits for this side. On this side
whoever needs a message reads the pipe: the event loop through :meth:`ProcessBackend.read_available`
(see :mod:`app.engine.serving.pipe_runner`), or where a loop cannot watch it the runner thread in
:meth:`ProcessBackend.step` and a caller of :meth:`ProcessBackend.encode`; no relay thread between.
This side keeps no record of which jobs are alive: the runner does, and drops late events.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Any, Sequence

from app.engine.backends.contract import BackendBase, BackendLoadError, LoadCancelled, ProgressFn, StepFailed
from app.engine.backends.model_process import protocol as p
from app.engine.backends.model_process.spares import SPARES, start_process
from app.engine.catalog.tokenizer import FolderTokenizer, TokenizerError, with_bos
from app.engine.events import BackendJob, StepEvent

log = logging.getLogger(__name__)
POLL_S = 0.05
CANCEL_GRACE_S = 2.0


class ProcessBackend(BackendBase):
    """A backend of class ``target`` ("module:Class") built and driven in a model process.

    ``keep_spare``: after loading, have a spare process of the same backend ready for the next load
    (see :class:`SparePool`).
    """

    def __init__(self, target: str, name: str, model_dir: str, *, keep_spare: bool = True,
                 launcher: Any = None, **kwargs: Any) -> None:
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
        #: starts the model process (another interpreter's: a runtime's, see app.engine.runtime); no spares then
        self._start = launcher or start_process
        self._keep_spare = keep_spare and launcher is None
        self._counted = False  # SPARES knows this backend as loaded
        self._proc: Any = None
        self._conn: Any = None
        self._send_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._inbox: deque[p.StepMessage] = deque()
        self._eos: set[int] = set()
        self._memory: dict[str, int] = {}
        self._active_jobs = 0
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
        self._proc, self._conn = spare or self._start(self.target)
        try:
            self._send(p.Load(self.model_dir, self._kwargs))
        except (BrokenPipeError, OSError):  # a spare that ended in the meantime: start a fresh one
            self._reap()
            self._proc, self._conn = self._start(self.target)
            self._send(p.Load(self.model_dir, self._kwargs))
        cancel_deadline: float | None = None
        while True:
            if cancel.is_set() and cancel_deadline is None:
                self._send(p.CancelLoad())
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
                msg = p.unpack(self._conn.recv())
            except (EOFError, OSError):
                code = self._proc.exitcode
                self._reap()
                raise BackendLoadError(f"the model process exited while loading (exit code {code})") from None
            if isinstance(msg, p.Progress):
                progress(msg.fraction, msg.message)
            elif isinstance(msg, p.LoadFailed):
                self._reap()
                raise (LoadCancelled if msg.cancelled else BackendLoadError)(msg.message)
            elif isinstance(msg, p.Loaded):
                self._send(p.Serve())
                self._loaded(msg.info)
                if self._keep_spare:
                    SPARES.loaded(self.target)
                    self._counted = True
                    SPARES.refill(self.target)
                return

    def _loaded(self, info: p.LoadedInfo) -> None:
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
                self._send(p.Unload())
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

    def memory_used(self) -> dict[str, int]:
        """The model process's latest memory report (read off the pipe here when nobody else reads it)."""
        if not self.loop_reads and self._conn is not None and self._read_lock.acquire(blocking=False):
            try:
                self._drain()
            finally:
                self._read_lock.release()
        return dict(self._memory)

    def active_jobs(self) -> int:
        """The jobs the model process held at its last report (it reports once a second while it works
        and whenever it runs out of work); read off the pipe here when nobody else reads it."""
        self.memory_used()
        return self._active_jobs

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

    def read_available(self) -> list[p.StepMessage]:
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

    def _send(self, msg: p.Message) -> None:
        with self._send_lock:
            self._conn.send(p.pack(msg))

    def _read_one(self, timeout: float) -> None:
        """Read and dispatch one message if one comes within ``timeout``. Hold ``_read_lock``."""
        try:
            if not self._conn.poll(timeout):
                if not self._proc.is_alive():
                    self._mark_dead()
                return
            msg = p.unpack(self._conn.recv())
        except (EOFError, OSError):
            self._mark_dead()
            return
        if isinstance(msg, p.Memory):
            self._memory, self._active_jobs = msg.memory, msg.active_jobs
        elif isinstance(msg, p.Reply):
            future = self._replies.pop(msg.request_id, None)
            if future is not None and isinstance(msg.answer, Exception):
                future.set_exception(msg.answer)
            elif future is not None:
                future.set_result(msg.answer)
        elif isinstance(msg, (p.Events, p.StepFailedMsg, p.StepError)):
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
        return self._call(lambda request: p.Encode(request, text, add_bos))

    def cuda_tensor_census(self) -> dict[str, Any]:
        """The model process's live CUDA tensors (see app.engine.observability.diagnostics)."""
        return self._call(p.Census)

    def _call(self, make: Any) -> Any:
        """Ask the model process ``make(request_id)`` (answered between two of its steps). Blocks: not
        on the event loop."""
        if self.dead or self._conn is None:
            raise RuntimeError(self._dead or "the model is not loaded")
        future: Future = Future()
        with self._send_lock:
            self._next_request += 1
            request = self._next_request
            self._replies[request] = future
            self._conn.send(p.pack(make(request)))
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
        if not self.dead:
            try:
                self._send(p.Submit(job))
                return
            except (BrokenPipeError, OSError):
                self._mark_dead()
        failed = StepEvent(job.job_id, finished=True, finish_reason="error", error=self._dead)
        self._inbox.append(p.Events(p.to_wire([failed]), 0, 0.0, 0.0))

    def cancel(self, job_id: int) -> None:
        if not self._dead:
            try:
                self._send(p.Cancel(job_id))
            except (BrokenPipeError, OSError):
                self._mark_dead()

    def has_work(self) -> bool:
        """Step messages are waiting here (whether jobs are out there, only the runner knows: it calls
        :meth:`step` while it tracks jobs)."""
        return bool(self._inbox)

    def step(self) -> list[StepEvent]:
        """The events of the model process's next step; blocks until one comes. Called by a runner that
        tracks jobs out there: each of them ends with an event, or the process is gone (raises)."""
        while not self._inbox:
            if self._dead:  # nothing more will come
                raise RuntimeError(self._dead)
            with self._read_lock:
                if not self._inbox:
                    self._read_one(POLL_S)
        return self.take_step(self._inbox.popleft())

    def take_step(self, msg: p.StepMessage) -> list[StepEvent]:
        """The events of one step message (raises StepFailed / RuntimeError as :meth:`step` does)."""
        if isinstance(msg, p.StepError):
            raise RuntimeError(msg.message)
        if isinstance(msg, p.StepFailedMsg):
            self.last_step_batch = msg.batch
            self._surviving = p.from_wire(msg.events)
            raise StepFailed(msg.job_ids, msg.message)
        self.last_step_batch = msg.batch
        self.last_step_times = (msg.t_start, msg.t_end, time.monotonic())
        return p.from_wire(msg.events)

    def take_surviving_events(self) -> list[StepEvent]:
        events, self._surviving = self._surviving, []
        return events
