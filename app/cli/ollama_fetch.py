"""Fetch Ollama metadata from the command line, with a progress line on stderr."""

from __future__ import annotations

import asyncio
import sys

from app.engine.catalog.ollama_client import OllamaRegistryClient
from app.engine.catalog.registry import OllamaMetadata


def fetch_for_cli(name: str, registry_url: str | None = None) -> OllamaMetadata:
    """Fetch ``name``'s metadata; raises OllamaError with a readable reason."""
    interactive = sys.stderr.isatty()

    def progress(what: str, done: int, total: int) -> None:
        line = f"ollama: [{done}/{total}] {what}"
        if interactive:
            print("\r" + line.ljust(70), end="", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    try:
        return asyncio.run(OllamaRegistryClient(registry_url).fetch(name, progress))
    finally:
        if interactive:
            print(file=sys.stderr)
