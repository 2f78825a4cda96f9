"""How the exllamav3 backend turns its generator's results into the contract's events.

exllamav3 cannot run here (its import builds a CUDA extension), so a stand-in generator hands back
results shaped as exllamav3 1.6.5's Generator.iterate() documents them (generator/generator.py:
"streaming" results with text, token_ids (1, n), token_probs (1, n), eos and eos_reason; "error" results
from reap_failed_job carrying the job but no identifier). The GPU stage checks the real thing.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

from app.engine.backends.exllamav3_backend import ExLlamaV3Backend
from app.engine.events import StepEvent


class StandInGenerator:
    def __init__(self, rounds: list[list[dict[str, Any]]]) -> None:
        self.rounds = rounds
        self.cancelled: list[Any] = []

    def iterate(self) -> list[dict[str, Any]]:
        return self.rounds.pop(0) if self.rounds else []

    def num_remaining_jobs(self) -> int:
        return len(self.rounds)

    def cancel(self, job: Any) -> None:
        self.cancelled.append(job)


def streaming(job_id: int, text: str, ids: list[int], eos: bool = False, reason: str | None = None) -> dict:
    r = {"stage": "streaming", "identifier": job_id, "eos": eos, "serial": job_id, "text": text,
         "token_ids": torch.tensor([ids], dtype=torch.long)}
    return {**r, "eos_reason": reason} if reason else r


def backend_with(rounds: list[list[dict[str, Any]]], jobs: list[int]) -> ExLlamaV3Backend:
    backend = ExLlamaV3Backend("/models/m", context_length=2048, max_batch=4)
    backend._generator = StandInGenerator(rounds)
    backend._jobs = {j: SimpleNamespace(identifier=j) for j in jobs}
    return backend


def test_results_become_events_with_the_finish_reasons_of_the_contract() -> None:
    failed = SimpleNamespace(identifier=3)
    rounds = [[{"stage": "started", "identifier": 1, "eos": False, "serial": 1},
               {"stage": "prefill", "identifier": 2, "curr_progress": 8, "max_progress": 16, "eos": False},
               streaming(1, "Hé", [10, 11]), streaming(2, "", [12])],
              [streaming(1, "llo", [13], eos=True, reason="max_new_tokens"),
               streaming(2, "x", [14], eos=True, reason="stop_string"),
               {"job": failed, "serial": 3, "stage": "error", "eos": True, "error": RuntimeError("boom")}]]
    backend = backend_with(rounds, [1, 2, 3])
    assert backend.has_work()
    first = backend.step()
    assert first == [StepEvent(1, "Hé", 2), StepEvent(2, "", 1)] and backend.last_step_batch == 2
    second = backend.step()
    assert second == [StepEvent(1, "llo", 1, True, "length"), StepEvent(2, "x", 1, True, "stop"),
                      StepEvent(3, "", 0, True, "error", "boom")]
    assert backend.active_jobs() == 0 and not backend.has_work()


def test_a_stop_token_and_a_completed_grammar_end_with_stop() -> None:
    rounds = [[streaming(1, "", [2], eos=True, reason="stop_token"),
               streaming(2, "}", [7], eos=True, reason="end_filter")]]
    assert backend_with(rounds, [1, 2]).step() == [StepEvent(1, "", 1, True, "stop"), StepEvent(2, "}", 1, True, "stop")]


def test_cancelled_jobs_are_dropped_and_their_late_results_ignored() -> None:
    rounds = [[streaming(1, "late", [5]), streaming(2, "on", [6])]]
    backend = backend_with(rounds, [1, 2])
    backend.cancel(1)
    backend.cancel(99)  # unknown: nothing to do
    assert [j.identifier for j in backend._generator.cancelled] == [1]
    assert backend.step() == [StepEvent(2, "on", 1)]


def test_a_refused_job_ends_at_the_next_step_and_counts_as_work() -> None:
    backend = backend_with([], [])
    backend._refused.append(StepEvent(7, "", 0, True, "error", "constraint: bad grammar"))
    assert backend.has_work()
    assert backend.step() == [StepEvent(7, "", 0, True, "error", "constraint: bad grammar")]
    assert not backend.has_work()
