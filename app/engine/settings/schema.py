"""The settings: one declared schema, and the typed values a model runs with.

Every setting is declared once, on its field of :class:`Settings`, with :func:`setting`: its type and
limits, its built-in default, the group the settings dialog shows it in, whether it only takes effect
when the model is (re)loaded, extra command-line spellings, and the Ollama ``params`` key that sets it.
Everything else (the defaults layer, the CLI's options, the dialog's tabs, the Ollama mapping, the
load-time list) is read from there.

Settings come in layers, each a partial :class:`Settings` (unset fields are ``None``); how they are
merged is :mod:`app.engine.settings.layers`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

log = logging.getLogger(__name__)

LayerName = Literal["default", "folder", "ollama", "model", "server", "request"]
#: Layers from lowest to highest priority.
LAYER_ORDER: tuple[LayerName, ...] = ("default", "folder", "ollama", "model", "server", "request")

CacheType = Literal["FP16", "Q8", "Q6", "Q4"]
TemplateChoice = Literal["auto", "ollama", "jinja", "custom"]
BackendChoice = Literal["auto", "transformers", "exllamav2", "exllamav3"]
#: how a model spreads over several GPUs: whole layers per GPU, or (exllamav3 only) every layer split across them
SplitMode = Literal["layers", "tensor"]
#: the cache_type values each backend takes (exllamav3 maps Q8/Q6/Q4 to 8/6/4-bit keys and values;
#: the transformers backend keeps an FP16 cache)
CACHE_TYPES_BY_BACKEND: dict[str, tuple[str, ...]] = {
    "exllamav2": ("FP16", "Q8", "Q6", "Q4"), "exllamav3": ("FP16", "Q8", "Q6", "Q4"), "transformers": ("FP16",)}
ToolFormatChoice = Literal["auto", "hermes", "qwen3_coder", "mistral", "llama3", "none"]
Group = Literal["Model & memory", "Sampling", "Prompt", "Lifecycle"]


def setting(default: Any, *, group: Group, load_time: bool = False, cli: tuple[str, ...] = (),
            ollama: str | None = None, description: str | None = None, **limits: Any) -> Any:
    """Declare a setting: a pydantic field that is ``None`` (unset) in a layer, with its metadata."""
    return Field(None, description=description, **limits, json_schema_extra={
        "default_value": default, "group": group, "load_time": load_time, "cli": list(cli), "ollama": ollama})


class Settings(BaseModel):
    """A (possibly partial) set of model settings. ``None`` means "not set in this layer"."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # model & memory
    context_length: int | None = setting(4096, group="Model & memory", load_time=True, ollama="num_ctx",
                                         cli=("--max-seq-len", "--num-ctx"), ge=16, le=1_048_576,
                                         description="Context length in tokens")
    batch_size: int | None = setting(8, group="Model & memory", load_time=True, cli=("--max-batch-size",),
                                     ge=1, le=256, description="Maximum concurrent jobs")
    cache_type: CacheType | None = setting("FP16", group="Model & memory", load_time=True,
                                           description="KV cache precision (FP16, Q8, Q6, Q4 on exllamav2 and "
                                                       "exllamav3; the CPU backend keeps FP16)")
    gpu_split: str | None = setting("auto", group="Model & memory", load_time=True,
                                    description="'auto' or comma-separated GiB per GPU, e.g. '20,24'")
    rope_scale: float | None = setting(1.0, group="Model & memory", load_time=True, gt=0, le=64,
                                       description="Linear RoPE scaling factor")
    rope_alpha: float | None = setting(1.0, group="Model & memory", load_time=True, gt=0, le=64,
                                       description="NTK RoPE alpha")
    backend: BackendChoice | None = setting("auto", group="Model & memory", load_time=True,
                                            description="Backend: auto, transformers, exllamav2 or exllamav3")
    gpu_split_mode: SplitMode | None = setting(
        "layers", group="Model & memory", load_time=True,
        description="Several GPUs: 'layers' (gpu_split: whole layers per GPU) or 'tensor' (exllamav3's "
                    "tensor-parallel mode: every layer split across the GPUs)")
    # sampling defaults
    temperature: float | None = setting(0.8, group="Sampling", ollama="temperature", ge=0, le=5,
                                        allow_inf_nan=False)
    top_k: int | None = setting(40, group="Sampling", ollama="top_k", ge=0, le=100_000)
    top_p: float | None = setting(0.9, group="Sampling", ollama="top_p", gt=0, le=1, allow_inf_nan=False)
    min_p: float | None = setting(0.0, group="Sampling", ollama="min_p", ge=0, le=1, allow_inf_nan=False)
    typical: float | None = setting(1.0, group="Sampling", ollama="typical_p", gt=0, le=1, allow_inf_nan=False)
    repetition_penalty: float | None = setting(1.0, group="Sampling", ollama="repeat_penalty", gt=0, le=10,
                                               allow_inf_nan=False)
    presence_penalty: float | None = setting(0.0, group="Sampling", ollama="presence_penalty", ge=-2, le=2,
                                             allow_inf_nan=False)
    frequency_penalty: float | None = setting(0.0, group="Sampling", ollama="frequency_penalty", ge=-2, le=2,
                                              allow_inf_nan=False)
    seed: int | None = setting(None, group="Sampling", ollama="seed", ge=0, le=2**63 - 1)
    max_tokens: int | None = setting(1024, group="Sampling", ollama="num_predict", ge=1, le=1_048_576,
                                     description="Default max new tokens")
    # prompt
    template: TemplateChoice | None = setting("auto", group="Prompt", description="Prompt template source")
    system_prompt: str | None = setting("", group="Prompt", cli=("--system",),
                                        description="System prompt used when the chat has none")
    stop: list[str] | None = setting([], group="Prompt", ollama="stop", description="Stop strings")
    custom_template: str | None = setting("", group="Prompt",
                                          description="Custom prompt template (Go or Jinja syntax)")
    tool_format: ToolFormatChoice | None = setting(
        "auto", group="Prompt", description="How the model writes tool calls (auto: read from its template; "
                                            "none: never parse them)")
    # lifecycle
    idle_unload_minutes: float | None = setting(0.0, group="Lifecycle", ge=0, le=100_000,
                                                description="Unload after idle (0: never)")

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

    @model_validator(mode="after")
    def _check_backend_fit(self) -> "Settings":
        """A multi-GPU mode the layer's own backend cannot run (across layers, and cache types: at load,
        so that a models.json written before the check stays readable)."""
        problem = backend_fit_problem(self.backend, None, self.gpu_split_mode)
        if problem:
            raise ValueError(problem)
        return self

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


