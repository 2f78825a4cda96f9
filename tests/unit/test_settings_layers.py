"""Settings layering (app/engine/settings/schema.py): request > server > model > ollama > folder > default."""

from __future__ import annotations

import logging

import pytest
from pydantic import ValidationError

from app.engine.settings.schema import DEFAULTS, LAYER_ORDER, LOAD_TIME_FIELDS, OLLAMA_PARAM_MAP, SETTING_NAMES, Settings, settings_from_mapping
from app.engine.settings.layers import SettingsLayers, resolve, settings_from_ollama

UPPER_LAYERS = LAYER_ORDER[1:]  # every layer but the defaults


def test_the_documented_order() -> None:
    assert LAYER_ORDER == ("default", "folder", "ollama", "model", "server", "request")


@pytest.mark.parametrize("top", UPPER_LAYERS)
def test_the_highest_layer_that_sets_a_field_wins(top: str) -> None:
    below = UPPER_LAYERS[: UPPER_LAYERS.index(top) + 1]
    layers = {name: Settings(top_k=i + 1) for i, name in enumerate(below)}
    r = SettingsLayers(**layers).resolve()
    assert (r.values["top_k"], r.source("top_k")) == (len(below), top)


@pytest.mark.parametrize("layer", UPPER_LAYERS)
def test_a_layer_above_that_leaves_a_field_unset_does_not_hide_it(layer: str) -> None:
    everything_above = {name: Settings(temperature=0.1) for name in UPPER_LAYERS if name != layer}
    r = SettingsLayers(**{**everything_above, layer: Settings(top_p=0.5)}).resolve()
    assert (r.values["top_p"], r.source("top_p")) == (0.5, layer)
    assert r.source("min_p") == "default"


def test_a_value_equal_to_the_default_still_names_its_layer() -> None:
    r = SettingsLayers(model=Settings(temperature=DEFAULTS.temperature)).resolve()
    assert r.values["temperature"] == DEFAULTS.temperature and r.source("temperature") == "model"


def test_an_empty_stop_list_above_clears_the_stops_below() -> None:
    r = SettingsLayers(ollama=Settings(stop=["<|im_end|>"]), model=Settings(stop=[])).resolve()
    assert (r.values["stop"], r.source("stop")) == ([], "model")


def test_a_request_beats_the_server_flag() -> None:
    r = SettingsLayers(server=Settings(max_tokens=100), request=Settings(max_tokens=5)).resolve()
    assert (r.values["max_tokens"], r.source("max_tokens")) == (5, "request")


def test_every_field_is_resolved_and_only_the_seed_has_no_default() -> None:
    r = SettingsLayers().resolve()
    assert set(r.values) == set(SETTING_NAMES) and set(r.sources.values()) == {"default"}
    assert set(SETTING_NAMES) - set(DEFAULTS.set_fields()) == {"seed"}
    assert r.values["seed"] is None  # a random seed per request unless a layer sets one


def test_resolve_skips_missing_layers() -> None:
    r = resolve({"default": DEFAULTS, "request": Settings(top_k=3)})
    assert (r.values["top_k"], r.source("top_k")) == (3, "request")
    assert (r.values["top_p"], r.source("top_p")) == (DEFAULTS.top_p, "default")
    # without a default layer nothing fills the unset fields
    bare = resolve({"model": Settings(top_k=3)})
    assert bare.values["top_p"] is None and bare.source("top_p") == "default"


def test_resolved_values_are_copies_not_the_layers_lists() -> None:
    model = Settings(stop=["a"])
    r = SettingsLayers(model=model).resolve()
    r.values["stop"].append("b")
    assert model.stop == ["a"]
    SettingsLayers().resolve().values["stop"].append("x")
    assert DEFAULTS.stop == []


def test_resolved_settings_read_like_settings() -> None:
    r = SettingsLayers(model=Settings(top_k=7)).resolve()
    assert r.as_settings() == Settings(**r.values) and r.as_settings().top_k == 7
    with pytest.raises(AttributeError):
        r.no_such_setting  # noqa: B018


