"""Jobs of a GPU backend whose grammar is compiling: the backend's step loop goes on meanwhile.

Compiling a grammar takes milliseconds for a JSON schema and, for a model's first grammar, about a second
more to build the grammar engine's view of a large vocabulary. Done in ``submit`` it would hold up every
running job's next token that long. Here it runs on the compiler's worker thread
(:meth:`~app.engine.constraints.masks.ConstraintCompiler.compile_soon`); the backend asks at each step
which jobs are ready and enqueues them then, with their filters.
"""

from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import Union

from app.engine.constraints.grammars import GrammarError
from app.engine.constraints.masks import ConstraintCompiler, JobConstraint
from app.engine.events import BackendJob

Compiled = Union[JobConstraint, Exception]


class GrammarQueue:
    """The jobs waiting for their grammar, by job id, in the order they came."""

    def __init__(self) -> None:
        self._waiting: dict[int, tuple[BackendJob, Future]] = {}

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, compiler: ConstraintCompiler, job: BackendJob) -> None:
        """Start compiling ``job.grammar``; the job comes back from :meth:`ready`."""
        assert job.grammar is not None
        self._waiting[job.job_id] = (job, compiler.compile_soon(job.grammar))

    def cancel(self, job_id: int) -> bool:
        """Forget a waiting job (a compile not started yet is dropped); whether it was waiting."""
        entry = self._waiting.pop(job_id, None)
        if entry is not None:
            entry[1].cancel()
        return entry is not None

    def clear(self) -> None:
        for _, future in self._waiting.values():
            future.cancel()  # the compiler's one worker is free for the next model's grammars
        self._waiting.clear()

    def ready(self, wait_s: float = 0.0) -> list[tuple[BackendJob, Compiled]]:
        """The jobs whose grammar is compiled, each with its constraint or the reason it was refused (a
        :class:`GrammarError` saying "constraint: ..."); with ``wait_s``, first wait that long at most for
        one to finish (a backend with nothing else to step)."""
        if wait_s > 0 and self._waiting:
            wait([f for _, f in self._waiting.values()], timeout=wait_s, return_when=FIRST_COMPLETED)
        out: list[tuple[BackendJob, Compiled]] = []
        for job_id in [j for j, (_, f) in self._waiting.items() if f.done()]:
            job, future = self._waiting.pop(job_id)
            exc = future.exception()
            if exc is None:
                out.append((job, future.result()))
            elif isinstance(exc, GrammarError):
                out.append((job, GrammarError(f"constraint: {exc}")))
            elif isinstance(exc, Exception):
                out.append((job, exc))
            else:  # e.g. a panic in the grammar engine's native code (a BaseException): still this job's end
                out.append((job, RuntimeError(f"the grammar engine failed: {exc!r}")))
        return out
