"""The one async facade the API and the UI use to reach the engine.

``submit_chat`` / ``submit_completion`` resolve the model's settings, make sure the model is loaded
(on demand), build and tokenize the prompt off the event loop, check it against the context, and
return a :class:`JobHandle`: an async iterator of :class:`TextDelta` events ending with one
:class:`JobFinished`. Every error that can be known before generation starts is raised from the
``submit_*`` call, so the API can answer it before a stream opens.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

import psutil

from app.engine.backends.factory import create_backend, folder_settings
from app.engine.events import BackendJob, JobEvent, JobFinished, SamplingParams, TextDelta
from app.engine.observability.metrics import EngineMetrics
from app.engine.serving.manager import LoadFailure, ModelLoadError, ModelManager, ModelState, Resident
from app.engine.prompting.builders import ChatInput, PromptError, message_text
from app.engine.prompting.select import make_prompt_builder
from app.engine.catalog.registry import ModelEntry, Registry, RegistryError, display_name, normalize_name
from app.engine.settings.schema import ResolvedSettings, Settings, SettingsLayers, settings_from_ollama

log = logging.getLogger(__name__)
SAMPLE_SECONDS = 1.0
#: prompts shorter than this (characters) are rendered and tokenized on the event loop itself
INLINE_CHARS = 4096

__all__ = ["Engine", "EngineError", "InvalidRequest", "ModelNotFound", "ModelLoadError", "JobHandle",
           "ChatRequest", "CompletionRequest", "ModelInfoView"]


class EngineError(Exception):
    """Base of the errors the engine raises to its callers."""


class ModelNotFound(EngineError):
    pass


class InvalidRequest(EngineError):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class ChatRequest:
    model: str
    messages: list[dict[str, Any]]
    settings: Settings = field(default_factory=Settings)
    tools: list[dict[str, Any]] | None = None
    stream: bool = False
    logit_bias: dict[int, float] = field(default_factory=dict)


@dataclass
class CompletionRequest:
    model: str
    prompt: str | list[int]
    settings: Settings = field(default_factory=Settings)
    suffix: str | None = None
    stream: bool = False
    logit_bias: dict[int, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelInfoView:
    """A registered model as the API and the UI list it."""

    name: str
    model_dir: str
    created: int
    context_length: int | None
    format: str | None
    state: str  # "unloaded", "loading", "ready", "unloading"


class JobHandle:
    """The events of one job. Iterate it once; leaving the iteration early cancels the job."""

    def __init__(self, engine: "Engine", resident: Resident, job: BackendJob, model: str) -> None:
        self._engine = engine
        self._resident = resident
        self.job = job
        self._queue: asyncio.Queue[JobEvent] | None = None
        self.model = model
        self.prompt_tokens = len(job.prompt_ids)
        self.finished: JobFinished | None = None
        self._released = False
        #: seconds from the request reaching the engine to the job entering the runner
        self.prepare_s = 0.0

    def start_early(self) -> None:
        """Hand the job over now if nothing here competes with the event loop for it (a model process
        steps on its own), so that the first step overlaps the response headers."""
        runner = self._resident.runner
        if runner is not None and runner.steps_elsewhere:
            self.start()

    def start(self) -> None:
        """Hand the job to the runner. Done on first iteration, so that the event loop has finished
        its own work for the request (headers written) before the GPU thread starts competing with
        it for the GIL."""
        if self._queue is not None:
            return
        runner = self._resident.runner
        if runner is None:
            raise ModelLoadError(f"model {self.model} is not loaded any more")
        self._queue = runner.submit(self.job)

    async def events(self) -> AsyncIterator[JobEvent]:
        try:
            self.start()
            assert self._queue is not None
            first_text = True
            while True:
                event = await self._queue.get()
                if isinstance(event, JobFinished):
                    self.finished = event
                    self._release()
                    yield event
                    return
                yield event
                if first_text and isinstance(event, TextDelta):
                    # the consumer asked for more: it has sent the first text; the GPU thread goes on
                    first_text = False
                    runner = self._resident.runner
                    if runner is not None:
                        runner.first_text_sent(self.job.job_id)
        finally:
            self.cancel()

    def __aiter__(self) -> AsyncIterator[JobEvent]:
        return self.events()

    async def result(self) -> JobFinished:
        """Wait for the end (for non-streaming jobs, the final event carries the whole text)."""
        async for event in self.events():
            if isinstance(event, JobFinished):
                return event
        raise EngineError("job ended without a result")  # pragma: no cover - events() always finishes

    def cancel(self) -> None:
        """Cancel the job if it is still running (idempotent)."""
        if self.finished is None and not self._released:
            runner = self._resident.runner
            if runner is not None and self._queue is not None:
                runner.cancel(self.job.job_id)
            self._release()

    def _release(self) -> None:
        if not self._released:
            self._released = True
            self._engine.manager.release(self._resident)


class Engine:
    def __init__(self, registry: Registry, *, server_settings: Settings | None = None, max_loaded: int = 1,
                 backend_factory: Callable[[ModelEntry, ResolvedSettings], Any] = create_backend) -> None:
        self.registry = registry
        self.server_settings = server_settings or Settings()
        self.metrics = EngineMetrics()
        self._backend_factory = backend_factory
        self._listeners: list[Callable[[], None]] = []
        self._sample_listeners: list[Callable[[], None]] = []
        self._sampler: asyncio.Task | None = None
        self.manager = ModelManager(self._make_backend, self.metrics, max_loaded=max_loaded,
                                    on_change=self._notify)

    # -- models -------------------------------------------------------------------
    def _entry(self, name: str) -> tuple[str, ModelEntry]:
        try:
            found = self.registry.find(name)
        except RegistryError as exc:
            raise ModelNotFound(str(exc)) from None
        if found is None:
            raise ModelNotFound(f"The model '{name}' does not exist")
        return found

    def layers(self, name: str, request: Settings | None = None) -> SettingsLayers:
        _, entry = self._entry(name)
        ollama = (settings_from_ollama(entry.ollama.params, entry.ollama.system)
                  if entry.ollama is not None else Settings())
        return SettingsLayers(folder=folder_settings(entry.model_dir), ollama=ollama, model=entry.settings,
                              server=self.server_settings, request=request or Settings())

    def resolve(self, name: str, request: Settings | None = None) -> ResolvedSettings:
        return self.layers(name, request).resolve()

    def _make_backend(self, key: str) -> tuple[Any, float]:
        _, entry = self._entry(key)
        resolved = self.resolve(key)
        return self._backend_factory(entry, resolved), float(resolved.idle_unload_minutes or 0)

    def list_models(self) -> list[ModelInfoView]:
        try:
            entries = self.registry.entries()
        except RegistryError as exc:
            log.warning("%s", exc)
            entries = {}
        states = {s.name: s.state for s in self.manager.states()}
        views = []
        for key, entry in sorted(entries.items()):
            created = _timestamp(entry.created_at)
            ctx = entry.settings.context_length or entry.info.get("context_length")
            views.append(ModelInfoView(display_name(key), entry.model_dir, created, ctx, entry.info.get("format"),
                                       states.get(key, "unloaded")))
        return views

    def model_states(self) -> list[ModelState]:
        return self.manager.states()

    async def load(self, name: str) -> None:
        key, _ = self._entry(name)
        await self.manager.load(key)

    async def unload(self, name: str) -> bool:
        key = normalize_name(name)
        return await self.manager.unload(key)

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (on the event loop) when a model starts/finishes loading or unloading."""
        self._listeners.append(callback)

    def remove_listener(self, callback: Callable[[], None]) -> None:
        """Stop calling ``callback`` (a no-op when it was not added)."""
        if callback in self._listeners:
            self._listeners.remove(callback)

    def _notify(self) -> None:
        for callback in list(self._listeners):
            callback()

    async def start(self) -> None:
        """Start the once-a-second metrics sampler (plots and /metrics read its history)."""
        if self._sampler is None:
            self._sampler = asyncio.get_running_loop().create_task(self._sample_forever())

    async def _sample_forever(self) -> None:
        while True:
            await asyncio.sleep(SAMPLE_SECONDS)
            self.metrics.sample(self.memory_snapshot())
            for callback in list(self._sample_listeners):
                callback()

    def add_sample_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` after each metrics sample (once a second)."""
        self._sample_listeners.append(callback)

    def remove_sample_listener(self, callback: Callable[[], None]) -> None:
        """Stop calling ``callback`` after each sample (a no-op when it was not added)."""
        if callback in self._sample_listeners:
            self._sample_listeners.remove(callback)

    def memory_snapshot(self) -> dict[str, int]:
        """GPU memory reserved per device (or the backend's own figure) and the process RSS."""
        memory: dict[str, int] = {}
        for state in self.manager.states():
            resident = self.manager.resident(state.name)
            if resident is not None and state.state == "ready":
                try:
                    memory.update(resident.backend.memory_used())
                except Exception:  # a backend mid-unload may fail to report; skip this sample
                    log.debug("memory_used failed", exc_info=True)
        torch = sys.modules.get("torch")  # never import torch just to look
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            for i in range(torch.cuda.device_count()):
                memory.setdefault(f"cuda:{i}", int(torch.cuda.memory_reserved(i)))
                memory.setdefault(f"cuda:{i}:allocated", int(torch.cuda.memory_allocated(i)))
        memory["rss"] = psutil.Process().memory_info().rss
        return memory

    def load_failures(self) -> list[LoadFailure]:
        """Each model's last failed load (on demand, from the tray or /admin/load), until it loads."""
        return self.manager.load_failures()

    @property
    def last_load_failure(self) -> LoadFailure | None:
        """The newest failed load, until any model loads."""
        return self.manager.last_failure

    def spare_processes(self) -> list[dict[str, Any]]:
        """Model processes started ahead of a load, with their imports done (see SparePool)."""
        from app.engine.backends.model_process.spares import SPARES

        return SPARES.describe()

    async def close(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            await asyncio.gather(self._sampler, return_exceptions=True)
            self._sampler = None
        await self.manager.close()
        from app.engine.backends.model_process.spares import SPARES

        await asyncio.to_thread(SPARES.close)

    # -- generation -------------------------------------------------------------------
    async def submit_chat(self, request: ChatRequest) -> JobHandle:
        started = time.perf_counter()
        key, entry = self._entry(request.model)
        resolved = self.resolve(key, request.settings)
        try:
            builder = make_prompt_builder(entry, resolved)
            chat = ChatInput(request.messages, request.tools)
            size = sum(len(message_text(m.get("content"))) for m in request.messages if isinstance(m, dict))
            prompt = await _off_loop_if_large(size + (INLINE_CHARS if request.tools else 0), builder.build, chat)
        except PromptError as exc:
            raise InvalidRequest(str(exc), "messages") from None
        stops = [*resolved.stop, *(s for s in builder.stop_strings if s not in resolved.stop)]
        return await self._submit(key, resolved, request.settings, prompt, stops, request.stream,
                                  request.logit_bias, add_bos=False, started=started)

    async def submit_completion(self, request: CompletionRequest) -> JobHandle:
        started = time.perf_counter()
        key, entry = self._entry(request.model)
        resolved = self.resolve(key, request.settings)
        prompt = request.prompt
        if request.suffix and isinstance(prompt, str):
            from app.engine.prompting.select import fill_in_middle_prompt

            fim = fill_in_middle_prompt(entry, resolved, request.prompt, request.suffix)
            if fim is None:
                log.info("model %s has no fill-in-the-middle form: suffix ignored", key)
            else:
                prompt = fim
        return await self._submit(key, resolved, request.settings, prompt, list(resolved.stop), request.stream,
                                  request.logit_bias, add_bos=True, started=started)

    async def _submit(self, key: str, resolved: ResolvedSettings, request_layer: Settings, prompt: str | list[int],
                      stops: list[str], stream: bool, logit_bias: dict[int, float], *, add_bos: bool,
                      started: float) -> JobHandle:
        resident = await self.manager.acquire(key)
        dead = getattr(resident.backend, "dead", None)
        if dead:  # its model process crashed or was killed: load it again
            self.manager.release(resident)
            log.warning("model %s: %s; loading it again", key, dead)
            await self.manager.unload(key)
            resident = await self.manager.acquire(key)
        try:
            backend = resident.backend
            if isinstance(prompt, list):
                ids = list(prompt)
            else:
                # a backend in another process may have to be asked (encode_blocks): never on the loop
                size = INLINE_CHARS if getattr(backend, "encode_blocks", False) else len(prompt)
                ids = await _off_loop_if_large(size, backend.encode, prompt, add_bos=add_bos)
            if not ids:
                raise InvalidRequest("the prompt is empty", "prompt")
            ctx = backend.context_length
            if len(ids) >= ctx:
                raise InvalidRequest(
                    f"This model's maximum context length is {ctx} tokens, but the prompt has {len(ids)} tokens",
                    "messages")
            room = ctx - len(ids)
            # Clients routinely ask for more tokens than a local model's context has left (Continue
            # sends 4096 to a 2k model): the request is clamped to the room left, and generation ends
            # with finish_reason "length" when the context is full. Only a prompt that does not fit
            # at all is refused.
            wanted = request_layer.max_tokens if request_layer.max_tokens is not None else resolved.max_tokens
            max_new = min(int(wanted or room), room)
            vocab = getattr(backend, "vocab_size", None)
            bad = [t for t in logit_bias if t < 0 or (vocab is not None and t >= vocab)]
            if bad:
                raise InvalidRequest(f"logit_bias has token ids outside the vocabulary: {bad[:5]}", "logit_bias")
            if isinstance(prompt, list):
                bad = [t for t in ids if t < 0 or (vocab is not None and t >= vocab)]
                if bad:
                    raise InvalidRequest(f"the prompt has token ids outside the vocabulary: {bad[:5]}", "prompt")
            sampling = SamplingParams(
                temperature=float(resolved.temperature), top_k=int(resolved.top_k), top_p=float(resolved.top_p),
                min_p=float(resolved.min_p), typical=float(resolved.typical),
                repetition_penalty=float(resolved.repetition_penalty),
                presence_penalty=float(resolved.presence_penalty),
                frequency_penalty=float(resolved.frequency_penalty), logit_bias=dict(logit_bias),
                seed=resolved.seed,
            )
            job = BackendJob(prompt_ids=ids, max_new_tokens=max_new, sampling=sampling, stop_strings=stops,
                             stop_token_ids=backend.eos_token_ids(), stream=stream)
            if resident.runner is None:
                raise ModelLoadError(f"model {key} is unloading; retry")
        except BaseException:
            self.manager.release(resident)
            raise
        handle = JobHandle(self, resident, job, display_name(key))
        handle.prepare_s = time.perf_counter() - started
        return handle


async def _off_loop_if_large(size: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``fn`` on a worker thread when ``size`` (characters of input) makes it slow enough to stall
    the event loop; small inputs run inline (a thread hop costs more than rendering or tokenizing them)."""
    if size < INLINE_CHARS:
        return fn(*args, **kwargs)
    return await asyncio.to_thread(fn, *args, **kwargs)


def _timestamp(iso: str) -> int:
    from datetime import datetime

    try:
        return int(datetime.fromisoformat(iso).timestamp())
    except (ValueError, TypeError):
        return 0


__all__ += ["TextDelta", "JobFinished"]
