"""A backend that follows app/engine/backends/contract.py without a model, for the model manager's rules.

Loading can be held open (``gate``), made to fail (``fail``) and cancelled like a real load; jobs give
one token of text per step. Only the manager's scheduling is tested with it: everything that serves
text is tested with the tiny model.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Sequence

from app.engine.backends.contract import BackendBase, BackendLoadError, LoadCancelled, ProgressFn
from app.engine.events import BackendJob, StepEvent


class FakeBackend(BackendBase):
    name = "fake"
    batching = "continuous"
    context_length = 256
    max_batch = 4

    def __init__(self, model: str, *, gate: threading.Event | None = None, fail: str | None = None,
                 hears_cancel: bool = True) -> None:
        self.model = model
        self.gate = gate
        self.fail = fail
        #: False: the load is past its last look at ``cancel`` (a real load checks between steps)
        self.hears_cancel = hears_cancel
        self.loaded = False
        self.load_started = threading.Event()
        self.unloads = 0
        self._left: dict[int, int] = {}

    def load(self, progress: ProgressFn, cancel: threading.Event) -> None:
        self.load_started.set()
        progress(0.5, "half way")
        while self.gate is not None and not self.gate.wait(0.005):
            if cancel.is_set() and self.hears_cancel:
                raise LoadCancelled("load cancelled")
        if cancel.is_set() and self.hears_cancel:
            raise LoadCancelled("load cancelled")
        if self.fail is not None:
            raise BackendLoadError(self.fail)
        self.loaded = True

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(chr(i) for i in ids)

    def eos_token_ids(self) -> set[int]:
        return set()

    def submit(self, job: BackendJob) -> None:
        self._left[job.job_id] = job.max_new_tokens

    def cancel(self, job_id: int) -> None:
        self._left.pop(job_id, None)

    def step(self) -> list[StepEvent]:
        events = []
        for job_id in list(self._left):
            self._left[job_id] -= 1
            done = self._left[job_id] == 0
            if done:
                del self._left[job_id]
            events.append(StepEvent(job_id, "x", 1, done, "length" if done else None))
        return events

    def has_work(self) -> bool:
        return bool(self._left)

    def active_jobs(self) -> int:
        return len(self._left)

    def unload(self) -> None:
        self.unloads += 1
        self.loaded = False
        self._left.clear()


@dataclass
class FakeFleet:
    """The manager's backend factory: builds a :class:`FakeBackend` per load and remembers them all.

    ``gates[name]`` holds that model's loads open until set; ``failures[name]`` makes them fail with
    that message (remove it to "repair" the model); ``factory_errors[name]`` makes the factory itself
    raise (as building a backend for an unusable folder does); the loads of ``deaf`` models never look
    at their cancel event.
    """

    idle_minutes: dict[str, float] = field(default_factory=dict)
    gates: dict[str, threading.Event] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    factory_errors: dict[str, str] = field(default_factory=dict)
    deaf: set[str] = field(default_factory=set)
    built: list[FakeBackend] = field(default_factory=list)

    def __call__(self, name: str) -> tuple[FakeBackend, float]:
        if name in self.factory_errors:
            raise BackendLoadError(self.factory_errors[name])
        backend = FakeBackend(name, gate=self.gates.get(name), fail=self.failures.get(name),
                              hears_cancel=name not in self.deaf)
        self.built.append(backend)
        return backend, self.idle_minutes.get(name, 0.0)

    def loads(self, name: str) -> int:
        return sum(1 for b in self.built if b.model == name)

    def last(self, name: str) -> FakeBackend:
        return [b for b in self.built if b.model == name][-1]
