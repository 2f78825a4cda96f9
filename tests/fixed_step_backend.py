"""A backend whose every step takes a fixed time: for measuring what serving adds to the steps.

Each step busy-waits ``step_s`` (as a CUDA synchronisation spins) and yields one token of text for
one job (one job at a time, like exllamav2's unpaged generator). Tokenizing uses the model folder's
tokenizer.json. Used by scripts/bench_model_process.py and by tests of the model process's pipe.
"""

from __future__ import annotations

import threading
import time
from typing import Sequence

from app.engine.backends.contract import BackendBase, ProgressFn
from app.engine.events import BackendJob, StepEvent
from app.engine.catalog.tokenizer import EncoderSpec, FolderTokenizer


class FixedStepBackend(BackendBase):
    """One token of text per job per step; every step takes ``step_s`` of busy CPU time."""

    name = "fixed-step"
    batching = "single"
    notice = ""
    last_step_batch = 0

    def __init__(self, model_dir: str, *, context_length: int, max_batch: int, step_s: float = 0.0025) -> None:
        self.model_dir, self.context_length, self.max_batch, self.step_s = model_dir, context_length, max_batch, step_s
        self._tok: FolderTokenizer | None = None
        self._left: dict[int, int] = {}
        self.vocab_size: int | None = None

    def load(self, progress: ProgressFn, cancel: threading.Event) -> None:
        self._tok = FolderTokenizer(self.model_dir)
        self.vocab_size = 1024
        progress(1.0, "loaded")

    def encoder_spec(self) -> EncoderSpec:
        assert self._tok is not None
        return EncoderSpec(self.model_dir, self._tok.bos_id)

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        assert self._tok is not None
        return self._tok.encode(text, add_bos=add_bos)

    def decode(self, ids: Sequence[int]) -> str:
        assert self._tok is not None
        return self._tok.decode(ids)

    def eos_token_ids(self) -> set[int]:
        return set()

    def submit(self, job: BackendJob) -> None:
        self._left[job.job_id] = job.max_new_tokens

    def cancel(self, job_id: int) -> None:
        self._left.pop(job_id, None)

    def has_work(self) -> bool:
        return bool(self._left)

    def active_jobs(self) -> int:
        return len(self._left)

    def step(self) -> list[StepEvent]:
        end = time.perf_counter() + self.step_s
        while time.perf_counter() < end:
            pass
        events = []
        for job_id in list(self._left)[: self.jobs_per_step()]:
            self._left[job_id] -= 1
            done = self._left[job_id] == 0
            if done:
                del self._left[job_id]
            events.append(StepEvent(job_id, "a", 1, done, "length" if done else None))
        self.last_step_batch = len(events)
        return events

    def jobs_per_step(self) -> int:
        return 1  # one job at a time, like the unpaged generator

    def unload(self) -> None:
        self._left.clear()

    def memory_used(self) -> dict[str, int]:
        return {}


class BatchedFixedStepBackend(FixedStepBackend):
    """The same step, for up to ``max_batch`` jobs at once (a continuous-batching generator's shape)."""

    batching = "continuous"

    def jobs_per_step(self) -> int:
        return self.max_batch


class ThreadReportingBackend(FixedStepBackend):
    """The fixed step, loaded with torch imported; its notice says how many CPU threads torch's operators
    may use in the process it runs in (the model process caps them at ``host_threads``)."""

    def load(self, progress: ProgressFn, cancel: threading.Event) -> None:
        import os

        import torch

        super().load(progress, cancel)
        self.notice = f"torch threads {torch.get_num_threads()}, OMP_NUM_THREADS {os.environ.get('OMP_NUM_THREADS')}"


class OneThreadBackend(ThreadReportingBackend):
    """As a GPU backend is: ``host_threads`` 1."""

    host_threads = 1
