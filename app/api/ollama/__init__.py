"""Ollama's native API (``/api/...``) on the same listener as the OpenAI one: a second translation onto
the engine facade, knowing nothing of the OpenAI side."""

from __future__ import annotations

from aiohttp import web

from app.api.ollama import chat, errors, generate, models
from app.api.ollama.errors import ollama_error_middleware

#: every route of the Ollama API, for the app factory
ROUTE_TABLES: tuple[web.RouteTableDef, ...] = (models.routes, chat.routes, generate.routes, errors.routes)

__all__ = ["ROUTE_TABLES", "ollama_error_middleware"]
