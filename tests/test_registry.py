from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import pytest

from app.engine.catalog.registry import ModelEntry, OllamaMetadata, Registry, RegistryError, normalize_name
from app.engine.settings.schema import Settings


def entry(folder: str = "/models/x", **settings) -> ModelEntry:
    return ModelEntry(model_dir=folder, settings=Settings(**settings))


def test_round_trip(models_path: Path) -> None:
    reg = Registry(models_path)
    meta = OllamaMetadata(name="registry.ollama.ai/library/llama3:latest", template="{{ .Prompt }}",
                          system="sys", params={"stop": ["x"]}, license="MIT")
    e = ModelEntry(model_dir="/m", settings=Settings(context_length=1024, stop=["END"]), ollama=meta,
                   info={"format": "EXL2"})
    key = reg.add("Llama3", e)
    assert key == "llama3:latest"
    again = Registry(models_path).get("llama3")
    assert again.model_dir == "/m"
    assert again.settings.context_length == 1024 and again.settings.stop == ["END"]
    assert again.ollama == meta
    assert again.created_at and again.updated_at
    raw = json.loads(models_path.read_text())
    assert raw["schema_version"] == 1 and "llama3:latest" in raw["models"]
    # unset settings are not written
    assert raw["models"]["llama3:latest"]["settings"] == {"context_length": 1024, "stop": ["END"]}


def test_duplicate_needs_replace_and_keeps_created_at(models_path: Path) -> None:
    reg = Registry(models_path)
    reg.add("a:1", entry())
    created = reg.get("a:1").created_at
    with pytest.raises(RegistryError, match="already registered"):
        reg.add("a:1", entry("/other"))
    reg.add("a:1", entry("/other"), replace=True)
    assert reg.get("a:1").model_dir == "/other" and reg.get("a:1").created_at == created


def test_remove_and_unknown(models_path: Path) -> None:
    reg = Registry(models_path)
    reg.add("a", entry())
    reg.remove("a")
    assert reg.names() == []
    with pytest.raises(RegistryError, match="not registered"):
        reg.remove("a")


def test_reread_when_changed_on_disk(models_path: Path) -> None:
    reader = Registry(models_path)
    assert reader.names() == []
    Registry(models_path).add("b", entry())
    assert reader.names() == ["b:latest"]


def _add_many(path: str, prefix: str, count: int) -> None:
    reg = Registry(path)
    for i in range(count):
        reg.add(f"{prefix}-{i}", entry(f"/models/{prefix}/{i}"))


def test_concurrent_writers_lose_nothing(models_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_add_many, args=(str(models_path), p, 25)) for p in ("x", "y", "z")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    names = Registry(models_path).names()
    assert len(names) == 75
    assert {n.split("-")[0] for n in names} == {"x", "y", "z"}


def test_crash_between_temp_write_and_replace_keeps_old_file(models_path: Path, monkeypatch) -> None:
    reg = Registry(models_path)
    reg.add("keep", entry())
    before = models_path.read_bytes()

    def boom(src, dst):
        raise OSError("simulated crash before replace")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="simulated crash"):
        reg.add("new", entry())
    monkeypatch.undo()
    assert models_path.read_bytes() == before
    assert [p.name for p in models_path.parent.iterdir() if p.suffix == ".tmp"] == []
    assert Registry(models_path).names() == ["keep:latest"]


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON (line 1, column 2"),
    ("[]", "must hold a JSON object"),
    ('{"schema_version": 99, "models": {}}', "schema_version 99"),
    ('{"models": {"a:latest": {"settings": {}}}}', "model_dir"),
    ('{"models": {"a:latest": {"model_dir": "/x", "settings": {"temperature": "hot"}}}}', "temperature"),
])
def test_invalid_file_is_a_clear_error_and_is_never_overwritten(models_path: Path, content: str,
                                                                message: str) -> None:
    models_path.write_text(content)
    reg = Registry(models_path)
    with pytest.raises(RegistryError) as info:
        reg.names()
    assert str(models_path) in str(info.value) and message in str(info.value)
    with pytest.raises(RegistryError):
        reg.add("x", entry())
    assert models_path.read_text() == content


def test_name_normalization() -> None:
    assert normalize_name("Foo") == "foo:latest"
    assert normalize_name("foo:7b") == "foo:7b"
    assert normalize_name("host:5000/ns/foo") == "host:5000/ns/foo:latest"
    with pytest.raises(RegistryError):
        normalize_name("  ")
