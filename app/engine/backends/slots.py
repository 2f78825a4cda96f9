"""A batch slot kept for short jobs, so an editor's autocomplete never waits for a full batch of chats.

With the batch full of long chat answers, a new job waits until one of them ends: seconds, while an
editor cancels and resends its autocomplete request every keystroke or two, so none of them would ever
start. Each batching backend therefore runs ``batch_size`` long jobs plus :data:`SHORT_SLOTS` more that
only short jobs (at most :data:`SHORT_MAX_TOKENS` new tokens, what autocomplete asks for) may take:
:class:`ShortSlots` decides which jobs go to the backend's batch now and holds the other long jobs, in
the order they came, until a long job ends.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Container
from typing import Generic, TypeVar

#: a job asking for at most this many new tokens is short (autocomplete asks for 16 to 64)
SHORT_MAX_TOKENS = 64
#: batch slots beyond the batch size that only short jobs take
SHORT_SLOTS = 1

T = TypeVar("T")


def is_short(max_new_tokens: int) -> bool:
    return max_new_tokens <= SHORT_MAX_TOKENS


class ShortSlots(Generic[T]):
    """At most ``long_slots`` long jobs in the batch at once; the others held in arrival order.

    ``admit`` says whether a job may start now (short jobs always may: the backend's batch has
    :data:`SHORT_SLOTS` more slots than ``long_slots``, and beyond them its own queue holds them);
    ``release`` hands back the held jobs that may start once some long ones have ended.
    """

    def __init__(self, long_slots: int) -> None:
        if long_slots < 1:
            raise ValueError(f"long_slots must be at least 1, not {long_slots}")
        self.long_slots = long_slots
        self._long: set[int] = set()  # ids of the long jobs started and maybe still running
        self._held: deque[tuple[int, T]] = deque()

    def admit(self, job_id: int, max_new_tokens: int, item: T, running: Container[int]) -> bool:
        """True: start ``item`` now. False: it is held until :meth:`release` hands it back.
        ``running``: the ids of the jobs the backend still runs (a long job not among them has ended)."""
        if is_short(max_new_tokens):
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
