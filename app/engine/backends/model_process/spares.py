"""Starting model processes, and the pool of one spare process per backend kept ready for the next load."""

from __future__ import annotations

import logging
import multiprocessing
import threading
from typing import Any

log = logging.getLogger(__name__)


#: backends whose model processes fork from a fork server that has done their imports: a new one is
#: ready in ~10 ms instead of ~2.5 s (torch and transformers on the 2-core CI machine), so a model
#: switch costs only the load. The value is the module the fork server imports (see preload.py).
#: exllamav2's processes are spawned: its CUDA extension is not set up for a fork. On a machine with
#: an NVIDIA GPU every model process is spawned: CUDA cannot be used in a process forked from one
#: where anything (an import asking whether CUDA is there, say) has initialised the driver.
FORKED = {"app.engine.backends.transformers_backend:TransformersBackend":
          "app.engine.backends.model_process.preload"}


def forks(target: str) -> bool:
    """Whether ``target``'s model processes fork from the fork server (then no spare is kept: the fork
    server is the process with the imports done, and a fork takes milliseconds)."""
    return _context(target).get_start_method() == "forkserver"


def _context(target: str) -> Any:
    from app.engine.backends.factory import nvidia_gpu_present

    preload = FORKED.get(target)
    if preload is None or "forkserver" not in multiprocessing.get_all_start_methods() or nvidia_gpu_present():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([preload])  # read when the fork server starts (the first such process)
    return ctx


_forked: list[Any] = []  # the processes forked from the fork server, pruned when they end
_forked_lock = threading.Lock()


def stop_fork_server() -> bool:
    """End the fork server (it holds torch's imports: hundreds of MB) unless a process forked from it
    still runs (its exit status comes through the fork server: without it, it would look dead); the
    next forked process starts a new one. Whether it was stopped."""
    from multiprocessing import forkserver

    with _forked_lock:
        _forked[:] = [proc for proc in _forked if proc.is_alive()]
        if _forked:
            return False
        stop = getattr(forkserver._forkserver, "_stop", None)  # noqa: SLF001 - the stdlib has no public stop
        if stop is None:
            return False
        stop()
    log.info("the fork server of the model processes has ended")
    return True


def start_process(target: str) -> tuple[Any, Any]:
    """A new model process for backend class ``target`` ("module:Class"): (process, this side's pipe)."""
    from app.engine.backends.model_process.child import child_main

    ctx = _context(target)
    here, there = ctx.Pipe()
    proc = ctx.Process(target=child_main, args=(there, target), name=f"model-process:{target}", daemon=True)
    if ctx.get_start_method() == "forkserver":
        with _forked_lock:  # not stopped between its start and its record
            proc.start()
            _forked.append(proc)
    else:
        proc.start()
    there.close()
    return proc, here


class SparePool:
    """At most one started, model-less model process per spawned backend, kept from a first load on.

    A model process spends seconds importing torch and the backend's library before it can load
    anything (about 10 s for exllamav2 on the GPU test machine), which every model switch would pay.
    The spare has done those imports and waits for a model; it costs that process's memory and no GPU
    memory (nothing touches CUDA before a model is loaded). It ends with the server, by itself when
    the server's end of its pipe closes, or ``idle_s`` after the last model of its backend was
    unloaded (an app left idle gives the memory back). A forked backend (:data:`FORKED`) has no spare:
    the fork server is its process with the imports done, and it ends ``idle_s`` after the last model
    of a forked backend was unloaded.
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
        """A model of ``target`` is gone; with none left, its spare (or the fork server) ends after ``idle_s``."""
        forked = forks(target)
        with self._lock:
            self._loaded[target] = max(self._loaded.get(target, 0) - 1, 0)
            if self._loaded[target] or (target not in self._spares and not forked) or target in self._timers:
                return
            timer = self._timers[target] = threading.Timer(self.idle_s, self._expire, [target])
        timer.daemon = True
        timer.start()

    def _expire(self, target: str) -> None:
        with self._lock:
            self._timers.pop(target, None)
            spare = None if self._loaded.get(target) else self._spares.pop(target, None)
            forked_in_use = any(self._loaded.get(t) or t in self._spares for t in FORKED)
        if spare is not None:
            log.info("no %s model loaded for %.0f s: the spare model process ends", target, self.idle_s)
            _end(*spare)
        if target in FORKED and not forked_in_use and forks(target):
            stop_fork_server()

    def take(self, target: str) -> tuple[Any, Any] | None:
        with self._lock:
            spare = self._spares.pop(target, None)
        if spare is not None and spare[0].is_alive():
            return spare
        if spare is not None:
            spare[1].close()
        return None

    def refill(self, target: str) -> None:
        """Have a spare of ``target`` ready (none for a forked target: the fork server is ready)."""
        if forks(target):
            return
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
