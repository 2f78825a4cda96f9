"""The backend contract.

A backend owns a loaded model and its batching. Its runner (:mod:`app.engine.serving.runner`) is the
only caller of everything below except :meth:`Backend.load`'s ``cancel`` event, which another thread
may set; the runner alone decides which jobs are alive and drops events of jobs it no longer tracks.

- ``load(progress, cancel)`` loads the model; ``progress(fraction, message)`` reports progress;
  it raises :class:`LoadCancelled` when ``cancel`` is set and :class:`BackendLoadError` with a
  readable reason on failure, having released what it had allocated.
- ``submit(job)`` queues a job; it joins the running batch at the next ``step()``.
- ``cancel(job_id)`` removes a pending or running job.
- ``step()`` advances every running job by at most one token (or one prompt chunk) and returns one
  :class:`StepEvent` per job that produced text or ended. A job's last event has ``finished=True``.
  When it raises :class:`StepFailed` the failed jobs are gone and the events of the others are in
  ``take_surviving_events()``.
- ``has_work()`` says whether ``step()`` has anything to do without the runner's jobs (a backend in
  a model process: step messages already read); the runner steps while it tracks jobs or this is true.
- ``unload()`` frees the model's memory.

Text in events is already decoded with stop strings cut (the stop string itself is not returned)
and never ends inside a multi-byte character.

Every backend derives from :class:`BackendBase`, which gives the optional parts of the contract their
defaults. Capabilities only some backends have are small protocols (:class:`PipeBacked`,
:class:`TensorCensus`), checked once when a model is loaded, not per step.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

from app.engine.catalog.tokenizer import EncoderSpec
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
    #: a line the UI shows about how the backend runs (e.g. why it cannot batch), or ""
    notice: str
    vocab_size: int | None
    #: how many jobs the last step advanced
    last_step_batch: int
    #: encode() may block for long (a round trip to another process): never call it on the event loop
    encode_blocks: bool

    @property
    def dead(self) -> str | None:
        """Why the process the backend runs in is gone (it crashed or was killed), or None."""

    def load(self, progress: ProgressFn, cancel: threading.Event) -> None: ...
    def encode(self, text: str, *, add_bos: bool = False) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def eos_token_ids(self) -> set[int]: ...
    def submit(self, job: BackendJob) -> None: ...
    def cancel(self, job_id: int) -> None: ...
    def step(self) -> list[StepEvent]: ...
    def take_surviving_events(self) -> list[StepEvent]: ...
    def has_work(self) -> bool: ...
    def unload(self) -> None: ...
    def memory_used(self) -> dict[str, int]: ...
    def encoder_spec(self) -> EncoderSpec | None: ...
    def active_jobs(self) -> int: ...


class BackendBase:
    """Defaults for the optional parts of :class:`Backend`."""

    name = "backend"
    batching = "single"
    notice = ""
    vocab_size: int | None = None
    last_step_batch = 1
    encode_blocks = False
    #: an in-process backend never outlives its process
    dead: str | None = None
    #: CPU threads torch's operators may use in the model process (None: torch's default, one per core).
    #: A GPU backend's host work is one thread launching kernels; torch's idle OpenMP workers spin beside it
    #: (see model_process.child.limit_host_threads)
    host_threads: int | None = None

    @classmethod
    def warm_up(cls, progress: ProgressFn) -> None:
        """Do the heavy imports before a model is asked for (a model process reports them as progress)."""

    def take_surviving_events(self) -> list[StepEvent]:
        return []

    def active_jobs(self) -> int:
        """How many jobs it holds (submitted and not yet finished or cancelled)."""
        return 0

    def encoder_spec(self) -> EncoderSpec | None:
        """How another process can tokenize for this model without asking it (None: it cannot)."""
        return None

    def memory_used(self) -> dict[str, int]:
        return {}


@runtime_checkable
class PipeBacked(Protocol):
    """A backend in a model process whose pipe an event loop can read (see serving.pipe_runner)."""

    loop_reads: bool
    #: start and end of the model process's last step and when this side read its events
    last_step_times: tuple[float, float, float] | None

    @property
    def dead(self) -> str | None: ...
    def fileno(self) -> int: ...
    def read_available(self) -> list[Any]: ...
    def take_step(self, msg: Any) -> list[StepEvent]: ...
    def has_pending(self) -> bool: ...


@runtime_checkable
class TensorCensus(Protocol):
    """A backend that can list the CUDA tensors alive where it runs (a diagnostic)."""

    def cuda_tensor_census(self) -> dict[str, Any]: ...
