"""Registering a model folder: the one way the CLI, the add-model dialog and the tests add a model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from app.engine.catalog.model_folder import ModelInfo, inspect_model_folder
from app.engine.catalog.registry import ModelEntry, OllamaMetadata, Registry
from app.engine.settings.schema import Settings


@dataclass(frozen=True)
class AddedModel:
    key: str  # the registry key (``name:tag``)
    info: ModelInfo
    entry: ModelEntry


def add_model(registry: Registry, name: str, model_dir: str | Path, *, settings: Settings | None = None,
              ollama: OllamaMetadata | None = None, info: ModelInfo | None = None,
              replace: bool = False) -> AddedModel:
    """Inspect ``model_dir`` (unless ``info`` says what it holds) and register it as ``name``.

    Raises :class:`~app.engine.catalog.model_folder.ModelFolderError` for a folder that is not a model
    and :class:`~app.engine.catalog.registry.RegistryError` when the name is taken (without
    ``replace``) or models.json cannot be written; nothing is written then.
    """
    info = info or inspect_model_folder(model_dir)
    entry = ModelEntry(model_dir=info.path, settings=settings or Settings(), ollama=ollama, info=info.to_dict())
    key = registry.add(name, entry, replace=replace)
    return AddedModel(key, info, entry)
