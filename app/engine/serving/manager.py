"""Which models are resident, loading them on demand and switching between them without dropping work.

Requests ask for a *lease* on a model. Waiters are served first come, first served: while the
waiter at the head wants a model that is not resident, nobody behind it is served, so requests for
the old model queue behind a switch instead of starving it. A model is evicted only when it has no
running jobs; loading and unloading run in worker threads, never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Literal

from app.engine.backends.contract import Backend, BackendLoadError, LoadCancelled
from app.engine.errors import EngineError, ModelLoadError
from app.engine.observability.metrics import EngineMetrics
from app.engine.serving.pipe_runner import PipeRunner, loop_can_read
from app.engine.serving.runner import Runner, RunnerBase

log = logging.getLogger(__name__)

ResidentState = Literal["loading", "ready", "unloading"]
BackendFactory = Callable[[str], tuple[Backend, float]]
"""model name -> (a backend ready to ``load``, idle-unload minutes)."""


@dataclass(frozen=True)
class ModelState:
    name: str
    state: str  # loading / ready / unloading
    progress: float
    message: str
    backend: str
    batching: str
    active_jobs: int
    notice: str = ""
    #: how many jobs one step may run (the model's batch_size; 1 when the backend runs one at a time)
    max_batch: int = 1

    @property
    def batching_summary(self) -> str:
        """What the UI and /health say about batching, e.g. "continuous batching (32)"."""
        if self.batching == "continuous":
            return f"continuous batching ({self.max_batch})"
        return "one request at a time"


@dataclass(frozen=True)
class LoadFailure:
    """A model's last failed load (a cancelled load is not a failure), kept until it loads."""

    name: str
    message: str
    at: float  # time.time()


@dataclass
class Resident:
    name: str
    backend: Backend
    idle_minutes: float
    state: ResidentState = "loading"
    progress: float = 0.0
    message: str = "queued"
    runner: RunnerBase | None = None
    active: int = 0
    last_used: float = field(default_factory=time.monotonic)
    cancel: threading.Event = field(default_factory=threading.Event)
    idle_timer: asyncio.TimerHandle | None = None


@dataclass
class _Waiter:
    name: str
    future: asyncio.Future[Resident]
    #: a client's request (counted as waiting in the metrics); False for a load asked from the tray or /admin
    request: bool = True


