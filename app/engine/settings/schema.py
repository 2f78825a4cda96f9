"""One typed settings model and its layered resolution.

Settings come in layers. Resolution, highest first::

    request > server > model > ollama > folder > default

Each layer is a partial :class:`Settings` (unset fields are ``None``). :func:`resolve` merges
them and remembers, for every field, which layer supplied the value, so the settings dialog and
``python -m app models`` can say where a value comes from.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

log = logging.getLogger(__name__)

LayerName = Literal["default", "folder", "ollama", "model", "server", "request"]
#: Layers from lowest to highest priority.
LAYER_ORDER: tuple[LayerName, ...] = ("default", "folder", "ollama", "model", "server", "request")

CacheType = Literal["FP16", "Q8", "Q6", "Q4"]
TemplateChoice = Literal["auto", "ollama", "jinja", "custom"]
BackendChoice = Literal["auto", "transformers", "exllamav2"]

#: Settings that only take effect when the model is (re)loaded.
LOAD_TIME_FIELDS = frozenset(
    {"context_length", "batch_size", "cache_type", "gpu_split", "rope_scale", "rope_alpha", "backend"}
)


class Settings(BaseModel):
    """A (possibly partial) set of model settings. ``None`` means "not set in this layer"."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # model & memory
    context_length: int | None = Field(None, ge=16, le=1_048_576, description="Context length in tokens")
    batch_size: int | None = Field(None, ge=1, le=256, description="Maximum concurrent jobs")
    cache_type: CacheType | None = Field(None, description="KV cache precision")
    gpu_split: str | None = Field(None, description="'auto' or comma-separated GiB per GPU, e.g. '20,24'")
    rope_scale: float | None = Field(None, gt=0, le=64, description="Linear RoPE scaling factor")
    rope_alpha: float | None = Field(None, gt=0, le=64, description="NTK RoPE alpha")
    backend: BackendChoice | None = Field(None, description="Backend: auto, transformers or exllamav2")
    # sampling defaults
    temperature: float | None = Field(None, ge=0, le=5, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=0, le=100_000)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    min_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    typical: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    repetition_penalty: float | None = Field(None, gt=0, le=10, allow_inf_nan=False)
    presence_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    max_tokens: int | None = Field(None, ge=1, le=1_048_576, description="Default max new tokens")
    # prompt
    stop: list[str] | None = Field(None, description="Stop strings")
    system_prompt: str | None = Field(None, description="System prompt used when the chat has none")
    template: TemplateChoice | None = Field(None, description="Prompt template source")
    custom_template: str | None = Field(None, description="Custom prompt template (Go or Jinja syntax)")
    # lifecycle
    idle_unload_minutes: float | None = Field(None, ge=0, le=100_000, description="Unload after idle (0: never)")

    @field_validator("gpu_split")
    @classmethod
    def _check_split(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip()
        if value.lower() == "auto":
            return "auto"
        parse_gpu_split(value)
        return value

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if any(s == "" for s in value):
            raise ValueError("stop strings must not be empty")
        return list(dict.fromkeys(value))

    def set_fields(self) -> dict[str, Any]:
        """The fields that are set in this layer."""
        return self.model_dump(exclude_none=True)


def parse_gpu_split(value: str) -> list[float]:
    """Parse a ``'20,24'`` GPU split into GiB per GPU; raises ValueError with a readable reason."""
    parts = [p.strip() for p in value.split(",")]
    try:
        split = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"gpu_split must be 'auto' or GiB per GPU like '20,24', not {value!r}") from None
    if not split or any(not (0 <= x < 10_000) for x in split) or sum(split) <= 0:
        raise ValueError(f"gpu_split values must be non-negative GiB with a positive sum, not {value!r}")
    return split


DEFAULTS = Settings(
    context_length=4096,
    batch_size=8,
    cache_type="FP16",
    gpu_split="auto",
    rope_scale=1.0,
    rope_alpha=1.0,
    backend="auto",
    temperature=0.8,
    top_k=40,
    top_p=0.9,
    min_p=0.0,
    typical=1.0,
    repetition_penalty=1.0,
    presence_penalty=0.0,
    frequency_penalty=0.0,
    max_tokens=1024,
    stop=[],
    system_prompt="",
    template="auto",
    custom_template="",
    idle_unload_minutes=0.0,
)
SETTING_NAMES: tuple[str, ...] = tuple(Settings.model_fields)


@dataclass(frozen=True)
class ResolvedSettings:
    """Fully resolved settings plus the layer each value came from."""

    values: Mapping[str, Any]
    sources: Mapping[str, LayerName]

    def __getattr__(self, name: str) -> Any:
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None

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


def resolve(layers: Mapping[LayerName, Settings]) -> ResolvedSettings:
    """Merge layers (missing layers are empty); later layers in LAYER_ORDER win."""
    values: dict[str, Any] = {key: None for key in Settings.model_fields}
    sources: dict[str, LayerName] = {key: "default" for key in Settings.model_fields}
    for name in LAYER_ORDER:
        layer = layers.get(name)
        if layer is None:
            continue
        for key, value in layer.set_fields().items():
            values[key] = value
            sources[key] = name
    return ResolvedSettings(values=values, sources=sources)


def settings_from_mapping(data: Mapping[str, Any], what: str) -> Settings:
    """Build a Settings layer, turning pydantic's error into a readable ValueError naming ``what``."""
    try:
        return Settings(**dict(data))
    except ValidationError as exc:
        raise ValueError(f"invalid settings in {what}: {format_validation_error(exc)}") from None


def format_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err.get("loc", ())) or "value"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


#: Ollama ``params`` keys -> our setting names.
OLLAMA_PARAM_MAP: dict[str, str] = {
    "num_ctx": "context_length",
    "stop": "stop",
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "typical_p": "typical",
    "repeat_penalty": "repetition_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "seed": "seed",
    "num_predict": "max_tokens",
}


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
