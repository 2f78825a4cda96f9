"""A backend that answers with the text its prompt asks for: for tests of what the server makes of a
model's output (tool calls in a model's format), where a random-weight model would never write it.

The prompt (rendered by the model's real template) carries the answer between ``<<say>>`` and
``<</say>>``; the backend encodes it with the model folder's tokenizer and gives it out a few tokens
per step through the real text stream, then finishes with "stop". Everything after the backend (the
tool-call parser, the wire format, the client) is the real thing.
"""

from __future__ import annotations

import threading
from typing import Any, Sequence

from app.engine.backends.contract import BackendBase, ProgressFn
from app.engine.backends.text_stream import TextStream
from app.engine.catalog.tokenizer import FolderTokenizer
from app.engine.events import BackendJob, StepEvent

OPEN, CLOSE = "<<say>>", "<</say>>"


def say(text: str) -> str:
    """A user message that makes the scripted backend answer ``text``."""
    return f"{OPEN}{text}{CLOSE}"


class ScriptedBackend(BackendBase):
    name = "scripted"
    batching = "continuous"
    last_step_batch = 0

    def __init__(self, model_dir: str, *, context_length: int = 2048, tokens_per_step: int = 3) -> None:
        self.model_dir, self.context_length, self.max_batch = model_dir, context_length, 8
        self.tokens_per_step = tokens_per_step
        self._tok: FolderTokenizer | None = None
        self._jobs: dict[int, tuple[list[int], TextStream, int]] = {}
        self.vocab_size: int | None = None

    def load(self, progress: ProgressFn, cancel: threading.Event) -> None:
        self._tok = FolderTokenizer(self.model_dir)
        self.vocab_size = 4096
        progress(1.0, "loaded")

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        assert self._tok is not None
        return self._tok.encode(text, add_bos=add_bos)

    def decode(self, ids: Sequence[int]) -> str:
        assert self._tok is not None
        return self._tok.decode(ids)

    def eos_token_ids(self) -> set[int]:
        return set()

    def submit(self, job: BackendJob) -> None:
        assert self._tok is not None
        prompt = self._tok.decode(job.prompt_ids)
        start = prompt.rfind(OPEN)
        script = prompt[start + len(OPEN):prompt.find(CLOSE, start)] if start >= 0 else "no script"
        ids = self._tok.encode(script)[:job.max_new_tokens]
        self._jobs[job.job_id] = (ids, TextStream(self._tok, job.stop_strings), job.max_new_tokens)

    def cancel(self, job_id: int) -> None:
        self._jobs.pop(job_id, None)

    def has_work(self) -> bool:
        return bool(self._jobs)

    def active_jobs(self) -> int:
        return len(self._jobs)

    def step(self) -> list[StepEvent]:
        events = []
        for job_id, (ids, stream, limit) in list(self._jobs.items()):
            taken, rest = ids[:self.tokens_per_step], ids[self.tokens_per_step:]
            text = "".join(stream.push(t)[0] for t in taken)
            if rest:
                self._jobs[job_id] = (rest, stream, limit)
                events.append(StepEvent(job_id, text, len(taken)))
            else:
                del self._jobs[job_id]
                events.append(StepEvent(job_id, text + stream.finish(), len(taken), True, "stop"))
        self.last_step_batch = len(events)
        return events

    def unload(self) -> None:
        self._jobs.clear()


def scripted_factory(entry: Any, settings: Any) -> ScriptedBackend:
    """The engine's backend factory for a server that answers with scripts."""
    return ScriptedBackend(entry.model_dir, context_length=settings.context_length)
