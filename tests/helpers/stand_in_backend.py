"""The GPU backends' job handling (GeneratorJobs, shared by exllamav2's and exllamav3's backends) over a
stand-in for their generators: neither library runs without CUDA, so the tests drive the shared code with
what it asks of them (enqueue, cancel, num_remaining_jobs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from app.engine.backends.gpu_jobs import GeneratorJobs
from app.engine.constraints.masks import JobConstraint
from app.engine.events import BackendJob


class StandInGenerator:
    """What GeneratorJobs asks of exllamav2's and exllamav3's generators."""

    def __init__(self) -> None:
        self.jobs: list[Any] = []

    def enqueue(self, job: Any) -> None:
        if job["prompt_ids"] == [0]:
            raise ValueError("prompt does not fit the cache")
        self.jobs.append(job)

    def cancel(self, job: Any) -> None:
        self.jobs.remove(job)

    def num_remaining_jobs(self) -> int:
        return len(self.jobs)


class StandInBackend(GeneratorJobs):
    """The GPU backends' job handling over a stand-in generator: its jobs are dicts, its filters the
    compiled constraint itself."""

    def __init__(self, model_dir: Path, long_slots: int | None = None) -> None:
        self.model_dir = str(model_dir)
        self.vocab_size = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        self._generator = StandInGenerator()
        self._init_jobs(long_slots)

    def eos_token_ids(self) -> set[int]:
        return {2}

    def _enqueue(self, job: BackendJob, filters: list[Any]) -> None:
        gen_job = {"id": job.job_id, "prompt_ids": job.prompt_ids, "filters": filters}
        self._generator.enqueue(gen_job)
        self._jobs[job.job_id] = gen_job

    def _filters(self, job: BackendJob, constraint: JobConstraint) -> list[Any]:
        return [constraint]
