"""Typed application keys (aiohttp's AppKey) for what the handlers need."""

from __future__ import annotations

from aiohttp import web

from app.engine.facade import Engine

ENGINE = web.AppKey("engine", Engine)
API_KEY = web.AppKey("api_key", str)
