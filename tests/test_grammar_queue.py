"""The GPU backends' queue of jobs whose grammar compiles on the compiler's thread (constraints.deferred),
with the real grammar engine and the tiny model's tokenizer: the step loop is never held by a compile, a
job comes back once its grammar (and its first mask) is ready, a refused grammar comes back as the request's fault, and a
cancelled job never comes back."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from app.engine.backends.gpu_common import fault_of, refusal
from app.engine.constraints.deferred import GrammarQueue
from app.engine.constraints.grammars import GrammarError, json_object_grammar, json_schema_grammar
from app.engine.constraints.masks import ConstraintCompiler, JobConstraint
from app.engine.events import BackendJob, SamplingParams
from tests.helpers.stand_in_backend import StandInBackend


def job(job_id: int, grammar: str) -> BackendJob:
    return BackendJob(job_id=job_id, prompt_ids=[1, 2, 3], max_new_tokens=8, sampling=SamplingParams(),
                      stop_strings=[], stop_token_ids={2}, grammar=grammar)


@pytest.fixture()
def compiler(tiny_model_dir: Path) -> ConstraintCompiler:
    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    return ConstraintCompiler(tiny_model_dir / "tokenizer.json", vocab, [2])


def wait_ready(queue: GrammarQueue, count: int, timeout_s: float = 30.0) -> list:
    got: list = []
    deadline = time.monotonic() + timeout_s
    while len(got) < count and time.monotonic() < deadline:
        got += queue.ready(0.05)
    return got


def test_jobs_come_back_compiled_in_their_own_time(compiler: ConstraintCompiler) -> None:
    queue = GrammarQueue()
    adding = threading.Thread(target=lambda: [
        queue.add(compiler, job(1, json_object_grammar())),
        queue.add(compiler, job(2, json_schema_grammar({"type": "object", "properties": {"a": {"type": "integer"}},
                                                        "required": ["a"]})))])
    with compiler._lock:  # the tokenizer's view cannot be built: a compile in add() would never return
        adding.start()
        adding.join(10)
        assert not adding.is_alive(), "add() waited for the compile"
        assert len(queue) == 2 and queue.ready(0.05) == []  # nothing is ready while the compile waits
    got = wait_ready(queue, 2)
    assert sorted(j.job_id for j, _ in got) == [1, 2]
    assert all(isinstance(c, JobConstraint) for _, c in got)
    assert len(queue) == 0 and queue.ready() == []
    # the first mask was made on the compiler's thread too (the grammar engine's first in a process takes
    # about a second), and making it left the grammar where it was: the same mask as a fresh compile's
    for j, c in got:
        assert c.first_mask_s is not None
        assert c.allowed().tolist() == compiler.compile(j.grammar).allowed().tolist()


def test_a_refused_grammar_is_the_requests_fault(compiler: ConstraintCompiler) -> None:
    queue = GrammarQueue()
    queue.add(compiler, job(7, "start: this is not lark ((("))
    [(back, got)] = wait_ready(queue, 1)
    assert back.job_id == 7 and isinstance(got, GrammarError) and str(got).startswith("constraint:")
    event = refusal(7, got)
    assert event.finished and event.finish_reason == "error" and event.error_kind == "request" == fault_of(got)


def test_a_cancelled_job_never_comes_back(compiler: ConstraintCompiler) -> None:
    queue = GrammarQueue()
    queue.add(compiler, job(1, json_object_grammar()))
    queue.add(compiler, job(2, json_object_grammar()))
    assert queue.cancel(1) and not queue.cancel(1)
    got = wait_ready(queue, 1)
    time.sleep(0.2)
    got += queue.ready(0.05)
    assert [j.job_id for j, _ in got] == [2]


class Panic(BaseException):
    """A panic in the grammar engine's native code outside engine_call (building the tokenizer's view, which
    compile() does first) comes out as pyo3's PanicException: a BaseException, not an Exception."""


class PanickingCompiler(ConstraintCompiler):
    def compile(self, grammar: str) -> JobConstraint:
        raise Panic("rust panicked")


def test_a_panic_in_the_grammar_engine_still_ends_only_its_job(tiny_model_dir: Path) -> None:
    queue = GrammarQueue()
    queue.add(PanickingCompiler(tiny_model_dir / "tokenizer.json", 64, [2]), job(3, json_object_grammar()))
    [(back, got)] = wait_ready(queue, 1)
    assert back.job_id == 3 and isinstance(got, RuntimeError) and "rust panicked" in str(got)
    assert refusal(3, got).error_kind is None  # the server's fault, not the request's


def test_the_gpu_backends_start_a_grammar_job_once_compiled_and_end_refused_ones(tiny_model_dir: Path) -> None:
    backend = StandInBackend(tiny_model_dir)
    backend.submit(job(1, json_object_grammar()))
    backend.submit(job(2, "start: this is not lark ((("))
    backend.submit(BackendJob(prompt_ids=[0], max_new_tokens=4, sampling=SamplingParams(), stop_strings=[],
                              stop_token_ids={2}, job_id=3))  # the library refuses it
    backend.submit(job(4, json_object_grammar()))
    backend.cancel(4)  # cancelled while compiling: never started, never reported
    assert backend.has_work() and backend.active_jobs() == 2  # job 1 compiling, job 2 compiling
    events, deadline = [], time.monotonic() + 30
    while (not backend._jobs or 2 not in {e.job_id for e in events}) and time.monotonic() < deadline:
        events += backend._take_refused()  # what each step does first
    assert [j["id"] for j in backend._generator.jobs] == [1]
    assert isinstance(backend._generator.jobs[0]["filters"][0], JobConstraint)
    ends = {e.job_id: (e.finish_reason, e.error_kind) for e in events}
    assert ends == {2: ("error", "request"), 3: ("error", None)}, events
    assert backend.active_jobs() == 1
    backend.cancel(1)
    assert not backend.has_work() and backend.active_jobs() == 0
