"""Reading a request's JSON body, with readable 400s for what is not a JSON object."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from app.api.errors import ApiError


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
