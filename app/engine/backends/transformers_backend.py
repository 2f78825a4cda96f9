"""HF transformers backend (CPU, or CUDA when present) with continuous batching.

Each job keeps its own KV cache. Every step prefills one prompt chunk of at most one waiting job and
runs one batched decode forward pass over all running jobs: their caches are left-padded to the
longest one, with an attention mask and explicit positions, and the new key/value of each job is
appended to its own cache afterwards. Jobs join at the next step and leave when they finish.
"""

from __future__ import annotations

import gc
import inspect
import logging
import threading
from collections import Counter, deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from app.engine.backends.contract import BackendBase, BackendLoadError, LoadCancelled, ProgressFn, StepFailed
from app.engine.backends.sampling import make_generator, sample_with_probs
from app.engine.events import BackendJob, StepEvent, TokenLogprob
from app.engine.backends.text_stream import TextStream
from app.engine.catalog.tokenizer import EncoderSpec, FolderTokenizer, TokenizerError
from app.engine.backends.gpu_common import free_gpu_memory
from app.engine.backends.slots import SHORT_SLOTS, ShortSlots, is_short
from app.engine.constraints.grammars import GrammarError
from app.engine.constraints.masks import ConstraintCompiler

log = logging.getLogger(__name__)
PREFILL_CHUNK = 256


class KVBuffer:
    """A growable per-layer key/value store for one job: [heads, capacity, head_dim] per layer."""

    def __init__(self) -> None:
        self.keys: list[Any] = []
        self.values: list[Any] = []
        self.length = 0

    def append(self, layer_keys: Sequence[Any], layer_values: Sequence[Any]) -> None:
        """Append new positions; each tensor is [heads, n, head_dim]."""
        import torch

        n = layer_keys[0].shape[1]
        if not self.keys:
            cap = max(64, n * 2)
            for k, v in zip(layer_keys, layer_values):
                self.keys.append(torch.empty((k.shape[0], cap, k.shape[2]), dtype=k.dtype, device=k.device))
                self.values.append(torch.empty((v.shape[0], cap, v.shape[2]), dtype=v.dtype, device=v.device))
        cap = self.keys[0].shape[1]
        if self.length + n > cap:
            new_cap = max(cap * 2, self.length + n)
            for i in range(len(self.keys)):
                for store in (self.keys, self.values):
                    old = store[i]
                    grown = torch.empty((old.shape[0], new_cap, old.shape[2]), dtype=old.dtype, device=old.device)
                    grown[:, : self.length] = old[:, : self.length]
                    store[i] = grown
        for i, (k, v) in enumerate(zip(layer_keys, layer_values)):
            self.keys[i][:, self.length:self.length + n] = k
            self.values[i][:, self.length:self.length + n] = v
        self.length += n


@dataclass
class _Job:
    job: BackendJob
    stream: TextStream
    generator: Any
    kv: KVBuffer = field(default_factory=KVBuffer)
    prefilled: int = 0
    generated: int = 0
    last_token: int | None = None
    history: list[int] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    #: the job's grammar state (JobConstraint) when it has one; a Future while it is compiled
    constraint: Any = None


