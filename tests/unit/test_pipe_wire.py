"""What crosses the model process's pipe comes back as it went: every field of an event, log-probabilities
with their raw bytes, and whose fault a failed job was (a request's fault is a 400 on the API)."""

from __future__ import annotations

from app.engine.backends.gpu_common import fault_of
from app.engine.backends.model_process import protocol as p
from app.engine.constraints.grammars import GrammarError
from app.engine.events import DecodeTimes, StepEvent, TokenLogprob


def test_events_cross_the_pipe_whole() -> None:
    euro = TokenLogprob("\ufffd", -0.25, (("\ufffd", -0.25), ("a", -2.0)), raw=b"\xe2", top_raw=(b"\xe2", b"a"))
    events = [
        StepEvent(1, "ab", 2, False, logprobs=(euro,)),
        StepEvent(2, "", 0, True, "error", "grammar refused: bad regex", error_kind="request"),
        StepEvent(3, "x", 1, True, "length", None, DecodeTimes(4, 0.5, 0.6)),
    ]
    wire = [p.event_tuple(events[0]), p.event_tuple(events[1]), p.event_tuple(events[2], (4, 0.5, 0.6))]
    assert p.from_wire(wire) == events


def test_a_refused_grammar_is_the_requests_fault_anything_else_the_servers() -> None:
    assert fault_of(GrammarError("unsupported keyword")) == "request"
    assert fault_of(RuntimeError("CUDA error")) is None


def test_a_non_streaming_jobs_merged_events_keep_whose_fault_its_end_was() -> None:
    from app.engine.backends.model_process.child import Outbox
    from app.engine.events import BackendJob, SamplingParams

    sent: list[tuple] = []
    outbox = Outbox(sent.append)
    job = BackendJob([1], 8, SamplingParams(), [], set(), stream=False, job_id=41)
    outbox.submitted(job)
    outbox.step([StepEvent(41, "a", 1)], 1, 0.0, 0.001)  # its first event goes at once
    outbox.step([StepEvent(41, "b", 1)], 1, 0.001, 0.002)  # held
    outbox.step([StepEvent(41, "", 0, True, "error", "refused", error_kind="request")], 1, 0.002, 0.003)
    events = [e for msg in sent for e in p.from_wire(msg[1])]
    assert [e.text for e in events] == ["a", "b"]
    assert events[-1].finished and events[-1].error_kind == "request" and events[-1].error == "refused"
