"""The messages between the server and a model process, by name.

Each message is a :class:`~typing.NamedTuple` with its kind in ``KIND``. On the wire a message is a
plain tuple, its kind then its fields (:func:`pack`; pickled as a NamedTuple the per-token message
would take four times as long, 1.48 vs 0.37 us, and 116 instead of 67 bytes); :func:`unpack` gives the
receiver the named message back (+0.35 us).

To the model process, while loading: :class:`Load`, :class:`CancelLoad`, :class:`Serve`; then
:class:`Submit`, :class:`Cancel`, :class:`Encode`, :class:`Census`, :class:`Unload`.

From it: :class:`Progress`, :class:`Loaded`, :class:`LoadFailed`; then :class:`Events` after a step
(events as plain tuples, :func:`to_wire`), :class:`StepFailedMsg`, :class:`StepError`,
:class:`Memory` (while working), :class:`Reply` and :class:`Unloaded`.
"""

from __future__ import annotations

import os
import pickle
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Union

from app.engine.catalog.tokenizer import EncoderSpec
from app.engine.events import BackendJob, DecodeTimes, StepEvent, TokenLogprob


@dataclass
class LoadedInfo:
    """What the model process reports once the model is loaded."""

    batching: str
    notice: str
    vocab_size: int | None
    eos_ids: set[int]
    encoder: EncoderSpec | None
    memory: dict[str, int] = field(default_factory=dict)


# -- to the model process ------------------------------------------------------------------
class Load(NamedTuple):
    KIND = "load"
    model_dir: str
    kwargs: dict[str, Any]


class CancelLoad(NamedTuple):
    KIND = "cancel_load"


class Serve(NamedTuple):
    KIND = "serve"


class Submit(NamedTuple):
    KIND = "submit"
    job: BackendJob


class Cancel(NamedTuple):
    KIND = "cancel"
    job_id: int


class Encode(NamedTuple):
    KIND = "encode"
    request_id: int
    text: str
    add_bos: bool


class Census(NamedTuple):
    KIND = "census"
    request_id: int


class Unload(NamedTuple):
    KIND = "unload"


# -- from the model process ----------------------------------------------------------------
class Progress(NamedTuple):
    KIND = "progress"
    fraction: float
    message: str


class Loaded(NamedTuple):
    KIND = "loaded"
    info: LoadedInfo


class LoadFailed(NamedTuple):
    KIND = "load_failed"
    cancelled: bool
    message: str


class Events(NamedTuple):
    """One step's events (or a merged batch of them, see the child's Outbox)."""

    KIND = "events"
    events: list[tuple]
    batch: int
    #: start and end of the step in the model process (time.monotonic: one clock for all processes)
    t_start: float
    t_end: float


class StepFailedMsg(NamedTuple):
    KIND = "step_failed"
    job_ids: list[int]
    message: str
    events: list[tuple]
    batch: int


class StepError(NamedTuple):
    KIND = "step_error"
    message: str


class Memory(NamedTuple):
    """What the model process holds: its backend's memory figures (plus its own RSS) and jobs."""

    KIND = "memory"
    memory: dict[str, int]
    #: the jobs its backend holds (pending or running)
    active_jobs: int = 0


class Reply(NamedTuple):
    KIND = "reply"
    request_id: int
    answer: Any


class Unloaded(NamedTuple):
    KIND = "unloaded"


Message = Union[Load, CancelLoad, Serve, Submit, Cancel, Encode, Census, Unload, Progress, Loaded, LoadFailed,
                Events, StepFailedMsg, StepError, Memory, Reply, Unloaded]
#: the messages a step produces (what the runners read)
StepMessage = Union[Events, StepFailedMsg, StepError]

_KINDS: dict[str, Any] = {cls.KIND: cls for cls in (
    Load, CancelLoad, Serve, Submit, Cancel, Encode, Census, Unload, Progress, Loaded, LoadFailed, Events,
    StepFailedMsg, StepError, Memory, Reply, Unloaded)}


def pack(msg: Message) -> tuple:
    """What goes on the wire: the kind, then the fields."""
    return (msg.KIND, *msg)


def unpack(raw: tuple) -> Message:
    """The named message of a received tuple."""
    return _KINDS[raw[0]]._make(raw[1:])  # type: ignore[no-any-return]


def events_wire(events: list[tuple], batch: int, t_start: float, t_end: float) -> tuple:
    """An :class:`Events` message as sent (built without the NamedTuple: the per-token path)."""
    return ("events", events, batch, t_start, t_end)


def event_tuple(e: StepEvent, decode: tuple[int, float, float] | None = None) -> tuple:
    """One event as a plain tuple (a dataclass costs ten times as much to pickle and unpickle, on the
    path of every token); ``decode``: a finished job's (steps, time in them, span), see DecodeTimes."""
    logprobs = tuple((t.token, t.logprob, t.top, t.raw, t.top_raw) for t in e.logprobs) if e.logprobs else ()
    return (e.job_id, e.text, e.new_tokens, e.finished, e.finish_reason, e.error, decode, logprobs, e.error_kind)


def to_wire(events: list[StepEvent]) -> list[tuple]:
    return [event_tuple(e) for e in events]


def from_wire(items: list[tuple]) -> list[StepEvent]:
    return [StepEvent(job_id, text, n, finished, reason, error, None if times is None else DecodeTimes(*times),
                      tuple(TokenLogprob(*t) for t in logprobs), kind)
            for job_id, text, n, finished, reason, error, times, logprobs, kind in items]


def pipe_writer(conn: Any) -> Callable[[tuple], None]:
    """``conn.send`` without its per-call overhead (the same framing: a 4-byte big-endian length, then
    the pickle), for the model process's per-token messages."""
    fd = conn.fileno()
    pack = struct.Struct("!i").pack
    dumps = pickle.dumps
    protocol = pickle.HIGHEST_PROTOCOL

    def send(msg: tuple) -> None:
        data = dumps(msg, protocol)
        if len(data) >= 0x7FFFFFFF:  # conn.send's longer header
            conn.send(msg)
            return
        view = memoryview(pack(len(data)) + data)
        while view:
            view = view[os.write(fd, view):]

    return send
