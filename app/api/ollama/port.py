"""Also listening on Ollama's own port (11434), so that clients which assume it work unconfigured; never
where Ollama itself (or anything speaking its API) already answers."""

from __future__ import annotations

import asyncio
import logging

import aiohttp

log = logging.getLogger(__name__)
OLLAMA_PORT = 11434
PROBE_TIMEOUT_S = 1.0


async def ollama_version_at(host: str, port: int, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """The version that whatever answers ``GET /api/version`` on ``host:port`` reports as Ollama, or None
    when nothing there speaks Ollama's API (nothing listening, or something else)."""
    address = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host.strip("[]")
    url = f"http://{'[' + address + ']' if ':' in address else address}:{port}/api/version"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
            async with session.get(url) as resp:
                if resp.status != 200:
                    return None
                body = await resp.json(content_type=None)
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
        return None
    version = body.get("version") if isinstance(body, dict) else None
    return version if isinstance(version, str) else None


def ollama_running_message(port: int, version: str) -> str:
    return (f"not listening on Ollama's port {port} too: Ollama {version} (or another server speaking its "
            f"API) already answers there; stop it, or turn the 'Ollama port' server setting or --ollama-port off")
