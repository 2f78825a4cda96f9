"""``GET /api/version``, ``GET /api/tags``, ``POST /api/show``, ``GET /api/ps``: the registry and the
loaded models as Ollama lists them (names as ``name:tag``, sizes in bytes, times in RFC 3339)."""

from __future__ import annotations

import hashlib
import re
import time
from datetime import datetime, timedelta, timezone
from typing import Any

from aiohttp import web

from app.api.body import read_json_body
from app.api.keys import ENGINE
from app.api.ollama.wire import ShowRequest, parse
from app.engine.catalog.registry import ModelEntry, normalize_name
from app.engine.errors import EngineError
from app.engine.facade import Engine
from app.engine.settings.schema import SCHEMA

#: the Ollama version this API answers as: clients enable features by it (tools 0.3, structured outputs 0.5)
OLLAMA_VERSION = "0.9.0"
#: what Ollama's expires_at says for a model kept loaded (its "forever": now + 292 years)
_FOREVER = timedelta(days=292 * 365)
_GPU_BACKENDS = ("exllamav2", "exllamav3")

routes = web.RouteTableDef()


@routes.get("/")
async def root(request: web.Request) -> web.Response:
    """Ollama's liveness answer; some integrations probe it before anything else."""
    return web.Response(text="Ollama is running")


@routes.get("/api/version")
async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": OLLAMA_VERSION})


@routes.get("/api/tags")
async def tags(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    models = []
    for view in engine.list_models():
        entry = _entry(engine, view.name)
        if entry is None:
            continue
        key = normalize_name(view.name)
        models.append({"name": key, "model": key, "modified_at": modified_at(entry),
                       "size": int(entry.info.get("size_bytes") or 0), "digest": digest(key, entry),
                       "details": details(entry)})
    return web.json_response({"models": models})


@routes.post("/api/show")
async def show(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    req: ShowRequest = parse(ShowRequest, await read_json_body(request))
    name = req.model_name()
    entry = engine.model_entry(name)  # ModelNotFound -> 404
    resolved = engine.resolve(name)
    values = resolved.values
    family = details(entry)["family"]
    template = values["custom_template"] if values["template"] == "custom" else (
        entry.ollama.template if entry.ollama is not None else None)
    body: dict[str, Any] = {
        "modelfile": modelfile(entry, template, values["system_prompt"], parameter_lines(resolved)),
        "parameters": "\n".join(parameter_lines(resolved)),
        "details": details(entry),
        "model_info": {"general.architecture": family, "general.parameter_count": parameter_count(entry),
                       f"{family}.context_length": int(values["context_length"])},
        "capabilities": capabilities(engine, name),
        "modified_at": modified_at(entry),
    }
    if template:
        body["template"] = template
    if values["system_prompt"]:
        body["system"] = values["system_prompt"]
    if entry.ollama is not None and entry.ollama.license:
        body["license"] = entry.ollama.license
    return web.json_response(body)


@routes.get("/api/ps")
async def ps(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    models = []
    for state in engine.model_states():
        entry = _entry(engine, state.name) if state.state == "ready" else None
        if entry is None:
            continue
        size = int(entry.info.get("size_bytes") or 0)
        models.append({"name": state.name, "model": state.name, "size": size, "digest": digest(state.name, entry),
                       "details": details(entry), "expires_at": expires_at(engine, state.name),
                       "size_vram": size if state.backend in _GPU_BACKENDS else 0,
                       "context_length": engine.resolve(state.name).effective.context_length})
    return web.json_response({"models": models})


def capabilities(engine: Engine, name: str) -> list[str]:
    """What Ollama's clients read to decide what to send: "insert" with a fill-in-the-middle form, "tools"
    when tool calls are parsed out of the model's text (its tool-call format is not ``none``)."""
    return ["completion", *(["tools"] if engine.tool_format(name) is not None else []),
            *(["insert"] if engine.has_fill_in_middle(name) else [])]


def _entry(engine: Engine, name: str) -> ModelEntry | None:
    """A listed model's entry, or None when it was removed from the registry meanwhile."""
    try:
        return engine.model_entry(name)
    except EngineError:
        return None


def rfc3339(when: datetime) -> str:
    return when.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def expires_at(engine: Engine, name: str) -> str:
    deadline = engine.unload_deadline(name)
    if deadline is None:
        return rfc3339(datetime.now(timezone.utc) + _FOREVER)
    return rfc3339(datetime.fromtimestamp(deadline, timezone.utc))


def modified_at(entry: ModelEntry) -> str:
    for stamp in (entry.updated_at, entry.created_at):
        try:
            return rfc3339(datetime.fromisoformat(stamp))
        except (TypeError, ValueError):
            continue
    return rfc3339(datetime.fromtimestamp(0, timezone.utc))


def digest(key: str, entry: ModelEntry) -> str:
    """A stable id of a registration (Ollama's is the manifest's sha256; there is no manifest here)."""
    return hashlib.sha256(f"{key}\0{entry.model_dir}\0{entry.created_at}".encode()).hexdigest()


def family_of(architecture: str) -> str:
    """``LlamaForCausalLM`` -> ``llama``, ``Qwen2ForCausalLM`` -> ``qwen2``."""
    base = re.sub(r"(ForCausalLM|ForConditionalGeneration|LMHeadModel|Model)$", "", architecture)
    return (base or architecture or "unknown").lower()


def parameter_count(entry: ModelEntry) -> int:
    bpw = float(entry.info.get("bits_per_weight") or 0)
    size = int(entry.info.get("size_bytes") or 0)
    return int(size * 8 / bpw) if bpw > 0 else 0


def _parameter_size(count: int) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.1f}{unit}"
    return str(count)


def details(entry: ModelEntry) -> dict[str, Any]:
    info = entry.info
    fmt = str(info.get("format") or "unknown")
    family = family_of(str(info.get("architecture") or "unknown"))
    bpw = float(info.get("bits_per_weight") or 0)
    level = "F16" if fmt == "FP16" else (f"{fmt}_{bpw:g}bpw" if bpw else fmt)
    return {"parent_model": "", "format": fmt.lower(), "family": family, "families": [family],
            "parameter_size": _parameter_size(parameter_count(entry)), "quantization_level": level}


def parameter_lines(resolved: Any) -> list[str]:
    """The model's Ollama-keyed settings that are set somewhere above the built-in defaults."""
    lines = []
    for name, info in SCHEMA.items():
        if info.ollama is None or resolved.sources[name] == "default":
            continue
        value = resolved.values[name]
        if value is None:
            continue
        for one in (value if isinstance(value, (list, tuple)) else [value]):
            shown = f'"{one}"' if isinstance(one, str) else one
            lines.append(f"{info.ollama:<30} {shown}")
    return lines


def modelfile(entry: ModelEntry, template: str | None, system: str, parameters: list[str]) -> str:
    lines = [f"# Modelfile generated by ExLlama Tray on {time.strftime('%Y-%m-%d')}", f"FROM {entry.model_dir}"]
    if template:
        lines.append(f'TEMPLATE """{template}"""')
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f"PARAMETER {' '.join(p.split(None, 1))}" for p in parameters]
    if entry.ollama is not None and entry.ollama.license:
        lines.append(f'LICENSE """{entry.ollama.license}"""')
    return "\n".join(lines) + "\n"
