"""The backend contract.

A backend owns a loaded model and its batching. The engine's runner thread is the only caller of
everything below except :meth:`Backend.load`'s ``cancel`` event, which another thread may set.

- ``load(progress, cancel)`` loads the model; ``progress(fraction, message)`` reports progress;
  it raises :class:`LoadCancelled` when ``cancel`` is set and :class:`BackendLoadError` with a
  readable reason on failure, having released what it had allocated.
- ``submit(job)`` queues a job; it joins the running batch at the next ``step()``.
- ``cancel(job_id)`` removes a pending or running job; no event is reported for it afterwards.
- ``step()`` advances every running job by at most one token (or one prompt chunk) and returns one
  :class:`StepEvent` per job that produced text or ended. A job's last event has ``finished=True``.
- ``has_work()`` says whether ``step()`` has anything to do.
- ``unload()`` frees the model's memory.

Text in events is already decoded with stop strings cut (the stop string itself is not returned)
and never ends inside a multi-byte character.
"""

from __future__ import annotations

import threading
from typing import Callable, Protocol, Sequence

from app.engine.events import BackendJob, StepEvent

ProgressFn = Callable[[float, str], None]


class BackendLoadError(RuntimeError):
    """The model could not be loaded; the message says why."""


class LoadCancelled(BackendLoadError):
    pass


class StepFailed(RuntimeError):
    """A step failed for some jobs only; the backend has already dropped them."""

    def __init__(self, job_ids: list[int], message: str) -> None:
        super().__init__(message)
        self.job_ids = job_ids


class Backend(Protocol):
    name: str
    #: "continuous" (jobs join a running batch) or "single" (one job at a time).
    batching: str
    context_length: int
    max_batch: int

    def load(self, progress: ProgressFn, cancel: threading.Event) -> None: ...
    def encode(self, text: str, *, add_bos: bool = False) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def eos_token_ids(self) -> set[int]: ...
    def submit(self, job: BackendJob) -> None: ...
    def cancel(self, job_id: int) -> None: ...
    def step(self) -> list[StepEvent]: ...
    def has_work(self) -> bool: ...
    def active_jobs(self) -> int: ...
    def unload(self) -> None: ...
    def memory_used(self) -> dict[str, int]: ...
