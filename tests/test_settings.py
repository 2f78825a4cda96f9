from __future__ import annotations

import pytest

from app.engine.settings.schema import DEFAULTS, LAYER_ORDER, Settings, parse_gpu_split, settings_from_mapping
from app.engine.settings.layers import SettingsLayers, settings_from_ollama


def test_every_layer_wins_over_the_ones_below_and_reports_itself() -> None:
    layers = SettingsLayers(
        folder=Settings(context_length=2048, temperature=0.6, top_k=10, top_p=0.5, min_p=0.01),
        ollama=Settings(temperature=0.5, top_k=20, top_p=0.6, min_p=0.02),
        model=Settings(top_k=30, top_p=0.7, min_p=0.03),
        server=Settings(top_p=0.8, min_p=0.04),
        request=Settings(min_p=0.05),
    )
    r = layers.resolve()
    assert (r.values["context_length"], r.source("context_length")) == (2048, "folder")
    assert (r.values["temperature"], r.source("temperature")) == (0.5, "ollama")
    assert (r.values["top_k"], r.source("top_k")) == (30, "model")
    assert (r.values["top_p"], r.source("top_p")) == (0.8, "server")
    assert (r.values["min_p"], r.source("min_p")) == (0.05, "request")
    assert (r.values["batch_size"], r.source("batch_size")) == (DEFAULTS.batch_size, "default")
    # every field is resolved
    assert set(r.values) == set(Settings.model_fields)
    assert LAYER_ORDER[0] == "default" and LAYER_ORDER[-1] == "request"


def test_unset_fields_fall_through() -> None:
    r = SettingsLayers(model=Settings(stop=["</s>"])).resolve()
    assert r.values["stop"] == ["</s>"] and r.source("stop") == "model"
    assert r.source("temperature") == "default"


@pytest.mark.parametrize("bad", [
    {"temperature": -1}, {"top_p": 0}, {"batch_size": 0}, {"cache_type": "Q3"}, {"gpu_split": "a,b"},
    {"stop": [""]}, {"unknown_key": 1}, {"temperature": float("nan")},
])
def test_invalid_settings_are_refused_with_a_readable_message(bad: dict) -> None:
    with pytest.raises(ValueError) as info:
        settings_from_mapping(bad, "test")
    assert "invalid settings in test" in str(info.value)
    assert next(iter(bad)) in str(info.value)


def test_gpu_split_parsing() -> None:
    assert parse_gpu_split("20, 24") == [20.0, 24.0]
    assert Settings(gpu_split="AUTO").gpu_split == "auto"
    with pytest.raises(ValueError):
        parse_gpu_split("0,0")


def test_ollama_params_map_to_settings() -> None:
    layer = settings_from_ollama(
        {"num_ctx": 8192, "stop": ["<|im_end|>", "<|im_start|>"], "temperature": 0.2, "top_k": 5,
         "top_p": 0.3, "min_p": 0.1, "repeat_penalty": 1.1, "presence_penalty": 0.5,
         "frequency_penalty": 0.4, "seed": 7, "num_predict": 99, "typical_p": 0.9, "mirostat": 1},
        system="Be brief.",
    )
    assert layer.set_fields() == {
        "context_length": 8192, "stop": ["<|im_end|>", "<|im_start|>"], "temperature": 0.2, "top_k": 5,
        "top_p": 0.3, "min_p": 0.1, "repetition_penalty": 1.1, "presence_penalty": 0.5,
        "frequency_penalty": 0.4, "seed": 7, "max_tokens": 99, "typical": 0.9, "system_prompt": "Be brief.",
    }


def test_ollama_bad_values_are_skipped_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    layer = settings_from_ollama({"temperature": -3, "num_predict": -1, "stop": "END"})
    assert layer.set_fields() == {"stop": ["END"]}
    assert "ignoring Ollama parameter temperature" in caplog.text
