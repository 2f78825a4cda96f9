"""Ollama model names: ``[host/][namespace/]model[:tag]``."""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"

_PART = re.compile(r"^[a-z0-9][a-z0-9._-]{0,79}$", re.IGNORECASE)
_TAG = re.compile(r"^[a-z0-9_][a-z0-9._-]{0,127}$", re.IGNORECASE)
_HOST = re.compile(r"^[a-z0-9][a-z0-9.-]*(:[0-9]{1,5})?$", re.IGNORECASE)


class InvalidName(ValueError):
    pass


@dataclass(frozen=True)
class OllamaName:
    host: str
    namespace: str
    model: str
    tag: str

    def __str__(self) -> str:
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"

    @property
    def short(self) -> str:
        base = self.model if self.namespace == DEFAULT_NAMESPACE else f"{self.namespace}/{self.model}"
        if self.host != DEFAULT_HOST:
            base = f"{self.host}/{base}"
        return f"{base}:{self.tag}"


def parse_name(text: str) -> OllamaName:
    """Parse ``[host/][namespace/]model[:tag]``; raises InvalidName with the reason."""
    raw = text.strip()
    if not raw:
        raise InvalidName("an Ollama model name must not be empty")
    if any(c.isspace() for c in raw):
        raise InvalidName(f"invalid Ollama model name {text!r}: spaces are not allowed")
    tag = DEFAULT_TAG
    last_slash = raw.rfind("/")
    colon = raw.rfind(":")
    if colon > last_slash:
        raw, tag = raw[:colon], raw[colon + 1:]
        if not _TAG.match(tag):
            raise InvalidName(f"invalid tag {tag!r} in Ollama model name {text!r}")
    parts = raw.split("/")
    if len(parts) > 3 or any(p == "" for p in parts):
        raise InvalidName(f"invalid Ollama model name {text!r}: expected [host/][namespace/]model[:tag]")
    host, namespace = DEFAULT_HOST, DEFAULT_NAMESPACE
    if len(parts) == 3:
        host, namespace, model = parts
    elif len(parts) == 2:
        namespace, model = parts
    else:
        model = parts[0]
    if not _HOST.match(host):
        raise InvalidName(f"invalid registry host {host!r} in {text!r}")
    for what, value in (("namespace", namespace), ("model", model)):
        if not _PART.match(value):
            raise InvalidName(f"invalid {what} {value!r} in Ollama model name {text!r}")
    return OllamaName(host.lower(), namespace.lower(), model.lower(), tag.lower())