class ModelManager:
    def __init__(self, factory: BackendFactory, metrics: EngineMetrics, *, max_loaded: int = 1,
                 on_change: Callable[[], None] | None = None) -> None:
        if max_loaded < 1:
            raise ValueError("max_loaded must be at least 1")
        self._factory = factory
        self._metrics = metrics
        self.max_loaded = max_loaded
        self._residents: dict[str, Resident] = {}
        self._waiters: deque[_Waiter] = deque()
        self._tasks: set[asyncio.Task] = set()
        self._on_change = on_change or (lambda: None)
        self._closed = False
        self._failures: dict[str, LoadFailure] = {}
        #: the newest failure, until any model loads (what the tray shows as its error)
        self.last_failure: LoadFailure | None = None

    # -- public -------------------------------------------------------------------
    def states(self) -> list[ModelState]:
        return [ModelState(r.name, r.state, r.progress, r.message, r.backend.name, r.backend.batching,
                           r.active, r.backend.notice, r.backend.max_batch if r.backend.batching == "continuous" else 1)
                for r in self._residents.values()]

    def load_failures(self) -> list[LoadFailure]:
        """Each model's last failed load, oldest first, for models that have not loaded since."""
        return sorted(self._failures.values(), key=lambda f: f.at)

    def resident(self, name: str) -> Resident | None:
        return self._residents.get(name)

    def waiting(self) -> int:
        """Requests waiting for a model (a load asked without a request is not one)."""
        return sum(1 for w in self._waiters if w.request and not w.future.done())

    async def acquire(self, name: str, *, request: bool = True) -> Resident:
        """Wait for ``name`` to be resident and ready; the caller must :meth:`release` it."""
        if self._closed:
            raise ModelLoadError("the server is shutting down")
        future: asyncio.Future[Resident] = asyncio.get_running_loop().create_future()
        self._waiters.append(_Waiter(name, future, request))
        self._metrics.waiting.set(self.waiting())
        self._pump()
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.exception() is None:
                self.release(future.result())
            raise
        finally:
            self._metrics.waiting.set(self.waiting())

    def release(self, resident: Resident) -> None:
        resident.active -= 1
        resident.last_used = time.monotonic()
        if resident.active == 0:
            self._arm_idle_timer(resident)
        self._pump()

    async def load(self, name: str) -> None:
        resident = await self.acquire(name, request=False)
        self.release(resident)

    async def unload(self, name: str) -> bool:
        """Unload ``name`` once its running jobs are done. Returns False when it was not resident."""
        resident = self._residents.get(name)
        if resident is None:
            return False
        if resident.state == "loading":
            resident.cancel.set()
        if resident.state == "ready":
            resident.state = "unloading"
            resident.message = "waiting for running jobs" if resident.active else "unloading"
            self._changed()
        while name in self._residents and self._residents[name] is resident:
            self._pump()
            await asyncio.sleep(0.02)
        return True

    async def close(self) -> None:
        self._closed = True
        for waiter in self._waiters:
            if not waiter.future.done():
                waiter.future.set_exception(ModelLoadError("the server is shutting down"))
        self._waiters.clear()
        for name in list(self._residents):
            resident = self._residents[name]
            resident.cancel.set()
            if resident.runner is not None:
                resident.runner.cancel_all()
            resident.state = "unloading" if resident.state == "ready" else resident.state
        deadline = time.monotonic() + 30
        while self._residents and time.monotonic() < deadline:
            self._pump()
            await asyncio.sleep(0.02)
        for task in list(self._tasks):
            await asyncio.gather(task, return_exceptions=True)

    # -- scheduling -------------------------------------------------------------------
    def _changed(self) -> None:
        try:
            self._on_change()
        except Exception:
            log.exception("status listener failed")

    def _pump(self) -> None:
        # evict what was asked to unload and is idle
        for resident in list(self._residents.values()):
            if resident.state == "unloading" and resident.active == 0 and resident.runner is not None:
                self._start_unload(resident)
        while self._waiters:
            waiter = self._waiters[0]
            if waiter.future.done():
                self._waiters.popleft()
                continue
            resident = self._residents.get(waiter.name)
            if resident is not None and resident.state == "ready":
                self._waiters.popleft()
                resident.active += 1
                if resident.idle_timer is not None:
                    resident.idle_timer.cancel()
                    resident.idle_timer = None
                waiter.future.set_result(resident)
                continue
            if resident is not None:
                return  # loading or unloading: wait for it
            if len(self._residents) < self.max_loaded:
                if self._start_load(waiter.name):
                    return
                continue  # refused at once: its waiters have their error, serve the next
            idle = [r for r in self._residents.values() if r.state == "ready" and r.active == 0]
            if idle:
                victim = min(idle, key=lambda r: r.last_used)
                victim.state = "unloading"
                victim.message = f"making room for {waiter.name}"
                self._start_unload(victim)
            return  # wait for running jobs of a resident model to drain

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _start_load(self, name: str) -> bool:
        """Start loading ``name``; False when its backend was refused at once (its waiters are failed)."""
        try:
            backend, idle_minutes = self._factory(name)
        except (BackendLoadError, EngineError, ValueError) as exc:  # e.g. an EXL2 model and no GPU
            message = f"model {name} failed to load: {exc}"
            self._record_failure(name, message)
            self._fail_waiters(name, message)
            self._changed()
            return False
        resident = Resident(name=name, backend=backend, idle_minutes=idle_minutes)
        self._residents[name] = resident
        self._changed()
        self._spawn(self._load(resident))
        return True

    async def _load(self, resident: Resident) -> None:
        loop = asyncio.get_running_loop()

        def progress(fraction: float, message: str) -> None:
            def apply() -> None:
                resident.progress, resident.message = fraction, message
                self._changed()
            loop.call_soon_threadsafe(apply)

        started = time.monotonic()
        log.info("loading model %s (%s backend)", resident.name, resident.backend.name)
        try:
            await asyncio.to_thread(resident.backend.load, progress, resident.cancel)
        except BaseException as exc:  # noqa: BLE001 - every failure must release the slot
            reason = str(exc) if isinstance(exc, (BackendLoadError, MemoryError)) else f"{type(exc).__name__}: {exc}"
            message = f"model {resident.name} failed to load: {reason}"
            if isinstance(exc, LoadCancelled):
                log.info("loading %s cancelled", resident.name)
            else:
                self._record_failure(resident.name, message)
            await asyncio.to_thread(resident.backend.unload)
            self._residents.pop(resident.name, None)
            self._fail_waiters(resident.name, message)
            self._changed()
            self._pump()
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            return
        # a model process's pipe is read by the event loop itself where the loop can (no thread between)
        runner_cls = PipeRunner if loop_can_read(loop, resident.backend) else Runner
        runner = runner_cls(resident.name, resident.backend, self._metrics, loop)
        runner.start()
        resident.runner = runner
        log.info("model %s loaded in %.1f s (%s batching)", resident.name, time.monotonic() - started,
                 resident.backend.batching)
        if resident.cancel.is_set():
            # unloaded (or shutting down) while its load was past its last look at the cancel: the load
            # counts as cancelled, as it would have a moment earlier, and the model goes again
            self._fail_waiters(resident.name, f"model {resident.name} failed to load: load cancelled")
            resident.state, resident.message = "unloading", "unloading"
        else:  # a cancelled load is not a failure, and it does not clear one either
            self._failures.pop(resident.name, None)
            self.last_failure = None
            resident.state = "ready" if resident.state == "loading" else resident.state
            resident.progress, resident.message = 1.0, "ready"
        self._changed()
        self._pump()

    def _record_failure(self, name: str, message: str) -> None:
        """Keep ``name``'s failed load (shown in /health and the tray) until it loads."""
        log.warning("%s", message)
        self._failures[name] = self.last_failure = LoadFailure(name, message, time.time())

    def _start_unload(self, resident: Resident) -> None:
        if resident.idle_timer is not None:
            resident.idle_timer.cancel()
            resident.idle_timer = None
        runner, resident.runner = resident.runner, None
        resident.message = "unloading"
        self._spawn(self._unload(resident, runner))

    async def _unload(self, resident: Resident, runner: RunnerBase | None) -> None:
        log.info("unloading model %s", resident.name)
        if runner is not None:
            await asyncio.to_thread(runner.stop)
        await asyncio.to_thread(resident.backend.unload)
        self._residents.pop(resident.name, None)
        self._changed()
        self._pump()

    def _fail_waiters(self, name: str, reason: str) -> None:
        for waiter in list(self._waiters):
            if waiter.name == name and not waiter.future.done():
                waiter.future.set_exception(ModelLoadError(reason))
        self._waiters = deque(w for w in self._waiters if not w.future.done())

    def set_idle_minutes(self, name: str, minutes: float) -> None:
        """How long loaded ``name`` stays once its last job ends (0 or less: never unloaded when idle); an
        idle model's timer starts again with the new figure."""
        resident = self._residents.get(name)
        if resident is None:
            return
        resident.idle_minutes = minutes
        if resident.active == 0:  # idle already: its timer was armed with the old figure
            if resident.idle_timer is not None:
                resident.idle_timer.cancel()
                resident.idle_timer = None
            self._arm_idle_timer(resident)

    def unload_deadline(self, name: str) -> float | None:
        """When (``time.time()``) an idle ``name`` will be unloaded if nothing uses it; None: never or not
        loaded. A model with running jobs counts from now."""
        resident = self._residents.get(name)
        if resident is None or resident.idle_minutes <= 0:
            return None
        idle_s = 0.0 if resident.active else time.monotonic() - resident.last_used
        return time.time() + max(resident.idle_minutes * 60 - idle_s, 0.0)

    def _arm_idle_timer(self, resident: Resident) -> None:
        if resident.idle_minutes <= 0 or resident.state != "ready":
            return
        if resident.idle_timer is not None:
            resident.idle_timer.cancel()
        loop = asyncio.get_running_loop()
        resident.idle_timer = loop.call_later(resident.idle_minutes * 60, self._idle_expired, resident)

    def _idle_expired(self, resident: Resident) -> None:
        resident.idle_timer = None
        if resident.active == 0 and resident.state == "ready" and self._residents.get(resident.name) is resident:
            if any(w.name == resident.name for w in self._waiters):
                return
            log.info("model %s idle for %.1f min: unloading", resident.name, resident.idle_minutes)
            resident.state = "unloading"
            self._pump()
