"""What the two GPU backends do alike with their jobs, whatever the library.

A job with a grammar waits in a :class:`~app.engine.constraints.deferred.GrammarQueue` (compiled on the
compiler's thread) and is enqueued at the step its grammar is ready; a job the library or the grammar
engine refuses ends at the next step with the reason and whose fault it was; a long job beyond the
batch size is held (:mod:`~app.engine.backends.slots`: the generator's extra slot is for short jobs) and
enqueued at the step a long job has ended; cancel, ``has_work`` and ``active_jobs`` count the jobs in the
library's generator, those still compiling and those held.
"""

from __future__ import annotations

from typing import Any

from app.engine.backends.gpu_common import refusal
from app.engine.backends.slots import ShortSlots
from app.engine.constraints.deferred import GrammarQueue
from app.engine.constraints.masks import JobConstraint, compiler_for
from app.engine.events import BackendJob, StepEvent


class GeneratorJobs:
    """Mixin for a backend whose ``_generator`` has ``enqueue``, ``cancel`` and ``num_remaining_jobs``. The
    backend supplies :meth:`_enqueue` (make the library's job, keep it in ``_jobs``, enqueue it; raise when
    the library refuses) and :meth:`_filters` (the library's filters for a compiled grammar)."""

    _generator: Any

    def _init_jobs(self, long_slots: int | None = None, short_tokens: int | None = None) -> None:
        """``long_slots``: the batch size when the generator has :data:`~app.engine.backends.slots.SHORT_SLOTS`
        more slots for short jobs (of at most ``short_tokens`` prompt and new tokens, what the cache keeps
        pages for); None when it runs one job at a time (its own queue keeps the order)."""
        self._jobs: dict[int, Any] = {}  # job id -> the library's job
        self._grammars = GrammarQueue()  # jobs whose grammar is compiling
        self._refused: list[StepEvent] = []  # jobs that could not start, reported at the next step
        self._slots: ShortSlots[tuple[BackendJob, list[Any]]] | None = (
            None if long_slots is None else ShortSlots(long_slots, short_tokens))

    def _forget_jobs(self) -> None:
        self._jobs.clear()
        self._grammars.clear()
        self._refused.clear()
        if self._slots is not None:
            self._slots.clear()

    def _enqueue(self, job: BackendJob, filters: list[Any]) -> None:
        raise NotImplementedError

    def _filters(self, job: BackendJob, constraint: JobConstraint) -> list[Any]:
        raise NotImplementedError

    def submit(self, job: BackendJob) -> None:
        if job.grammar is not None:  # compiled on the compiler's thread; enqueued by step() once ready
            self._grammars.add(compiler_for(self), job)
            return
        self._start(job, [])

    def _start(self, job: BackendJob, filters: list[Any]) -> None:
        if self._slots is None or self._slots.admit(job.job_id, job.max_new_tokens, (job, filters), self._jobs,
                                                    len(job.prompt_ids)):
            self._enqueue_now(job, filters)

    def _enqueue_now(self, job: BackendJob, filters: list[Any]) -> None:
        try:
            self._enqueue(job, filters)
        except Exception as exc:  # noqa: BLE001 - the library's reason ends this job only, at the next step
            self._jobs.pop(job.job_id, None)
            self._refused.append(refusal(job.job_id, exc))

    def _start_compiled(self) -> None:
        """Enqueue the jobs whose grammar has compiled; with nothing else to step, wait a moment for a
        compile rather than spin."""
        idle = self._generator.num_remaining_jobs() == 0
        for job, got in self._grammars.ready(0.005 if idle else 0.0):
            if isinstance(got, Exception):
                self._refused.append(refusal(job.job_id, got))
                continue
            try:
                filters = self._filters(job, got)
            except Exception as exc:  # noqa: BLE001 - this job's end, not the step's
                self._refused.append(refusal(job.job_id, exc))
                continue
            self._start(job, filters)

    def _take_refused(self) -> list[StepEvent]:
        """At the start of a step: start the long jobs held for a slot that has come free and the jobs whose
        grammar is ready, then hand over the events of the jobs that could not start."""
        if self._slots is not None and len(self._slots):
            for job, filters in self._slots.release(self._jobs):
                self._enqueue_now(job, filters)
        if len(self._grammars):
            self._start_compiled()
        events, self._refused = self._refused, []
        return events

    def cancel(self, job_id: int) -> None:
        if self._grammars.cancel(job_id) or (self._slots is not None and self._slots.cancel(job_id)):
            return
        gen_job = self._jobs.pop(job_id, None)
        if gen_job is not None:
            self._generator.cancel(gen_job)

    def has_work(self) -> bool:
        return bool(self._refused) or len(self._grammars) > 0 or bool(self._slots) or (
            self._generator is not None and self._generator.num_remaining_jobs() > 0)

    def active_jobs(self) -> int:
        return len(self._jobs) + len(self._grammars) + (0 if self._slots is None else len(self._slots))
