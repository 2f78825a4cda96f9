"""Pick and build the backend for a model, and read the folder's own defaults (lowest settings layer)."""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from app.engine.backends.contract import Backend, BackendLoadError
from app.engine.catalog.model_folder import ModelFolderError, inspect_model_folder
from app.engine.catalog.registry import ModelEntry
from app.engine.settings.schema import ResolvedSettings, Settings
from app.engine.catalog.tokenizer import read_json

log = logging.getLogger(__name__)

_GENERATION_KEYS = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
                    "repetition_penalty": "repetition_penalty", "typical_p": "typical", "min_p": "min_p"}


def folder_settings(model_dir: str) -> Settings:
    """config.json / generation_config.json as a settings layer."""
    path = Path(model_dir)
    stamp = 0
    for name in ("config.json", "generation_config.json"):
        try:
            stamp = max(stamp, (path / name).stat().st_mtime_ns)
        except OSError:
            pass
    return _folder_settings(str(path), stamp).model_copy()


@lru_cache(maxsize=64)
def _folder_settings(model_dir: str, _stamp: int) -> Settings:
    path = Path(model_dir)
    layer = Settings()
    ctx = read_json(path / "config.json").get("max_position_embeddings")
    if isinstance(ctx, int) and ctx >= 16:
        layer.context_length = ctx
    gen = read_json(path / "generation_config.json")
    for key, target in _GENERATION_KEYS.items():
        if key in gen:
            try:
                setattr(layer, target, gen[key])
            except ValidationError:
                log.debug("ignoring %s=%r from generation_config.json", key, gen[key])
    return layer


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def choose_backend(entry: ModelEntry, settings: ResolvedSettings) -> str:
    fmt = entry.info.get("format")
    if fmt is None:
        try:
            fmt = inspect_model_folder(entry.model_dir).format
        except ModelFolderError as exc:
            raise BackendLoadError(str(exc)) from None
    choice = settings.backend or "auto"
    if choice == "auto":
        choice = "exllamav2" if fmt in ("EXL2", "GPTQ") else "transformers"
    if choice == "transformers" and fmt in ("EXL2", "GPTQ", "EXL3"):
        raise BackendLoadError(f"{fmt} models need the exllamav2 backend and an NVIDIA GPU; the CPU "
                               "backend can only serve FP16 Hugging Face folders")
    if choice == "exllamav2" and not cuda_available():
        raise BackendLoadError(
            f"{entry.model_dir} is an {fmt} model, which needs an NVIDIA GPU with CUDA (torch sees none). "
            "The CPU (transformers) backend can serve FP16 Hugging Face folders.")
    return choice


def create_backend(entry: ModelEntry, settings: ResolvedSettings) -> Backend:
    """A backend for ``entry``, not yet loaded."""
    if not Path(entry.model_dir).is_dir():
        raise BackendLoadError(f"model folder {entry.model_dir} does not exist any more")
    choice = choose_backend(entry, settings)
    kwargs: dict[str, Any] = {"context_length": int(settings.context_length), "max_batch": int(settings.batch_size)}
    if choice == "exllamav2":
        # in a process of its own: its step loop must not share the GIL with the server (see process_backend)
        from app.engine.backends.model_process.client import ProcessBackend

        return ProcessBackend("app.engine.backends.exllamav2_backend:ExLlamaV2Backend", "exllamav2",
                              entry.model_dir, cache_type=settings.cache_type, gpu_split=settings.gpu_split,
                              rope_scale=float(settings.rope_scale), rope_alpha=float(settings.rope_alpha),
                              **kwargs)
    from app.engine.backends.transformers_backend import TransformersBackend

    return TransformersBackend(entry.model_dir, rope_scale=float(settings.rope_scale), **kwargs)
