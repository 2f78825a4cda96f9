"""What the two GPU backends do alike with their jobs, whatever the library.

A long job beyond the batch size is held (:mod:`~app.engine.backends.slots`: the generator's extra slot
is for short jobs) and enqueued at the step a long job has ended. A job with a grammar takes its place
there when it is submitted, in arrival order, while its grammar compiles on the compiler's thread
(:class:`~app.engine.constraints.deferred.GrammarQueue`); it is enqueued at the first step at which it
has both its slot and its grammar (a slot granted to a job still compiling stays its own). A job the
library or the grammar engine refuses ends at the next step with the reason and whose fault it was.
cancel, ``has_work`` and ``active_jobs`` count the jobs in the library's generator, those still
compiling and those held.
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
        pages for); None when it runs one job at a time (its own queue keeps the order of the jobs it has
        been given: a job with a grammar joins it once the grammar has compiled)."""
        self._jobs: dict[int, Any] = {}  # job id -> the library's job
        self._grammars = GrammarQueue()  # jobs whose grammar is compiling
        self._refused: list[StepEvent] = []  # jobs that could not start, reported at the next step
        self._slots: ShortSlots[BackendJob] | None = (
            None if long_slots is None else ShortSlots(long_slots, short_tokens))
        self._granted: set[int] = set()  # jobs with a slot whose grammar is still compiling
        self._compiled: dict[int, list[Any]] = {}  # held jobs whose grammar is ready: their filters

    def _forget_jobs(self) -> None:
        self._jobs.clear()
        self._grammars.clear()
        self._refused.clear()
        self._granted.clear()
        self._compiled.clear()
        if self._slots is not None:
            self._slots.clear()

    def _enqueue(self, job: BackendJob, filters: list[Any]) -> None:
        raise NotImplementedError

    def _filters(self, job: BackendJob, constraint: JobConstraint) -> list[Any]:
        raise NotImplementedError

    def _holding_slots(self) -> set[int]:
        """The jobs that hold a slot: in the library's generator, or granted one while compiling."""
        return set(self._jobs) | self._granted

    def submit(self, job: BackendJob) -> None:
        if job.grammar is not None:  # compiled on the compiler's thread meanwhile
            try:
                self._grammars.add(compiler_for(self), job)
            except Exception as exc:  # noqa: BLE001 - e.g. the grammar engine missing: this job's end only
                self._refused.append(refusal(job.job_id, exc))
                return
        admitted = self._slots is None or self._slots.admit(
            job.job_id, job.max_new_tokens, job, self._holding_slots(), len(job.prompt_ids))
        if job.grammar is None:
            if admitted:
                self._enqueue_now(job, [])
        elif admitted and self._slots is not None:
            self._granted.add(job.job_id)

    def _enqueue_now(self, job: BackendJob, filters: list[Any]) -> None:
        try:
            self._enqueue(job, filters)
        except Exception as exc:  # noqa: BLE001 - the library's reason ends this job only, at the next step
            self._jobs.pop(job.job_id, None)
            self._refused.append(refusal(job.job_id, exc))

    def _refuse(self, job_id: int, exc: Exception) -> None:
        """A job whose grammar could not be used ends at the next step; its slot or its place is given up."""
        self.cancel(job_id)
        self._refused.append(refusal(job_id, exc))

    def _start_compiled(self) -> None:
        """Enqueue the jobs whose grammar has compiled and that have their slot (the others keep their place,
        their filters ready); with nothing else to step, wait a moment for a compile rather than spin."""
        idle = self._generator.num_remaining_jobs() == 0
        for job, got in self._grammars.ready(0.005 if idle else 0.0):
            if isinstance(got, Exception):
                self._refuse(job.job_id, got)
                continue
            try:
                filters = self._filters(job, got)
            except Exception as exc:  # noqa: BLE001 - this job's end, not the step's
                self._refuse(job.job_id, exc)
                continue
            if self._slots is None or job.job_id in self._granted:
                self._granted.discard(job.job_id)
                self._enqueue_now(job, filters)
            else:
                self._compiled[job.job_id] = filters

    def _take_refused(self) -> list[StepEvent]:
        """At the start of a step: start the jobs held for a slot that has come free (one still compiling
        keeps its slot until its grammar is ready) and the jobs whose grammar is ready, then hand over the
        events of the jobs that could not start."""
        if self._slots is not None and len(self._slots):
            for job in self._slots.release(self._holding_slots()):
                if job.grammar is None:
                    self._enqueue_now(job, [])
                elif job.job_id in self._compiled:
                    self._enqueue_now(job, self._compiled.pop(job.job_id))
                else:
                    self._granted.add(job.job_id)
        if len(self._grammars):
            self._start_compiled()
        events, self._refused = self._refused, []
        return events

    def cancel(self, job_id: int) -> None:
        self._grammars.cancel(job_id)
        self._granted.discard(job_id)
        self._compiled.pop(job_id, None)
        if self._slots is not None:
            self._slots.cancel(job_id)
        gen_job = self._jobs.pop(job_id, None)
        if gen_job is not None:
            self._generator.cancel(gen_job)

    def has_work(self) -> bool:
        return bool(self._refused) or len(self._grammars) > 0 or bool(self._slots) or (
            self._generator is not None and self._generator.num_remaining_jobs() > 0)

    def active_jobs(self) -> int:
        """Jobs in the generator, held for a slot (compiled or not), and compiling with a slot or without
        a gate (one job at a time: the library's queue)."""
        if self._slots is None:
            return len(self._jobs) + len(self._grammars)
        return len(self._jobs) + len(self._slots) + len(self._granted)
