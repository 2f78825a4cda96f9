"""Ollama's keep_alive and options as this app's settings (no server, no model)."""

from __future__ import annotations

import pytest

from app.api.errors import ApiError
from app.api.ollama.models import family_of
from app.api.ollama.options import UNLIMITED_TOKENS, options_to_settings, parse_keep_alive
from app.engine.settings.layers import SettingsLayers
from app.engine.settings.schema import Settings


@pytest.mark.parametrize("value, seconds", [
    (None, None), (0, 0.0), ("0", 0.0), ("0s", 0.0), (30, 30.0), (2.5, 2.5), ("5m", 300.0), ("1h30m", 5400.0),
    ("1.5h", 5400.0), ("300ms", 0.3), ("-1", -1.0), ("-1m", -60.0), (-5, -5.0), ("45", 45.0), (" 2m ", 120.0),
    (10**40, -1.0), ("9" * 400 + "h", -1.0), (1e300, -1.0),
])
def test_keep_alive_as_seconds(value: object, seconds: float | None) -> None:
    parsed = parse_keep_alive(value)
    assert parsed is None if seconds is None else parsed == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["", "soon", "5 m", "5x", "m", "1h-30m", "nan", "inf", True, [], {}])
def test_bad_keep_alive_is_400(value: object) -> None:
    with pytest.raises(ApiError) as err:
        parse_keep_alive(value)
    assert err.value.status == 400 and "keep_alive" in err.value.message


def test_options_map_onto_settings() -> None:
    layer = options_to_settings({"num_predict": 12, "temperature": 0.3, "top_k": 7, "top_p": 0.5, "min_p": 0.1,
                                 "typical_p": 0.9, "repeat_penalty": 1.2, "presence_penalty": 0.4,
                                 "frequency_penalty": -0.4, "seed": 42, "stop": ["\n", "User:"],
                                 "num_gpu": 99, "num_thread": 8, "mirostat": 2, "num_ctx": 64})
    assert layer.set_fields() == {"max_tokens": 12, "temperature": 0.3, "top_k": 7, "top_p": 0.5, "min_p": 0.1,
                                  "typical": 0.9, "repetition_penalty": 1.2, "presence_penalty": 0.4,
                                  "frequency_penalty": -0.4, "seed": 42, "stop": ["\n", "User:"]}


@pytest.mark.parametrize("options, fields", [
    ({"num_predict": -1}, {"max_tokens": UNLIMITED_TOKENS}), ({"num_predict": -2}, {"max_tokens": UNLIMITED_TOKENS}),
    ({"num_predict": 0}, {}), ({"seed": -1}, {}), ({"seed": 2**64 + 5}, {"seed": (2**64 + 5) % 2**63}),
    ({"top_p": 0}, {"top_k": 1}), ({"stop": "###"}, {"stop": ["###"]}), ({"stop": ["", ""]}, {}),
    ({"temperature": None}, {}), ({"num_predict": 4.0}, {"max_tokens": 4}), (None, {}),
])
def test_ollamas_special_values(options: dict | None, fields: dict) -> None:
    assert options_to_settings(options).set_fields() == fields


@pytest.mark.parametrize("options, words", [
    ({"temperature": "hot"}, "temperature must be a number"), ({"temperature": True}, "temperature"),
    ({"num_predict": 1.5}, "num_predict must be an integer"), ({"top_k": "3"}, "top_k"),
    ({"top_p": 7}, "top_p"), ({"typical_p": 0}, "typical_p"), ({"repeat_penalty": 0}, "repeat_penalty"),
    ({"num_predict": 10**9}, "num_predict"), ({"stop": [1]}, "stop"), ({"stop": ["x"] * 65}, "stop"),
    ({"temperature": 10**400}, "finite"), ({"num_ctx": "big"}, "num_ctx must be an integer"),
    ({"num_ctx": 2048.5}, "num_ctx must be an integer"), ({"num_ctx": True}, "num_ctx"),
])
def test_bad_options_name_the_option(options: dict, words: str) -> None:
    with pytest.raises(ApiError) as err:
        options_to_settings(options)
    assert err.value.status == 400 and words in err.value.message


def test_options_are_the_request_layer_over_the_models_settings() -> None:
    layers = SettingsLayers(model=Settings(max_tokens=6, temperature=0.2, top_k=5))
    resolved = layers.with_request(options_to_settings({"num_predict": 3, "temperature": 0.9})).resolve()
    assert resolved.effective.max_tokens == 3 and resolved.effective.temperature == 0.9
    assert resolved.effective.top_k == 5 and resolved.source("top_k") == "model"
    assert resolved.source("max_tokens") == "request"


@pytest.mark.parametrize("arch, family", [("LlamaForCausalLM", "llama"), ("Qwen2ForCausalLM", "qwen2"),
                                          ("Gemma3ForConditionalGeneration", "gemma3"), ("GPT2LMHeadModel", "gpt2"),
                                          ("mistral", "mistral"), ("", "unknown")])
def test_family_from_architecture(arch: str, family: str) -> None:
    assert family_of(arch) == family
