"""Ollama's request ``options`` and ``keep_alive`` as this app's settings.

``options`` become the request layer of the settings (the same layering as the OpenAI side:
request > server > model > Ollama metadata > folder > defaults), through the Ollama keys the
settings schema declares (``num_predict`` -> ``max_tokens``, ``repeat_penalty`` ->
``repetition_penalty``, ...). Options this app has no use for (``num_gpu``, ``num_thread``,
``mirostat``, ...) are ignored, as Ollama ignores the ones its runner does not know; a known option
of the wrong type or out of range is a 400.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

from pydantic import ValidationError

from app.api.errors import ApiError
from app.engine.settings.schema import OLLAMA_PARAM_MAP, Settings, format_validation_error

log = logging.getLogger(__name__)

#: what Ollama's num_predict -1 (no limit) and -2 (fill the context) become: the engine clamps a request
#: to the room the context has left
UNLIMITED_TOKENS = 1_048_576
#: load-time options: the model process is not reloaded per request (set them in the model's settings)
LOAD_TIME_OPTIONS = frozenset({"num_ctx", "num_batch", "num_gpu", "main_gpu", "low_vram", "use_mmap",
                               "use_mlock", "num_thread", "numa", "f16_kv", "vocab_only"})
_INT_OPTIONS = frozenset({"num_predict", "top_k", "seed", "num_ctx"})
_FLOAT_OPTIONS = frozenset({"temperature", "top_p", "min_p", "typical_p", "repeat_penalty", "presence_penalty",
                            "frequency_penalty"})
#: a keep_alive this long (about 31 years) or longer means "keep loaded"
MAX_KEEP_ALIVE_S = 1e9
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_keep_alive(value: Any) -> float | None:
    """``keep_alive`` in seconds: a number of seconds or a Go duration ("5m", "1h30m", "-1m"); None when
    not given. Negative means "keep loaded", as Ollama reads it."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ApiError(400, "keep_alive must be a number of seconds or a duration such as \"5m\"")
    try:
        seconds = _parse_duration(value) if isinstance(value, str) else float(value)
    except OverflowError:
        seconds = math.inf
    if math.isnan(seconds):
        raise ApiError(400, "keep_alive must be a number of seconds or a duration such as \"5m\"")
    return -1.0 if abs(seconds) >= MAX_KEEP_ALIVE_S else seconds  # beyond any clock: kept loaded


def _parse_duration(text: str) -> float:
    s = text.strip()
    sign = -1.0 if s.startswith("-") else 1.0
    body = s.lstrip("+-")
    try:  # a number in a string: seconds (Ollama would refuse it for its missing unit)
        seconds = float(body)
        if math.isfinite(seconds):
            return sign * seconds
    except ValueError:
        pass
    total, pos = 0.0, 0
    for match in _PART.finditer(body):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if not body or pos != len(body):
        raise ApiError(400, f"keep_alive: invalid duration {text[:40]!r} (use seconds or e.g. \"5m\", \"1h30m\")")
    return sign * total


def options_to_settings(options: dict[str, Any] | None) -> Settings:
    """The request's settings layer from Ollama ``options``; a bad value is a 400 naming it."""
    data: dict[str, Any] = {}
    for key, value in (options or {}).items():
        target = OLLAMA_PARAM_MAP.get(key)
        if value is None or (target is None and key not in LOAD_TIME_OPTIONS):
            continue
        _check_type(key, value)  # a load-time option of the wrong type (num_ctx "big") is a 400 too
        if key in LOAD_TIME_OPTIONS:
            log.debug("option %s is a load-time setting; set it in the model's settings", key)
            continue
        data.update(_mapped(key, target, value))
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ApiError(400, f"invalid options: {_option_names(format_validation_error(exc))}") from None


def _check_type(key: str, value: Any) -> None:
    if key in _INT_OPTIONS and (isinstance(value, bool) or not isinstance(value, (int, float))
                                or (isinstance(value, float) and not value.is_integer())):
        raise ApiError(400, f"option {key} must be an integer")
    if key in _FLOAT_OPTIONS and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ApiError(400, f"option {key} must be a number")
    if key in _FLOAT_OPTIONS and not _finite(value):
        raise ApiError(400, f"option {key} must be a finite number")
    if key == "stop" and not (isinstance(value, str) or
                              (isinstance(value, list) and all(isinstance(s, str) for s in value))):
        raise ApiError(400, "option stop must be a string or a list of strings")


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer beyond any float
        return False


def _mapped(key: str, target: str, value: Any) -> dict[str, Any]:
    """One option as settings fields, with Ollama's special values."""
    if key == "num_predict":
        value = int(value)
        if value < 0:  # -1: no limit, -2: fill the context
            return {target: UNLIMITED_TOKENS}
        return {target: value} if value > 0 else {}
    if key == "seed":
        value = int(value)
        return {target: value % (2**63)} if value >= 0 else {}  # a negative seed: random, as unset
    if key == "top_k":
        return {target: int(value)}
    if key == "top_p" and value == 0:  # "only the most likely token"
        return {"top_k": 1}
    if key == "stop":
        stops = [value] if isinstance(value, str) else value
        if len(stops) > 64:
            raise ApiError(400, "option stop: at most 64 stop strings")
        stops = [s for s in stops if s]
        return {target: stops} if stops else {}
    return {target: value}


_BACK = {name: key for key, name in OLLAMA_PARAM_MAP.items()}


def _option_names(message: str) -> str:
    """A settings validation message with Ollama's option names (typical -> typical_p, ...)."""
    for name, key in _BACK.items():
        message = re.sub(rf"\b{name}\b", key, message)
    return message
