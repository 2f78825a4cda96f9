"""Static assets shipped in ``resources/``."""

from __future__ import annotations

import json
from pathlib import Path

RESOURCES = Path(__file__).resolve().parent.parent / "resources"


def ollama_suggestions() -> list[str]:
    try:
        return list(json.loads((RESOURCES / "ollama_library.json").read_text(encoding="utf-8"))["entries"])
    except (OSError, ValueError, KeyError):
        return []