def test_load_time_fields_are_settings() -> None:
    assert LOAD_TIME_FIELDS <= set(SETTING_NAMES)
    assert "temperature" not in LOAD_TIME_FIELDS and "context_length" in LOAD_TIME_FIELDS


# -- one layer's own rules ------------------------------------------------------------------------
def test_stop_strings_are_deduplicated_in_order() -> None:
    assert Settings(stop=["b", "a", "b", "c", "a"]).stop == ["b", "a", "c"]


def test_an_assignment_is_validated_like_construction() -> None:
    layer = Settings()
    with pytest.raises(ValidationError):
        layer.top_p = 1.5
    with pytest.raises(ValidationError):
        Settings(unknown=1)  # type: ignore[call-arg]
    assert layer.top_p is None


@pytest.mark.parametrize("value, kept", [("auto", "auto"), (" Auto ", "auto"), (" 20,24 ", "20,24")])
def test_gpu_split_is_normalised(value: str, kept: str) -> None:
    assert Settings(gpu_split=value).gpu_split == kept


def test_mapping_errors_name_the_source_and_every_bad_field() -> None:
    assert settings_from_mapping({"top_k": 5}, "models.json").top_k == 5
    with pytest.raises(ValueError) as info:
        settings_from_mapping({"top_k": -1, "cache_type": "Q3", "temperature": 1}, "models.json entry tiny")
    message = str(info.value)
    assert message.startswith("invalid settings in models.json entry tiny: ")
    assert "top_k" in message and "cache_type" in message and "temperature" not in message
    assert message.count("; ") == 1


# -- the Ollama layer ---------------------------------------------------------------------------------
def test_every_ollama_key_maps_to_a_setting() -> None:
    assert set(OLLAMA_PARAM_MAP.values()) <= set(SETTING_NAMES)


def test_ollama_stop_as_one_string_becomes_a_list() -> None:
    assert settings_from_ollama({"stop": "<|im_end|>"}).stop == ["<|im_end|>"]
    assert settings_from_ollama({"stop": ["x", "x", "y"]}).stop == ["x", "y"]


@pytest.mark.parametrize("num_predict", [-1, -2, 0])
def test_ollama_unlimited_num_predict_leaves_max_tokens_to_the_layers_below(num_predict: int) -> None:
    layer = settings_from_ollama({"num_predict": num_predict})
    assert layer.max_tokens is None
    assert SettingsLayers(ollama=layer).resolve().source("max_tokens") == "default"


def test_ollama_system_prompt_and_unknown_keys() -> None:
    layer = settings_from_ollama({"mirostat": 2, "num_gpu": 99, "temperature": 0.4}, system="Be brief.")
    assert layer.set_fields() == {"temperature": 0.4, "system_prompt": "Be brief."}
    assert settings_from_ollama({}, system="").set_fields() == {}


def test_each_invalid_ollama_value_is_dropped_alone_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    layer = settings_from_ollama({"num_ctx": 8, "temperature": -3, "stop": ["a", ""], "top_k": 5,
                                  "num_predict": 2.5, "seed": 11})
    assert layer.set_fields() == {"top_k": 5, "seed": 11}
    dropped = {r.getMessage().split("=")[0] for r in caplog.records if r.levelno == logging.WARNING}
    assert dropped == {f"ignoring Ollama parameter {name}" for name in
                       ("context_length", "temperature", "stop", "max_tokens")}


def test_the_ollama_layer_sits_between_folder_and_model() -> None:
    layers = SettingsLayers(folder=Settings(temperature=0.9, top_k=1),
                            ollama=settings_from_ollama({"temperature": 0.3, "top_k": 2}),
                            model=Settings(top_k=3))
    r = layers.resolve()
    assert (r.values["temperature"], r.source("temperature")) == (0.3, "ollama")
    assert (r.values["top_k"], r.source("top_k")) == (3, "model")
