"""A batch slot kept for short jobs, so an editor's autocomplete never waits for a full batch of chats.

With the batch full of long chat answers, a new job waits until one of them ends: seconds, while an
editor cancels and resends its autocomplete request every keystroke or two, so none of them would ever
start. Each batching backend therefore runs ``batch_size`` long jobs plus :data:`SHORT_SLOTS` more that
only short jobs (at most :data:`SHORT_MAX_TOKENS` new tokens, what autocomplete asks for) may take:
:class:`ShortSlots` decides which jobs go to the backend's batch now and holds the other long jobs, in
the order they came, until a long job ends. The GPU libraries reserve a job's pages (prompt and new
tokens) when it starts, and ``batch_size`` chats may reserve every page of a ``batch_size``-context
cache, so their caches also hold :func:`short_reserve_tokens` more; a job is short only if it fits them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Container
from typing import Generic, TypeVar

#: a job asking for at most this many new tokens is short (autocomplete asks for 16 to 64)
SHORT_MAX_TOKENS = 64
#: batch slots beyond the batch size that only short jobs take
SHORT_SLOTS = 1
#: the most tokens (prompt and new ones) of a short job on a GPU backend: the cache's extra pages
SHORT_CONTEXT = 2048

T = TypeVar("T")


def is_short(max_new_tokens: int, prompt_tokens: int = 0, limit: int | None = None) -> bool:
    """Short: few new tokens, and (with ``limit``) prompt and new tokens within the kept pages."""
    return max_new_tokens <= SHORT_MAX_TOKENS and (limit is None or prompt_tokens + max_new_tokens <= limit)


def short_reserve_tokens(context_length: int, page: int) -> int:
    """Cache tokens kept for the short slots beyond ``batch_size`` contexts: a short job's most, in whole
    pages (a job fits them when its prompt and new tokens, plus the token a library adds, are at most
    :func:`short_limit`)."""
    return SHORT_SLOTS * -(-min(context_length, SHORT_CONTEXT) // page) * page


def short_limit(context_length: int) -> int:
    """Prompt plus new tokens of a job that fits one short slot's pages (one token kept for the library's
    own reservation beyond the new tokens)."""
    return min(context_length, SHORT_CONTEXT) - 1


class ShortSlots(Generic[T]):
    """At most ``long_slots`` long jobs in the batch at once; the others held in arrival order.

    ``admit`` says whether a job may start now (short jobs always may: the backend's batch has
    :data:`SHORT_SLOTS` more slots than ``long_slots``, and beyond them its own queue holds them);
    ``release`` hands back the held jobs that may start once some long ones have ended.
    """

    def __init__(self, long_slots: int, short_tokens: int | None = None) -> None:
        """``short_tokens``: the most prompt and new tokens of a short job (None: no limit)."""
        if long_slots < 1:
            raise ValueError(f"long_slots must be at least 1, not {long_slots}")
        self.long_slots = long_slots
        self.short_tokens = short_tokens
        self._long: set[int] = set()  # ids of the long jobs started and maybe still running
        self._held: deque[tuple[int, T]] = deque()

    def admit(self, job_id: int, max_new_tokens: int, item: T, running: Container[int],
              prompt_tokens: int = 0) -> bool:
        """True: start ``item`` now. False: it is held until :meth:`release` hands it back.
        ``running``: the ids of the jobs the backend still runs (a long job not among them has ended)."""
        if is_short(max_new_tokens, prompt_tokens, self.short_tokens):
            return True
        if not self._held and self._long_count(running) < self.long_slots:
            self._long.add(job_id)
            return True
        self._held.append((job_id, item))
        return False

    def release(self, running: Container[int]) -> list[T]:
        """The held jobs that may start now, oldest first, given the ids of the jobs still running."""
        if not self._held:
            return []
        free = self.long_slots - self._long_count(running)
        out = []
        while self._held and free > 0:
            job_id, item = self._held.popleft()
            self._long.add(job_id)
            out.append(item)
            free -= 1
        return out

    def cancel(self, job_id: int) -> bool:
        """Drop a held job; False when it was not held (it runs, or is unknown)."""
        for i, (held_id, _) in enumerate(self._held):
            if held_id == job_id:
                del self._held[i]
                return True
        return False

    def clear(self) -> None:
        self._long.clear()
        self._held.clear()

    def __len__(self) -> int:
        """How many jobs are held."""
        return len(self._held)

    def _long_count(self, running: Container[int]) -> int:
        self._long = {job_id for job_id in self._long if job_id in running}
        return len(self._long)
