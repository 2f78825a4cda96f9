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
        """Forget a waiting job (its compile finishes unused); whether it was waiting."""
        return self._waiting.pop(job_id, None) is not None

    def clear(self) -> None:
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
            else:
                out.append((job, exc))
        return out
