"""Data that crosses the engine's boundary: generation parameters, jobs and their events."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Callable, Literal

FinishReason = Literal["stop", "length", "cancelled", "error"]
#: whose fault a failed job is: "request" (e.g. a grammar the backend refuses: a 400), or "server"
ErrorKind = Literal["request", "server"]
_ids = itertools.count(1)


@dataclass(frozen=True)
class SamplingParams:
    """Resolved sampler settings for one job. ``temperature == 0`` means greedy."""

    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    typical: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability under the distribution it was sampled from (after the
    sampling settings), and the most likely alternatives there as (token text, log-probability)."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()
    #: the token's own bytes, where the backend can give them (a byte-fallback token's text is U+FFFD)
    raw: bytes | None = None
    #: the same for each of ``top`` (empty: not known)
    top_raw: tuple[bytes, ...] = ()


def token_logprobs(ids: list[int], probs: list[float], top_ids: list[list[int]], top_probs: list[list[float]],
                   decode: Callable[[list[int]], str],
                   raw: Callable[[int], bytes] | None = None) -> tuple[TokenLogprob, ...]:
    """Log-probabilities from a backend's probabilities of the tokens drawn (and of the top ones);
    ``raw``: a token id's bytes, where the backend's tokenizer can map ids to bytes."""
    def log(p: float) -> float:
        return math.log(p) if p > 0 else -9999.0

    return tuple(TokenLogprob(decode([t]), log(p), tuple((decode([a]), log(q)) for a, q in zip(alts, qs)),
                              None if raw is None else raw(t), () if raw is None else tuple(raw(a) for a in alts))
                 for t, p, alts, qs in zip(ids, probs, top_ids or [[]] * len(ids), top_probs or [[]] * len(ids)))


@dataclass
class BackendJob:
    """One generation job as a backend sees it."""

    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams
    stop_strings: list[str]
    stop_token_ids: set[int]
    stream: bool = True
    job_id: int = field(default_factory=lambda: next(_ids))
    #: a grammar the output must follow (llguidance grammar text; compiled by the backend), or None
    grammar: str | None = None
    #: report each token's log-probability and this many alternatives (None: no log-probabilities)
    logprobs: int | None = None


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class DecodeTimes:
    """How a job's steps after its first went in a model process (its own clock), for diagnostics."""

    steps: int
    #: time inside the backend's step() over those steps
    in_steps_s: float
    #: from the end of the job's first step to the end of its last
    span_s: float


@dataclass(frozen=True)
class StepEvent:
    """What a backend reports for one job after a step: new text and tokens, and whether it ended."""

    job_id: int
    text: str = ""
    new_tokens: int = 0
    finished: bool = False
    finish_reason: FinishReason | None = None
    error: str | None = None
    #: on a finished job's last event, from backends in a model process
    decode_times: DecodeTimes | None = None
    #: one per new token, for jobs that asked for log-probabilities
    logprobs: tuple[TokenLogprob, ...] = ()
    #: on a job that ended with an error: whose fault it is (None: the server's)
    error_kind: ErrorKind | None = None


@dataclass(frozen=True)
class TextDelta:
    """A piece of generated text (only sent to streaming jobs)."""

    text: str
    #: the log-probabilities of the tokens that gave this text (jobs that asked for them)
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class JobFinished:
    """The last event of every job. ``text`` is the whole output for non-streaming jobs."""

    finish_reason: FinishReason
    usage: Usage
    text: str
    ttft_s: float | None
    duration_s: float
    error: str | None = None
    #: log-probabilities not sent with a TextDelta (all of them for non-streaming jobs)
    logprobs: tuple[TokenLogprob, ...] = ()
    #: with ``finish_reason`` "error": whose fault it is ("request": answered as a 400; None: the server's)
    error_kind: ErrorKind | None = None


JobEvent = TextDelta | JobFinished
