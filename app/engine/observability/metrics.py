"""Engine metrics in one place: prometheus-client collectors for /metrics and a rolling history for plots."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

HISTORY_SECONDS = 30 * 60


@dataclass(frozen=True)
class RequestRecord:
    """One finished request, for the status window's table."""

    model: str
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float | None
    tokens_per_s: float | None
    finish_reason: str
    finished_at: float
    #: where the time to first text went: waiting for the GPU thread, the backend's first step(s),
    #: and the hand-off of the first text to the client (None where a phase did not happen)
    queued_s: float | None = None
    first_step_s: float | None = None
    handoff_s: float | None = None
    #: backends in a model process: from taking the job to the start of the step that gave the first
    #: text (the pipe, the process waking, earlier steps), that step, and its events' way back
    to_model_step_s: float | None = None
    model_step_s: float | None = None
    from_model_s: float | None = None
    #: the model process's side of decoding (steps after the first): how many, the time inside them,
    #: and from the end of the first to the end of the last (the rest is its loop between steps)
    model_decode_steps: int | None = None
    model_decode_in_steps_s: float | None = None
    model_decode_span_s: float | None = None


@dataclass(frozen=True)
class MetricsSample:
    """One second of engine activity."""

    t: float
    running: int
    waiting: int
    prompt_tps: float
    generation_tps: float
    memory: dict[str, int] = field(default_factory=dict)


class EngineMetrics:
    """Thread-safe: the runner thread records, the event loop and /metrics read."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.running = Gauge("exllama_tray_requests_running", "Jobs in the engine (prefill or decode)", registry=r)
        self.waiting = Gauge("exllama_tray_requests_waiting", "Requests waiting for a model or a batch slot",
                             registry=r)
        self.prompt_tokens = Counter("exllama_tray_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("exllama_tray_generation_tokens", "Tokens generated", registry=r)
        self.requests = Counter("exllama_tray_requests", "Finished requests", ["finish_reason"], registry=r)
        self.steps = Counter("exllama_tray_engine_steps", "Engine steps run", registry=r)
        self.batched_steps = Counter("exllama_tray_engine_batched_steps",
                                     "Engine steps that decoded more than one job at once", registry=r)
        self.max_batch = Gauge("exllama_tray_engine_max_batch", "Largest number of jobs decoded in one step",
                               registry=r)
        self.ttft = Histogram("exllama_tray_time_to_first_token_seconds", "Time to first token", registry=r,
                              buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.token_latency = Histogram("exllama_tray_time_per_output_token_seconds",
                                       "Time between output tokens", registry=r,
                                       buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1))
        self.memory = Gauge("exllama_tray_memory_bytes",
                            "Memory in use: GPU memory reserved per device (cuda:N), process RSS (rss)",
                            ["device"], registry=r)
        self._lock = threading.Lock()
        self._history: deque[MetricsSample] = deque(maxlen=HISTORY_SECONDS)
        self._recent: deque[RequestRecord] = deque(maxlen=200)
        self._window_prompt = 0
        self._window_gen = 0
        self._window_start = time.monotonic()
        self._max_batch_seen = 0
        self._memory_devices: set[str] = set()

    # -- recording (any thread) ----------------------------------------------
    def record_step(self, batch: int) -> None:
        self.steps.inc()
        if batch > 1:
            self.batched_steps.inc()
        if batch > self._max_batch_seen:
            self._max_batch_seen = batch
            self.max_batch.set(batch)

    def record_prompt(self, tokens: int) -> None:
        self.prompt_tokens.inc(tokens)
        with self._lock:
            self._window_prompt += tokens

    def record_tokens(self, tokens: int) -> None:
        self.generation_tokens.inc(tokens)
        with self._lock:
            self._window_gen += tokens

    def record_finished(self, record: RequestRecord) -> None:
        self.requests.labels(record.finish_reason).inc()
        if record.ttft_s is not None:
            self.ttft.observe(record.ttft_s)
        with self._lock:
            self._recent.append(record)

    # -- reading -------------------------------------------------------------
    @property
    def max_batch_seen(self) -> int:
        return self._max_batch_seen

    def batched_step_count(self) -> float:
        return self.batched_steps._value.get()  # noqa: SLF001 - prometheus-client has no public getter

    def sample(self, memory: dict[str, int] | None = None) -> MetricsSample:
        """Close the current window and append one sample to the bounded history."""
        now = time.monotonic()
        with self._lock:
            dt = max(now - self._window_start, 1e-6)
            sample = MetricsSample(t=time.time(), running=int(self.running._value.get()),  # noqa: SLF001
                                   waiting=int(self.waiting._value.get()),  # noqa: SLF001
                                   prompt_tps=self._window_prompt / dt, generation_tps=self._window_gen / dt,
                                   memory=dict(memory or {}))
            self._window_prompt = self._window_gen = 0
            self._window_start = now
            self._history.append(sample)
        for device in self._memory_devices - set(sample.memory):
            self.memory.labels(device).set(0)  # its model was unloaded (or its model process ended)
        for device, value in sample.memory.items():
            self.memory.labels(device).set(value)
        self._memory_devices |= set(sample.memory)
        return sample

    def history(self, seconds: float = HISTORY_SECONDS) -> list[MetricsSample]:
        cutoff = time.time() - seconds
        with self._lock:
            return [s for s in self._history if s.t >= cutoff]

    def recent_requests(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._recent)