class TransformersBackend(BackendBase):
    name = "transformers"
    batching = "continuous"

    def __init__(self, model_dir: str | Path, *, context_length: int, max_batch: int,
                 device: str | None = None, rope_scale: float = 1.0) -> None:
        self.model_dir = Path(model_dir)
        self.context_length = context_length
        self.max_batch = max_batch
        self._device_name = device
        self._rope_scale = rope_scale
        self._model: Any = None
        self._tok: FolderTokenizer | None = None
        self._pending: deque[_Job] = deque()
        self._running: list[_Job] = []
        #: long jobs beyond max_batch wait here; the batch has SHORT_SLOTS more slots for short jobs
        self._slots: ShortSlots[_Job] = ShortSlots(max_batch)
        self._passed_over = False  # the last prefill chunk went to a short job ahead of the oldest
        self._cache_kw = "past_key_values"
        self.last_step_batch = 0
        self.vocab_size: int | None = None
        #: events of the jobs that did not fail in a step that raised StepFailed
        self._failed_events: list[StepEvent] = []
        self._constraints: ConstraintCompiler | None = None

    # -- lifecycle ----------------------------------------------------------
    @staticmethod
    def warm_up(progress: ProgressFn) -> None:
        """The imports a load needs (seconds), for a model process started ahead of time."""
        progress(0.0, "importing torch and transformers")
        import torch  # noqa: F401
        from transformers import AutoModelForCausalLM  # noqa: F401

    def load(self, progress: ProgressFn, cancel: threading.Event) -> None:
        progress(0.0, "importing torch and transformers")
        try:
            import torch
            from transformers import AutoModelForCausalLM
        except ImportError as exc:
            raise BackendLoadError(
                f"the transformers backend needs torch and transformers ({exc}); "
                "install the 'transformers' extra") from None
        if cancel.is_set():
            raise LoadCancelled("load cancelled")
        progress(0.2, "loading tokenizer")
        try:
            self._tok = FolderTokenizer(self.model_dir)
        except TokenizerError as exc:
            raise BackendLoadError(str(exc)) from None
        device = self._device_name or ("cuda" if torch.cuda.is_available() else "cpu")
        progress(0.3, f"loading weights on {device}")
        try:
            kwargs: dict[str, Any] = {"dtype": torch.float16 if device.startswith("cuda") else torch.float32}
            if self._rope_scale != 1.0:
                kwargs["rope_scaling"] = {"rope_type": "linear", "factor": self._rope_scale}
            model = AutoModelForCausalLM.from_pretrained(str(self.model_dir), **kwargs)
            model.to(device).eval()
        except MemoryError:
            raise BackendLoadError(f"out of memory loading {self.model_dir}") from None
        except Exception as exc:
            if "out of memory" in str(exc).lower():
                gc.collect()
                raise BackendLoadError(f"out of memory loading {self.model_dir}: {exc}") from None
            raise BackendLoadError(f"cannot load {self.model_dir}: {exc}") from None
        if cancel.is_set():
            del model
            gc.collect()
            raise LoadCancelled("load cancelled")
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._device = torch.device(device)
        self._model = model
        self.vocab_size = int(model.config.vocab_size)
        self._constraints = ConstraintCompiler(self.model_dir / "tokenizer.json", self.vocab_size, self._tok.eos_ids)
        progress(1.0, "loaded")

    def unload(self) -> None:
        self._pending.clear()
        self._running.clear()
        self._slots.clear()
        self._model = None
        free_gpu_memory()

    def memory_used(self) -> dict[str, int]:
        if self._model is None:
            return {}
        total = sum(p.numel() * p.element_size() for p in self._model.parameters())
        total += sum(sum(k.numel() * k.element_size() * 2 for k in j.kv.keys) for j in self._running)
        return {str(self._device): total}

    # -- tokens -------------------------------------------------------------
    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        assert self._tok is not None
        return self._tok.encode(text, add_bos=add_bos)

    def encoder_spec(self) -> EncoderSpec | None:
        return None if self._tok is None else self._tok.encoder_spec()

    def decode(self, ids: Sequence[int]) -> str:
        assert self._tok is not None
        return self._tok.decode(ids)

    def eos_token_ids(self) -> set[int]:
        assert self._tok is not None
        return set(self._tok.eos_ids)

    @property
    def tokenizer(self) -> FolderTokenizer:
        assert self._tok is not None
        return self._tok

    # -- jobs ---------------------------------------------------------------
    def submit(self, job: BackendJob) -> None:
        assert self._tok is not None and self._constraints is not None
        entry = _Job(job=job, stream=TextStream(self._tok, job.stop_strings),
                     generator=make_generator(job.sampling, self._device))
        if job.grammar is not None:  # compiled beside the stepping thread while the prompt is prefilled
            entry.constraint = self._constraints.compile_soon(job.grammar)
        if self._slots.admit(job.job_id, job.max_new_tokens, entry, self._live_ids(), len(job.prompt_ids)):
            self._pending.append(entry)

    def _live_ids(self) -> set[int]:
        return {j.job.job_id for j in self._pending} | {j.job.job_id for j in self._running}

    def cancel(self, job_id: int) -> None:
        self._slots.cancel(job_id)
        self._pending = deque(j for j in self._pending if j.job.job_id != job_id)
        self._running = [j for j in self._running if j.job.job_id != job_id]

    def has_work(self) -> bool:
        return bool(self._pending or self._running or self._slots)

    def take_surviving_events(self) -> list[StepEvent]:
        """After StepFailed: the events of the jobs the failure did not affect."""
        events, self._failed_events = self._failed_events, []
        return events

    def active_jobs(self) -> int:
        return len(self._pending) + len(self._running) + len(self._slots)

    def step(self) -> list[StepEvent]:
        import torch

        events: list[StepEvent] = []
        failed: list[int] = []
        errors: list[str] = []
        with torch.inference_mode():
            decoding = [j for j in self._running if j.last_token is not None]
            self.last_step_batch = len(decoding)
            if decoding:
                try:
                    self._decode(decoding, events)
                except Exception as exc:  # the batch failed: only its jobs end, the rest go on
                    log.exception("decode step failed for %d jobs", len(decoding))
                    ids = {j.job.job_id for j in decoding}
                    self._running = [j for j in self._running if j.job.job_id not in ids]
                    events[:] = [e for e in events if e.job_id not in ids]
                    failed += sorted(ids)
                    errors.append(f"{type(exc).__name__}: {exc}")
            if self._slots:  # long jobs held while max_batch long ones ran: those that may start now
                self._pending.extend(self._slots.release(self._live_ids()))
            if self._pending and len(self._running) < self.max_batch + SHORT_SLOTS:
                job = self._next_prefill()
                try:
                    self._prefill_chunk(job, events)
                except Exception as exc:
                    log.exception("prefill failed for job %d", job.job.job_id)
                    self.cancel(job.job.job_id)
                    failed.append(job.job.job_id)
                    errors.append(f"{type(exc).__name__}: {exc}")
        if failed:
            self._failed_events = events
            raise StepFailed(failed, "; ".join(errors))
        return events

    # -- internals ----------------------------------------------------------
    def _forward(self, input_ids: Any, position_ids: Any, attention_mask: Any, cache: Any) -> Any:
        return self._model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                           use_cache=True, **{self._cache_kw: cache}).logits

    def _make_cache(self, jobs: list[_Job], pad_to: int) -> Any:
        """A DynamicCache holding the jobs' caches left-padded to ``pad_to`` positions."""
        import torch
        from transformers import DynamicCache

        cache = DynamicCache()
        n_layers = len(jobs[0].kv.keys)
        for layer in range(n_layers):
            ref = jobs[0].kv.keys[layer]
            shape = (len(jobs), ref.shape[0], pad_to, ref.shape[2])
            keys = torch.zeros(shape, dtype=ref.dtype, device=ref.device)
            values = torch.zeros(shape, dtype=ref.dtype, device=ref.device)
            for b, j in enumerate(jobs):
                n = j.kv.length
                keys[b, :, pad_to - n:] = j.kv.keys[layer][:, :n]
                values[b, :, pad_to - n:] = j.kv.values[layer][:, :n]
            cache.update(keys, values, layer)
        return cache

    @staticmethod
    def _layer_kv(cache: Any, layer: int) -> tuple[Any, Any]:
        if hasattr(cache, "layers"):
            return cache.layers[layer].keys, cache.layers[layer].values
        return cache.key_cache[layer], cache.value_cache[layer]

    def _next_prefill(self) -> _Job:
        """The pending job whose prompt gets this step's chunk. In arrival order a completion waited for
        every chunk of a long prompt ahead of it (16 steps behind a 4,000-token chat), so the oldest short
        job (an editor's completion, what the kept slot is for) goes first while no short job runs; but
        never twice in a row ahead of the oldest, so that an editor sending a completion every keystroke
        slows a chat's prefill to half its pace at most instead of stopping it."""
        oldest = self._pending[0]
        if self._passed_over or sum(is_short(j.job.max_new_tokens) for j in self._running) >= SHORT_SLOTS:
            self._passed_over = False
            return oldest
        job = next((j for j in self._pending if is_short(j.job.max_new_tokens)), oldest)
        self._passed_over = job is not oldest
        return job

    def _prefill_chunk(self, job: _Job, events: list[StepEvent]) -> None:
        import torch
        from transformers import DynamicCache

        ids = job.job.prompt_ids
        start = job.prefilled
        chunk = ids[start:start + PREFILL_CHUNK]
        cache = self._make_cache([job], job.kv.length) if job.kv.length else DynamicCache()
        input_ids = torch.tensor([chunk], device=self._device)
        positions = torch.arange(start, start + len(chunk), device=self._device).unsqueeze(0)
        mask = torch.ones((1, start + len(chunk)), dtype=torch.long, device=self._device)
        logits = self._forward(input_ids, positions, mask, cache)
        n_layers = len(getattr(cache, "layers", [])) or len(cache.key_cache)
        new_k, new_v = [], []
        for layer in range(n_layers):
            k, v = self._layer_kv(cache, layer)
            new_k.append(k[0, :, start:start + len(chunk)])
            new_v.append(v[0, :, start:start + len(chunk)])
        job.kv.append(new_k, new_v)
        job.prefilled += len(chunk)
        if job.prefilled < len(ids):
            return
        self._pending = deque(j for j in self._pending if j is not job)
        self._running.append(job)
        job.history = list(ids)
        self._accept(job, logits[0, -1], events)

    def _decode(self, jobs: list[_Job], events: list[StepEvent]) -> None:
        import torch

        longest = max(j.kv.length for j in jobs)
        cache = self._make_cache(jobs, longest)
        input_ids = torch.tensor([[j.last_token] for j in jobs], device=self._device)
        positions = torch.tensor([[j.kv.length] for j in jobs], device=self._device)
        mask = torch.zeros((len(jobs), longest + 1), dtype=torch.long, device=self._device)
        for b, j in enumerate(jobs):
            mask[b, longest - j.kv.length:] = 1
        logits = self._forward(input_ids, positions, mask, cache)
        n_layers = len(jobs[0].kv.keys)
        layer_kv = [self._layer_kv(cache, layer) for layer in range(n_layers)]
        for b, j in enumerate(jobs):
            j.kv.append([k[b, :, -1:] for k, _ in layer_kv], [v[b, :, -1:] for _, v in layer_kv])
            self._accept(j, logits[b, -1], events)

    def _accept(self, job: _Job, logits: Any, events: list[StepEvent]) -> None:
        """Sample one token for ``job`` and turn it into an event."""
        if isinstance(job.constraint, Future):
            try:
                job.constraint = job.constraint.result()
            except Exception as exc:  # the grammar engine's reason ends this job only
                kind = "request" if isinstance(exc, GrammarError) else None  # a 400, not a server fault
                events.append(StepEvent(job.job.job_id, "", 0, True, "error", f"constraint: {exc}", error_kind=kind))
                self._running.remove(job)
                return
        want = job.job.logprobs is not None  # the mask: this row only, the batch's other jobs sample freely
        token, probs = sample_with_probs(logits, job.job.sampling, job.history, job.counts, job.generator,
                                         want_probs=want, mask=None if job.constraint is None else job.constraint.mask)
        logprobs = (self._logprob(token, probs, job.job.logprobs or 0),) if want else ()
        if job.constraint is not None and not job.constraint.accept(token):
            events.append(StepEvent(job.job.job_id, job.stream.finish(), 1, True, "error",
                                    f"constraint: {job.constraint.error}"))
            self._running.remove(job)
            return
        job.generated += 1
        job.history.append(token)
        job.counts[token] += 1
        job.last_token = token
        if token in job.job.stop_token_ids:
            events.append(StepEvent(job.job.job_id, job.stream.finish(), 1, True, "stop", logprobs=logprobs))
            self._running.remove(job)
            return
        text, stopped = job.stream.push(token)
        if stopped or (job.constraint is not None and job.constraint.done):
            text += "" if stopped else job.stream.finish()
            events.append(StepEvent(job.job.job_id, text, 1, True, "stop", logprobs=logprobs))
            self._running.remove(job)
            return
        out_of_room = job.kv.length + 1 >= self.context_length
        if job.generated >= job.job.max_new_tokens or out_of_room:
            events.append(StepEvent(job.job.job_id, text + job.stream.finish(), 1, True, "length", logprobs=logprobs))
            self._running.remove(job)
            return
        events.append(StepEvent(job.job.job_id, text, 1, logprobs=logprobs))

    def _logprob(self, token: int, probs: Any, top: int) -> TokenLogprob:
        """``token``'s log-probability under ``probs`` and the ``top`` most likely tokens there."""
        import torch

        logp = torch.where(probs > 0, torch.log(probs.clamp_min(1e-38)), torch.full_like(probs, -9999.0))
        best = torch.topk(logp, min(top, logp.shape[0])) if top else None
        alternatives = () if best is None else tuple(
            (self.decode([int(i)]), float(v)) for v, i in zip(best.values, best.indices))
        return TokenLogprob(self.decode([token]), float(logp[token]), alternatives)
