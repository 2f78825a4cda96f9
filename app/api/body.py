"""Reading a request's JSON body and validating it against a wire model, with readable 400s."""

from __future__ import annotations

import json
import logging
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ValidationError

from app.api.errors import ApiError
from app.api.openai.protocol import UnsupportedValue
from app.engine.settings.schema import format_validation_error

log = logging.getLogger(__name__)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def read_json_body(request: web.Request) -> dict[str, Any]:
    # The body must be JSON whatever Content-Type says (curl -d sends form-urlencoded by default).
    raw = await request.read()
    if not raw.strip():
        raise ApiError(400, "The request body is empty; send a JSON object")
    try:
        text = raw.decode("utf-8")
        body = json.loads(text, parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise ApiError(400, "The request body is not valid UTF-8") from None
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"The request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object")
    return body


def parse(model: type[BaseModel], body: dict[str, Any]) -> Any:
    try:
        parsed = model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())) or None
        raise ApiError(400, f"Invalid request: {format_validation_error(exc)}", param=param) from None
    except RecursionError:
        raise ApiError(400, "Invalid request: nested too deeply") from None
    extra = set(parsed.model_extra or {})
    if extra:
        log.debug("ignoring unknown request fields: %s", sorted(extra))
    try:
        parsed.check_supported()
    except UnsupportedValue as exc:
        raise ApiError(400, str(exc), param=exc.param, code="unsupported_value") from None
    return parsed
