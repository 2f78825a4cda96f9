"""The prepared-model cache (app/engine/prepared.py): built once, rebuilt only when its sources change."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from app.engine.catalog.registry import ModelEntry, OllamaMetadata, Registry
from app.engine.errors import InvalidRequest, ModelNotFound
from app.engine import prepared as prepared_module
from app.engine.prepared import PreparedModels
from app.engine.prompting import select
from app.engine.prompting.builders import ChatInput
from app.engine.settings.schema import Settings

JINJA = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"


def model_folder(path: Path, template: str = JINJA) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 2048}))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "chat_template": template}))
    tokens = [{"id": i, "content": t, "special": True}
              for i, t in enumerate(["<fim_prefix>", "<fim_suffix>", "<fim_middle>"])]
    (path / "tokenizer.json").write_text(json.dumps({"added_tokens": tokens, "model": {}}))
    return path


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Registry, PreparedModels, dict]:
    registry = Registry(tmp_path / "models.json")
    registry.add("m", ModelEntry(model_dir=str(model_folder(tmp_path / "m"))))
    server = {"settings": Settings()}
    return registry, PreparedModels(registry, lambda: server["settings"]), server


def bump(path: Path) -> None:
    """A change a second later (file systems with coarse timestamps see it too)."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_one_build_serves_every_request_while_nothing_changes(setup) -> None:
    registry, prepared, _ = setup
    first = prepared.get("m")
    assert all(prepared.get(name) is first for name in ("m", "m:latest", "m"))
    assert prepared.builds == 1
    settings = first.base.effective
    assert first.builder(settings) is first.builder(settings)  # the template is compiled once
    assert first.base.values["context_length"] == 2048  # the folder's layer is in


def test_the_fim_form_reads_tokenizer_json_once(setup, monkeypatch: pytest.MonkeyPatch) -> None:
    _, prepared, _ = setup
    reads = []
    real = select._added_tokens
    monkeypatch.setattr(select, "_added_tokens", lambda folder: reads.append(folder) or real(folder))
    model = prepared.get("m")
    for _ in range(5):
        assert prepared.get("m").fill_in_middle()("a", "b") == "<fim_prefix>a<fim_suffix>b<fim_middle>"
    assert len(reads) == 1 and prepared.get("m") is model


def test_a_changed_registry_entry_is_prepared_again(setup) -> None:
    registry, prepared, _ = setup
    before = prepared.get("m")
    registry.set_settings("m", Settings(temperature=0.1))
    after = prepared.get("m")
    assert after is not before and after.base.effective.temperature == 0.1 and prepared.builds == 2
    entry = registry.get("m")
    registry.add("m", entry.model_copy(update={"ollama": OllamaMetadata(name="x", template="{{ .Prompt }}")}),
                 replace=True)
    assert prepared.get("m").entry.ollama is not None


def test_the_folder_is_looked_at_once_a_second_at_most(setup, monkeypatch: pytest.MonkeyPatch) -> None:
    registry, prepared, _ = setup
    model = prepared.get("m")
    stats = []
    monkeypatch.setattr(prepared_module, "folder_stamp", lambda folder: stats.append(folder) or model.stamp)
    assert all(prepared.get("m") is model for _ in range(50)) and stats == []
    model.checked -= prepared_module.FOLDER_CHECK_S  # a second later
    assert prepared.get("m") is model and len(stats) == 1


@pytest.mark.parametrize("name", ["tokenizer_config.json", "config.json", "tokenizer.json"])
def test_a_changed_folder_file_is_read_again(setup, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prepared_module, "FOLDER_CHECK_S", 0.0)  # look at the files on every request
    registry, prepared, _ = setup
    folder = Path(registry.get("m").model_dir)
    before = prepared.get("m")
    if name == "tokenizer_config.json":
        (folder / name).write_text(json.dumps({"chat_template": "NEW {{ messages[0].content }}"}))
    bump(folder / name)
    after = prepared.get("m")
    assert after is not before
    if name == "tokenizer_config.json":
        assert after.builder(after.base.effective).build(ChatInput([{"role": "user", "content": "x"}])) == "NEW x"


def test_new_server_settings_are_prepared_again(setup) -> None:
    _, prepared, server = setup
    before = prepared.get("m")
    server["settings"] = Settings(top_k=3)
    after = prepared.get("m")
    assert after is not before and after.base.values["top_k"] == 3 and after.base.source("top_k") == "server"


def test_a_request_layer_is_resolved_over_the_prepared_layers(setup) -> None:
    _, prepared, _ = setup
    model = prepared.get("m")
    assert model.resolve(Settings()) is model.base
    r = model.resolve(Settings(top_p=0.5))
    assert r.values["top_p"] == 0.5 and r.source("top_p") == "request" and r.values["context_length"] == 2048


def test_unknown_models_and_bad_templates_are_engine_errors(setup) -> None:
    registry, prepared, _ = setup
    with pytest.raises(ModelNotFound, match="'nope' does not exist"):
        prepared.get("nope")
    registry.set_settings("m", Settings(template="custom"))
    model = prepared.get("m")
    with pytest.raises(InvalidRequest, match="no custom template") as info:
        model.builder(model.base.effective)
    assert info.value.param == "messages"


async def test_a_fim_template_that_does_not_compile_is_a_bad_request(setup) -> None:
    """Answered 400 naming the suffix before any model is loaded (it was a 500)."""
    from app.engine.facade import CompletionRequest, Engine

    registry, _, _ = setup
    entry = registry.get("m")
    broken = OllamaMetadata(name="x", template="{{ if .Suffix }}<PRE>{{ .Prompt }<SUF>{{ end }}")
    registry.add("m", entry.model_copy(update={"ollama": broken}), replace=True)
    engine = Engine(registry)
    with pytest.raises(InvalidRequest, match="Ollama template") as info:
        await engine.submit_completion(CompletionRequest("m", "def f(", suffix="):"))
    assert info.value.param == "suffix" and engine.model_states() == []
    await engine.close()