@dataclass(frozen=True)
class SettingInfo:
    """What the schema declares about one setting."""

    name: str
    default: Any
    group: Group
    load_time: bool
    cli: tuple[str, ...]
    ollama: str | None
    description: str


def _declared() -> dict[str, SettingInfo]:
    out = {}
    for name, info in Settings.model_fields.items():
        extra = info.json_schema_extra
        assert isinstance(extra, dict), name
        out[name] = SettingInfo(name, extra["default_value"], extra["group"], bool(extra["load_time"]),  # type: ignore[arg-type]
                                tuple(extra["cli"]), extra["ollama"],  # type: ignore[arg-type]
                                info.description or name.replace("_", " "))
    return out


#: every setting's declaration, in the schema's order
SCHEMA: dict[str, SettingInfo] = _declared()
SETTING_NAMES: tuple[str, ...] = tuple(SCHEMA)
#: Settings that only take effect when the model is (re)loaded.
LOAD_TIME_FIELDS = frozenset(name for name, info in SCHEMA.items() if info.load_time)
#: the settings of each group, for the settings dialog's tabs
GROUPS: dict[Group, list[str]] = {}
for _info in SCHEMA.values():
    GROUPS.setdefault(_info.group, []).append(_info.name)
#: Ollama ``params`` keys -> our setting names.
OLLAMA_PARAM_MAP: dict[str, str] = {info.ollama: name for name, info in SCHEMA.items() if info.ollama}


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


def backend_fit_problem(backend: str | None, cache_type: str | None, split_mode: str | None,
                        *, explicit: bool = True) -> str | None:
    """Why ``backend`` cannot run with this cache type or multi-GPU mode, or None (None values: not set).
    With ``explicit`` False (the backend was picked by ``auto``) only the multi-GPU mode is held against it."""
    if backend is None or backend == "auto":
        return None
    if split_mode == "tensor" and backend != "exllamav3":
        return f"gpu_split_mode 'tensor' (tensor-parallel) needs the exllamav3 backend, not {backend}"
    valid = CACHE_TYPES_BY_BACKEND.get(backend, ())
    if explicit and cache_type is not None and cache_type not in valid:
        return f"cache_type {cache_type} does not fit the {backend} backend (it takes {', '.join(valid)})"
    return None


#: the built-in defaults, the lowest layer
DEFAULTS = Settings(**{name: info.default for name, info in SCHEMA.items() if info.default is not None})


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
