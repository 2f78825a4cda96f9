"""What the engine knows of a registered model before any request: built once, not per request.

A :class:`PreparedModel` holds a model's registry entry, its settings layers and their resolution
(without a request), its prompt builders (compiled templates, one per template choice) and its
fill-in-the-middle form. :class:`PreparedModels` keeps one per model and builds it again only when
the registry entry changes (models.json re-read with other contents) or one of the folder's files it
was built from changes (by modification time and size, looked at most once every
:data:`FOLDER_CHECK_S`: five stat calls cost more than the rest of a request's preparation), or the
server's settings are replaced.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from app.engine.catalog.registry import ModelEntry, Registry, RegistryError
from app.engine.catalog.tokenizer import SpecialTokens, read_special_tokens
from app.engine.errors import InvalidRequest, ModelNotFound
from app.engine.prompting.builders import PromptBuilder, PromptError
from app.engine.prompting.select import FillInMiddle, fill_in_middle_form, make_prompt_builder
from app.engine.settings.layers import EffectiveSettings, ResolvedSettings, SettingsLayers, layers_for
from app.engine.settings.schema import Settings

log = logging.getLogger(__name__)
#: the folder's files a prepared model is built from
FOLDER_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "chat_template.jinja",
                "tokenizer.json")
FOLDER_CHECK_S = 1.0
#: prompt builders kept per model (one per template choice and system prompt in use)
MAX_BUILDERS = 8
_UNSET = object()


def folder_stamp(model_dir: str) -> tuple:
    """Modification time and size of each file a prepared model reads (None for a missing one)."""
    out = []
    folder = Path(model_dir)
    for name in FOLDER_FILES:
        try:
            st = (folder / name).stat()
            out.append((st.st_mtime_ns, st.st_size))
        except OSError:
            out.append(None)
    return tuple(out)


@dataclass
class PreparedModel:
    key: str
    entry: ModelEntry
    #: the layers below the request's
    layers: SettingsLayers
    #: their resolution (a request that sets nothing gets this one)
    base: ResolvedSettings
    special: SpecialTokens
    stamp: tuple
    #: when the folder's files were last looked at (time.monotonic)
    checked: float = 0.0
    _builders: dict[tuple, PromptBuilder] = field(default_factory=dict)
    _fim: object = _UNSET
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def resolve(self, request: Settings | None = None) -> ResolvedSettings:
        if request is None or not request.set_fields():
            return self.base
        return self.layers.with_request(request).resolve()

    def builder(self, settings: EffectiveSettings) -> PromptBuilder:
        """The prompt builder for these settings (compiled once per template choice)."""
        key = (settings.template, settings.custom_template, settings.system_prompt)
        builder = self._builders.get(key)
        if builder is None:
            try:
                builder = make_prompt_builder(self.entry, settings, self.special)
            except PromptError as exc:
                raise InvalidRequest(str(exc), "messages") from None
            with self._lock:
                if len(self._builders) >= MAX_BUILDERS:  # a few template choices at most in practice
                    self._builders.pop(next(iter(self._builders)))
                self._builders[key] = builder
        return builder

    def fill_in_middle(self) -> FillInMiddle | None:
        """The model's fill-in-the-middle form, or None (looked up once: it reads tokenizer.json)."""
        if self._fim is _UNSET:
            self._fim = fill_in_middle_form(self.entry)
        return self._fim  # type: ignore[return-value]


class PreparedModels:
    """One :class:`PreparedModel` per registered model, kept while nothing it came from changes."""

    def __init__(self, registry: Registry, server_settings: Callable[[], Settings]) -> None:
        self._registry = registry
        self._server = server_settings
        self._cache: dict[str, PreparedModel] = {}
        #: how many times a model was (re)built: for tests and diagnostics
        self.builds = 0

    def get(self, name: str) -> PreparedModel:
        try:
            found = self._registry.find(name)
        except RegistryError as exc:
            raise ModelNotFound(str(exc)) from None
        if found is None:
            raise ModelNotFound(f"The model '{name}' does not exist")
        key, entry = found
        server = self._server()
        prepared = self._cache.get(key)
        now = time.monotonic()
        stamp = None
        if prepared is not None and prepared.entry is entry and prepared.layers.server is server:
            if now - prepared.checked < FOLDER_CHECK_S:
                return prepared
            stamp = folder_stamp(entry.model_dir)
            if prepared.stamp == stamp:
                prepared.checked = now
                return prepared
        if stamp is None:
            stamp = folder_stamp(entry.model_dir)  # before reading: a change meanwhile shows next time
        layers = layers_for(entry, server)
        prepared = PreparedModel(key, entry, layers, layers.resolve(), read_special_tokens(Path(entry.model_dir)),
                                 stamp, now)
        self._cache[key] = prepared
        self.builds += 1
        log.debug("prepared model %s", key)
        return prepared
