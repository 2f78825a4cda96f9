"""Settings layering: the one place where a model's layers are built and merged.

Resolution, highest first::

    request > server > model > ollama > folder > default

:func:`layers_for` builds a model's layers (its folder's config.json / generation_config.json, the
Ollama metadata saved with it, what the user set for it, the server's settings, the request) and
:meth:`SettingsLayers.resolve` merges them, remembering for every field which layer supplied the value,
so the settings dialog and ``python -m app models`` can say where a value comes from. The result's
:attr:`ResolvedSettings.effective` is the typed set of values a model runs with.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from pydantic import ValidationError

from app.engine.settings.schema import (
    DEFAULTS, LAYER_ORDER, OLLAMA_PARAM_MAP, SETTING_NAMES, BackendChoice, CacheType, LayerName, Settings,
    SplitMode, TemplateChoice, format_validation_error,
)

if TYPE_CHECKING:
    from app.engine.catalog.registry import ModelEntry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EffectiveSettings:
    """Every setting's value after layering, typed (only ``seed`` may be unset)."""

    context_length: int
    batch_size: int
    cache_type: CacheType
    gpu_split: str
    rope_scale: float
    rope_alpha: float
    backend: BackendChoice
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    typical: float
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    seed: int | None
    max_tokens: int
    template: TemplateChoice
    system_prompt: str
    stop: tuple[str, ...]
    custom_template: str
    idle_unload_minutes: float
    gpu_split_mode: SplitMode = "layers"


@dataclass(frozen=True)
class ResolvedSettings:
    """Fully resolved settings plus the layer each value came from."""

    values: Mapping[str, Any]
    sources: Mapping[str, LayerName]

    @cached_property
    def effective(self) -> EffectiveSettings:
        v = self.values
        return EffectiveSettings(
            int(v["context_length"]), int(v["batch_size"]), v["cache_type"], str(v["gpu_split"]),
            float(v["rope_scale"]), float(v["rope_alpha"]), v["backend"], float(v["temperature"]), int(v["top_k"]),
            float(v["top_p"]), float(v["min_p"]), float(v["typical"]), float(v["repetition_penalty"]),
            float(v["presence_penalty"]), float(v["frequency_penalty"]),
            None if v["seed"] is None else int(v["seed"]), int(v["max_tokens"]), v["template"],
            str(v["system_prompt"]), tuple(v["stop"]), str(v["custom_template"]), float(v["idle_unload_minutes"]),
            gpu_split_mode=v["gpu_split_mode"])

    def source(self, name: str) -> LayerName:
        return self.sources[name]

    def as_settings(self) -> Settings:
        return Settings(**self.values)


@dataclass
class SettingsLayers:
    """The layers for one model; ``request`` and ``server`` are filled in per request / per process."""

    folder: Settings = field(default_factory=Settings)
    ollama: Settings = field(default_factory=Settings)
    model: Settings = field(default_factory=Settings)
    server: Settings = field(default_factory=Settings)
    request: Settings = field(default_factory=Settings)

    def resolve(self) -> ResolvedSettings:
        return resolve(
            {"default": DEFAULTS, "folder": self.folder, "ollama": self.ollama, "model": self.model,
             "server": self.server, "request": self.request}
        )

    def with_request(self, request: Settings) -> "SettingsLayers":
        return SettingsLayers(self.folder, self.ollama, self.model, self.server, request)


def resolve(layers: Mapping[LayerName, Settings]) -> ResolvedSettings:
    """Merge layers (missing layers are empty); later layers in LAYER_ORDER win."""
    values: dict[str, Any] = {key: None for key in SETTING_NAMES}
    sources: dict[str, LayerName] = {key: "default" for key in SETTING_NAMES}
    for name in LAYER_ORDER:
        layer = layers.get(name)
        if layer is None:
            continue
        for key, value in layer.set_fields().items():
            values[key] = value
            sources[key] = name
    return ResolvedSettings(values=values, sources=sources)


def layers_for(entry: "ModelEntry", server: Settings | None = None, request: Settings | None = None,
               *, model: Settings | None = None) -> SettingsLayers:
    """A registered model's layers; ``model`` replaces the entry's own settings (the dialog's edits)."""
    ollama = (settings_from_ollama(entry.ollama.params, entry.ollama.system)
              if entry.ollama is not None else Settings())
    return SettingsLayers(folder=folder_settings(entry.model_dir), ollama=ollama,
                          model=entry.settings if model is None else model, server=server or Settings(),
                          request=request or Settings())


def settings_from_ollama(params: Mapping[str, Any], system: str | None = None) -> Settings:
    """Map Ollama's saved ``params`` (and system prompt) to a settings layer; unknown keys are logged."""
    data: dict[str, Any] = {}
    for key, value in params.items():
        target = OLLAMA_PARAM_MAP.get(key)
        if target is None:
            log.debug("ignoring Ollama parameter %s", key)
            continue
        if target == "stop" and isinstance(value, str):
            value = [value]
        if target == "max_tokens" and isinstance(value, int) and value <= 0:
            continue  # Ollama's -1 / -2 mean "unlimited"
        data[target] = value
    if system:
        data["system_prompt"] = system
    layer = Settings()
    for key, value in data.items():
        try:
            setattr(layer, key, value)
        except ValidationError as exc:
            log.warning("ignoring Ollama parameter %s=%r: %s", key, value, format_validation_error(exc))
    return layer


_GENERATION_KEYS = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
                    "repetition_penalty": "repetition_penalty", "typical_p": "typical", "min_p": "min_p"}


def folder_settings(model_dir: str) -> Settings:
    """config.json / generation_config.json as a settings layer (read again only when they change)."""
    path = Path(model_dir)
    stamp = 0
    for name in ("config.json", "generation_config.json"):
        try:
            stamp = max(stamp, (path / name).stat().st_mtime_ns)
        except OSError:
            pass
    return _folder_settings(str(path), stamp).model_copy()


@lru_cache(maxsize=64)
def _folder_settings(model_dir: str, _stamp: int) -> Settings:
    from app.engine.catalog.tokenizer import read_json

    path = Path(model_dir)
    layer = Settings()
    ctx = read_json(path / "config.json").get("max_position_embeddings")
    if isinstance(ctx, int) and ctx >= 16:
        layer.context_length = ctx
    gen = read_json(path / "generation_config.json")
    for key, target in _GENERATION_KEYS.items():
        if key in gen:
            try:
                setattr(layer, target, gen[key])
            except ValidationError:
                log.debug("ignoring %s=%r from generation_config.json", key, gen[key])
    return layer
