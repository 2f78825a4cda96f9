"""The one async facade the API and the UI use to reach the engine.

``submit_chat`` / ``submit_completion`` take the model's prepared settings and prompt builder
(:mod:`app.engine.prepared`), make sure the model is loaded (on demand), build and tokenize the
prompt (off the event loop when it is large), check it against the context, and return a
:class:`~app.engine.serving.jobs.JobHandle`: an async iterator of :class:`TextDelta` events ending with
one :class:`JobFinished`. Every error that can be known before generation starts is raised from the
``submit_*`` call (an :class:`~app.engine.errors.EngineError` carrying its OpenAI code), so the API can
answer it before a stream opens.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from dataclasses import replace
from datetime import datetime
from typing import Any, Callable

import psutil

from app.engine.backends.contract import Backend, TensorCensus
from app.engine.backends.factory import create_backend
from app.engine.runtime.service import RUNTIMES, RuntimeService  # noqa: F401 - the UI's runtime installs (first use)
from app.engine.catalog.registry import ModelEntry, Registry, RegistryError, display_name, normalize_name
from app.engine.errors import ContextLengthExceeded, EngineError, InvalidRequest, ModelLoadError, ModelNotFound
from app.engine.events import BackendJob, JobFinished, SamplingParams, TextDelta
from app.engine.observability.metrics import EngineMetrics, RequestRecord
from app.engine.prepared import PreparedModel, PreparedModels
from app.engine.prompting.builders import ChatInput, PromptError
from app.engine.prompting.select import make_prompt_builder
from app.engine.requests import ChatRequest, CompletionRequest, Message, ModelInfoView
from app.engine.serving.jobs import JobHandle
from app.engine.serving.manager import LoadFailure, ModelManager, ModelState, Resident
from app.engine.settings.layers import EffectiveSettings, ResolvedSettings, SettingsLayers
from app.engine.settings.schema import Settings
from app.engine.constraints.requested import chat_rules, completion_rules
from app.engine.tools import ParsedToolCall, ToolCallStream  # noqa: F401 - the API layers' tool-call parser
from app.engine.tools.formats import format_for_prepared
from app.engine.tools.validate import check_tools  # noqa: F401 - the API layers' check of a request's tools

log = logging.getLogger(__name__)
SAMPLE_SECONDS = 1.0
#: prompts shorter than this (characters) are rendered and tokenized on the event loop itself
INLINE_CHARS = 4096
#: no tokenizer packs more text than this into one token: a longer prompt is refused before it is counted
MAX_CHARS_PER_TOKEN = 64
#: idle minutes standing for Ollama's keep_alive 0: the idle timer fires as soon as the last job ends
UNLOAD_WHEN_IDLE = 1e-9
BackendFactory = Callable[[ModelEntry, EffectiveSettings], Backend]

__all__ = ["Engine", "EngineError", "InvalidRequest", "ContextLengthExceeded", "ModelNotFound", "ModelLoadError",
           "JobHandle", "ChatRequest", "CompletionRequest", "Message", "ModelInfoView", "TextDelta", "JobFinished"]


class Engine:
    def __init__(self, registry: Registry, *, server_settings: Settings | None = None, max_loaded: int = 1,
                 backend_factory: BackendFactory = create_backend) -> None:
        self.registry = registry
        #: the server-wide settings layer; replace it (do not change it in place) to apply new ones
        self.server_settings = server_settings or Settings()
        self.metrics = EngineMetrics()
        self.prepared = PreparedModels(registry, lambda: self.server_settings)
        self._backend_factory = backend_factory
        self._listeners: list[Callable[[], None]] = []
        self._sample_listeners: list[Callable[[], None]] = []
        self._sampler: asyncio.Task | None = None
        self.manager = ModelManager(self._make_backend, self.metrics, max_loaded=max_loaded,
                                    on_change=self._notify)

    # -- models -------------------------------------------------------------------
    def model_entry(self, name: str) -> ModelEntry:
        """A registered model's entry (folder, its own settings, Ollama metadata); raises ModelNotFound."""
        return self.prepared.get(name).entry

    def layers(self, name: str, request: Settings | None = None, *, model: Settings | None = None) -> SettingsLayers:
        """The model's settings layers; ``model`` stands in for its saved settings (the dialog's edits)."""
        return _layers_of(self.prepared.get(name), request, model)

    def save_model_settings(self, name: str, settings: Settings) -> None:
        """Replace what the user set for ``name`` in models.json (raises RegistryError when it cannot)."""
        self.registry.set_settings(self.prepared.get(name).key, settings)

    def prompt_preview(self, name: str, chat: ChatInput, *, model: Settings | None = None) -> str:
        """The prompt ``chat`` becomes for ``name`` (with ``model`` as its own settings when given);
        raises InvalidRequest when the template cannot be rendered."""
        prepared = self.prepared.get(name)
        settings = _layers_of(prepared, None, model).resolve().effective
        try:  # not kept: each edit in the dialog is another template
            return make_prompt_builder(prepared.entry, settings, prepared.special).build(chat)
        except PromptError as exc:
            raise InvalidRequest(str(exc), "messages") from None

    def resolve(self, name: str, request: Settings | None = None) -> ResolvedSettings:
        return self.prepared.get(name).resolve(request)

    def _make_backend(self, key: str) -> tuple[Backend, float]:
        prepared = self.prepared.get(key)
        settings = prepared.base.effective
        return self._backend_factory(prepared.entry, settings), settings.idle_unload_minutes

    def list_models(self) -> list[ModelInfoView]:
        try:
            entries = self.registry.entries()
        except RegistryError as exc:
            log.warning("%s", exc)
            entries = {}
        states = {s.name: s.state for s in self.manager.states()}
        views = []
        for key, entry in sorted(entries.items()):
            ctx = entry.settings.context_length or entry.info.get("context_length")
            views.append(ModelInfoView(display_name(key), entry.model_dir, _timestamp(entry.created_at), ctx,
                                       entry.info.get("format"), states.get(key, "unloaded")))
        return views

    def model_states(self) -> list[ModelState]:
        return self.manager.states()

    async def load(self, name: str) -> None:
        await self.manager.load(self.prepared.get(name).key)

    async def unload(self, name: str) -> bool:
        return await self.manager.unload(normalize_name(name))

    def keep_alive(self, name: str, seconds: float | None) -> None:
        """How long ``name`` stays loaded once its last running job ends (Ollama's ``keep_alive``):
        None its idle-unload setting, 0 unload as soon as it is idle, negative never unload when idle.
        Applies from now on (the next request without one goes back to the setting); call it while a
        job of the request holds the model, or after a load."""
        prepared = self.prepared.get(name)
        if seconds is None:
            minutes = prepared.base.effective.idle_unload_minutes
        else:
            minutes = UNLOAD_WHEN_IDLE if seconds == 0 else max(seconds, 0.0) / 60
        self.manager.set_idle_minutes(prepared.key, minutes)

    def unload_deadline(self, name: str) -> float | None:
        """When (``time.time()``) an idle ``name`` will be unloaded if nothing uses it (None: never, or not
        loaded)."""
        return self.manager.unload_deadline(normalize_name(name))

    def tool_format(self, name: str) -> str | None:
        """The format ``name`` writes tool calls in (its ``tool_format`` setting or its template's), or
        None when its setting is ``none`` (tool calls are left as text)."""
        return format_for_prepared(self.prepared.get(name), Settings())

    def has_fill_in_middle(self, name: str) -> bool:
        """Whether a completion with a suffix is a real fill-in-the-middle prompt for ``name``."""
        try:
            return self.prepared.get(name).fill_in_middle() is not None
        except PromptError:
            return False

    # -- listeners ------------------------------------------------------------------
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

    def add_sample_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` after each metrics sample (once a second)."""
        self._sample_listeners.append(callback)

    def remove_sample_listener(self, callback: Callable[[], None]) -> None:
        """Stop calling ``callback`` after each sample (a no-op when it was not added)."""
        if callback in self._sample_listeners:
            self._sample_listeners.remove(callback)

    # -- lifecycle and observation ------------------------------------------------------
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

    def recent_requests(self) -> list[RequestRecord]:
        """The most recent finished requests, newest last, with where their time went."""
        return self.metrics.recent_requests()

    async def cuda_tensor_census(self) -> dict[str, Any]:
        """The largest live CUDA tensors of this process and of each loaded model's process."""
        from app.engine.observability.diagnostics import cuda_tensor_census

        out: dict[str, Any] = {"server": await asyncio.to_thread(cuda_tensor_census)}
        for state in self.manager.states():
            resident = self.manager.resident(state.name)
            if resident is None or state.state != "ready" or not isinstance(resident.backend, TensorCensus):
                continue
            try:
                out[state.name] = await asyncio.to_thread(resident.backend.cuda_tensor_census)
            except Exception as exc:  # a model process that just ended: say so, do not fail the report
                out[state.name] = {"error": str(exc)}
        return out

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
        prepared = self.prepared.get(request.model)
        settings = prepared.resolve(request.settings).effective
        builder = prepared.builder(settings)
        chat = ChatInput([m.as_template_dict() for m in request.messages], request.tools)
        size = sum(len(m.content) for m in request.messages)
        _refuse_far_beyond_context(size, settings, "messages")
        size += INLINE_CHARS if request.tools else 0
        try:
            prompt = await _off_loop_if_large(size, builder.build, chat)
        except PromptError as exc:
            raise InvalidRequest(str(exc), "messages") from None
        stops = [*settings.stop, *(s for s in builder.stop_strings if s not in settings.stop)]
        rules = await chat_rules(prepared, request)  # the tool-call format and the grammar, if any
        return rules.apply(await self._submit(prepared, settings, request.settings, prompt, stops, request.stream,
                                              request.logit_bias, add_bos=False, started=started, param="messages"))

    async def submit_completion(self, request: CompletionRequest) -> JobHandle:
        started = time.perf_counter()
        prepared = self.prepared.get(request.model)
        settings = prepared.resolve(request.settings).effective
        prompt = request.prompt
        _refuse_far_beyond_context(len(prompt) + len(request.suffix or ""), settings, "prompt",
                                   tokens=isinstance(prompt, list))
        if request.suffix and isinstance(prompt, str):
            try:
                fim = prepared.fill_in_middle()
                if fim is None:
                    log.info("model %s has no fill-in-the-middle form: suffix ignored", prepared.key)
                else:
                    prompt = fim(prompt, request.suffix)
            except PromptError as exc:  # the Ollama template does not compile or render
                raise InvalidRequest(str(exc), "suffix") from None
        rules = await completion_rules(prepared, request)
        return rules.apply(await self._submit(prepared, settings, request.settings, prompt, list(settings.stop),
                                              request.stream, request.logit_bias, add_bos=True, started=started,
                                              param="prompt"))

    async def _acquire(self, key: str) -> Resident:
        resident = await self.manager.acquire(key)
        gone = resident.backend.dead
        if gone:  # its model process crashed or was killed: load it again
            self.manager.release(resident)
            log.warning("model %s: %s; loading it again", key, gone)
            await self.manager.unload(key)
            resident = await self.manager.acquire(key)
        return resident

    async def _submit(self, prepared: PreparedModel, settings: EffectiveSettings, request_layer: Settings,
                      prompt: str | list[int], stops: list[str], stream: bool, logit_bias: dict[int, float], *,
                      add_bos: bool, started: float, param: str) -> JobHandle:
        resident = await self._acquire(prepared.key)
        try:
            backend = resident.backend
            ids = await _prompt_ids(backend, prompt, add_bos)
            max_new = _max_new_tokens(backend, ids, settings, request_layer, param)
            _check_token_ids(backend, ids if isinstance(prompt, list) else [], logit_bias)
            job = BackendJob(prompt_ids=ids, max_new_tokens=max_new, sampling=sampling_params(settings, logit_bias),
                             stop_strings=stops, stop_token_ids=backend.eos_token_ids(), stream=stream)
            if resident.runner is None:
                raise ModelLoadError(f"model {prepared.key} is unloading; retry")
        except BaseException:
            self.manager.release(resident)
            raise
        handle = JobHandle(self.manager, resident, job, display_name(prepared.key))
        handle.prepare_s = time.perf_counter() - started
        return handle


def _layers_of(prepared: PreparedModel, request: Settings | None, model: Settings | None) -> SettingsLayers:
    layers = replace(prepared.layers)  # a copy: the prepared model keeps its own
    if model is not None:
        layers.model = model
    return layers if request is None else layers.with_request(request)


def sampling_params(settings: EffectiveSettings, logit_bias: dict[int, float]) -> SamplingParams:
    return SamplingParams(
        temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p, min_p=settings.min_p,
        typical=settings.typical, repetition_penalty=settings.repetition_penalty,
        presence_penalty=settings.presence_penalty, frequency_penalty=settings.frequency_penalty,
        logit_bias=dict(logit_bias), seed=settings.seed)


async def _prompt_ids(backend: Backend, prompt: str | list[int], add_bos: bool) -> list[int]:
    if isinstance(prompt, list):
        ids = list(prompt)
    else:
        # a backend in another process may have to be asked (encode_blocks): never on the loop
        size = INLINE_CHARS if backend.encode_blocks else len(prompt)
        ids = await _off_loop_if_large(size, backend.encode, prompt, add_bos=add_bos)
    if not ids:
        raise InvalidRequest("the prompt is empty", "prompt")
    return ids


def _refuse_far_beyond_context(size: int, settings: EffectiveSettings, param: str, *, tokens: bool = False) -> None:
    """Refuse at once a prompt that cannot fit whatever its tokens: rendering and counting the tokens of
    megabytes of text holds the GIL for seconds, and every other client waits meanwhile."""
    ctx = settings.context_length
    if size > ctx * (1 if tokens else MAX_CHARS_PER_TOKEN):
        what = f"{size} tokens" if tokens else f"{size} characters (more than {MAX_CHARS_PER_TOKEN} per token)"
        raise ContextLengthExceeded(f"This model's maximum context length is {ctx} tokens, but the prompt has "
                                    f"{what}", param)


def _max_new_tokens(backend: Backend, ids: list[int], settings: EffectiveSettings, request: Settings,
                    param: str) -> int:
    ctx = backend.context_length
    if len(ids) >= ctx:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {ctx} tokens, but the prompt has {len(ids)} tokens", param)
    room = ctx - len(ids)
    # Clients routinely ask for more tokens than a local model's context has left (Continue sends 4096
    # to a 2k model): the request is clamped to the room left, and generation ends with finish_reason
    # "length" when the context is full. Only a prompt that does not fit at all is refused.
    wanted = request.max_tokens if request.max_tokens is not None else settings.max_tokens
    return min(wanted or room, room)


def _check_token_ids(backend: Backend, prompt_ids: list[int], logit_bias: dict[int, float]) -> None:
    vocab = backend.vocab_size
    bad = [t for t in logit_bias if t < 0 or (vocab is not None and t >= vocab)]
    if bad:
        raise InvalidRequest(f"logit_bias has token ids outside the vocabulary: {bad[:5]}", "logit_bias")
    bad = [t for t in prompt_ids if t < 0 or (vocab is not None and t >= vocab)]
    if bad:
        raise InvalidRequest(f"the prompt has token ids outside the vocabulary: {bad[:5]}", "prompt")


async def _off_loop_if_large(size: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``fn`` on a worker thread when ``size`` (characters of input) makes it slow enough to stall
    the event loop; small inputs run inline (a thread hop costs more than rendering or tokenizing them)."""
    if size < INLINE_CHARS:
        return fn(*args, **kwargs)
    return await asyncio.to_thread(fn, *args, **kwargs)


def _timestamp(iso: str) -> int:
    try:
        return int(datetime.fromisoformat(iso).timestamp())
    except (ValueError, TypeError):
        return 0
