"""Settings for the exllamav3 backend: the backend choice, cache types per backend, the multi-GPU mode."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace
from typing import get_args

import pytest

from app.engine.backends import factory
from app.engine.backends.contract import BackendLoadError
from app.engine.backends.exllamav3_backend import apply_rope, paged_sizes
from app.engine.catalog.model_folder import inspect_model_folder
from app.engine.catalog.registry import ModelEntry, Registry, RegistryError
from app.engine.settings.layers import SettingsLayers
from app.engine.settings.schema import CACHE_TYPES_BY_BACKEND, BackendChoice, CacheType, Settings, settings_from_mapping

CONFIG = {"architectures": ["LlamaForCausalLM"], "vocab_size": 1024, "max_position_embeddings": 2048}


def folder(path: Path, qcfg: dict | None = None) -> ModelEntry:
    path.mkdir()
    (path / "config.json").write_text(json.dumps({**CONFIG, **({"quantization_config": qcfg} if qcfg else {})}))
    (path / "model.safetensors").write_bytes(b"\0" * 8)
    return ModelEntry(model_dir=str(path), info=inspect_model_folder(path).to_dict())


def test_every_backend_says_which_cache_types_it_takes() -> None:
    assert set(CACHE_TYPES_BY_BACKEND) == set(get_args(BackendChoice)) - {"auto"}
    assert all(set(v) <= set(get_args(CacheType)) for v in CACHE_TYPES_BY_BACKEND.values())
    assert CACHE_TYPES_BY_BACKEND["exllamav3"] == ("FP16", "Q8", "Q6", "Q4")
    assert CACHE_TYPES_BY_BACKEND["transformers"] == ("FP16",)


def test_the_multi_gpu_mode_is_validated() -> None:
    assert Settings(gpu_split_mode="tensor", backend="exllamav3").gpu_split_mode == "tensor"
    assert Settings(gpu_split_mode="tensor").set_fields() == {"gpu_split_mode": "tensor"}  # auto decides at load
    with pytest.raises(ValueError, match="gpu_split_mode"):
        settings_from_mapping({"gpu_split_mode": "rows"}, "models.json entry m")
    with pytest.raises(ValueError, match="'tensor' .* needs the exllamav3 backend, not exllamav2"):
        settings_from_mapping({"gpu_split_mode": "tensor", "backend": "exllamav2"}, "models.json entry m")
    layer = Settings(backend="exllamav2")
    with pytest.raises(ValueError, match="needs the exllamav3 backend"):
        layer.gpu_split_mode = "tensor"  # the dialog's and Ollama's assignments are checked too


def test_a_models_json_entry_asking_tensor_parallel_of_exllamav2_is_refused_readably(tmp_path: Path) -> None:
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"schema_version": 1, "models": {"m:latest": {
        "model_dir": str(tmp_path), "settings": {"backend": "exllamav2", "gpu_split_mode": "tensor"}}}}))
    with pytest.raises(RegistryError, match="needs the exllamav3 backend"):
        Registry(path).get("m:latest")


def test_across_layers_the_choice_is_checked_at_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(factory, "nvidia_gpu_present", lambda: True)
    exl2 = folder(tmp_path / "exl2", {"quant_method": "exl2", "bits": 4.0})
    layers = SettingsLayers(model=Settings(gpu_split_mode="tensor"))
    with pytest.raises(BackendLoadError, match="'tensor' .* needs the exllamav3 backend, not exllamav2"):
        factory.choose_backend(exl2, layers.resolve().effective)  # auto picked exllamav2 for EXL2
    exl3 = folder(tmp_path / "exl3", {"quant_method": "exl3", "bits": 4.0})
    assert factory.choose_backend(exl3, layers.resolve().effective) == "exllamav3"
    server = SettingsLayers(model=Settings(gpu_split_mode="tensor"), server=Settings(backend="exllamav2"))
    with pytest.raises(BackendLoadError, match="cannot load EXL3"):
        factory.choose_backend(exl3, server.resolve().effective)


@pytest.mark.parametrize("cache", ["FP16", "Q8", "Q6", "Q4"])
def test_exllamav3_takes_every_cache_type(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: str) -> None:
    monkeypatch.setattr(factory, "nvidia_gpu_present", lambda: True)
    exl3 = folder(tmp_path / "exl3", {"quant_method": "exl3", "bits": 4.0})
    settings = SettingsLayers(model=Settings(cache_type=cache)).resolve().effective
    assert factory.choose_backend(exl3, settings) == "exllamav3"


def test_a_quantized_cache_for_the_transformers_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(factory, "nvidia_gpu_present", lambda: False)
    fp16 = folder(tmp_path / "fp16")
    chosen = SettingsLayers(model=Settings(backend="transformers", cache_type="Q4")).resolve().effective
    with pytest.raises(BackendLoadError, match="cache_type Q4 does not fit the transformers backend .*takes FP16"):
        factory.choose_backend(fp16, chosen)
    # picked by auto (a server-wide Q4 meant for the GPU models): the CPU backend keeps its FP16 cache
    auto = SettingsLayers(server=Settings(cache_type="Q4")).resolve().effective
    assert factory.choose_backend(fp16, auto) == "transformers"


def test_the_cli_takes_the_exllamav3_settings() -> None:
    from app.cli.main import add_setting_options, settings_from_args

    parser = argparse.ArgumentParser()
    add_setting_options(parser)
    args = parser.parse_args(["--backend", "exllamav3", "--gpu-split-mode", "tensor", "--cache-type", "Q6",
                              "--gpu-split", "20,24"])
    assert settings_from_args(args).set_fields() == {"backend": "exllamav3", "gpu_split_mode": "tensor",
                                                     "cache_type": "Q6", "gpu_split": "20,24"}
    with pytest.raises(SystemExit):
        parser.parse_args(["--gpu-split-mode", "rows"])


def test_cache_and_chunk_sizes_are_whole_pages() -> None:
    # max_batch contexts and one short slot's pages (2,048 tokens at most, app.engine.backends.slots)
    assert paged_sizes(4096, 8) == (32768 + 2048, 2048)
    assert paged_sizes(1000, 3) == (3072 + 1024, 1024)
    assert paged_sizes(100, 1) == (256 + 256, 256)


def rope(theta: float = 10000.0, scaling: dict | None = None) -> SimpleNamespace:
    """The fields of exllamav3's RopeSettings that apply_rope reads and writes (exllamav3 cannot be
    imported without CUDA: its import builds the extension)."""
    return SimpleNamespace(rope_settings=SimpleNamespace(rope_theta=theta, rope_scaling=scaling, rotary_dim=None,
                                                         head_dim=64, partial_rotary_factor=1.0))


def test_rope_scale_and_alpha_map_to_linear_scaling_and_the_ntk_base() -> None:
    config = rope()
    apply_rope(config, 2.0, 1.0)
    assert config.rope_settings.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    config = rope()
    apply_rope(config, 1.0, 2.0)
    assert config.rope_settings.rope_theta == pytest.approx(10000.0 * 2.0 ** (64 / 62))
    untouched = rope(scaling={"rope_type": "llama3", "factor": 8.0})
    apply_rope(untouched, 1.0, 1.0)
    assert untouched.rope_settings.rope_scaling == {"rope_type": "llama3", "factor": 8.0}
    with pytest.raises(BackendLoadError, match="own RoPE scaling \\(llama3\\)"):
        apply_rope(untouched, 2.0, 1.0)


def test_prompts_arriving_during_generation_are_prefilled_at_every_step() -> None:
    """exllamav3 1.6.5's Generator defaults prefill a prompt that arrives while others generate once every
    fifth step, one prompt at a time; the backend asks for every step, whole chunks, where the version
    takes those options, and passes nothing it does not take."""
    from app.engine.backends.exllamav3_backend import prefill_every_step

    class Generator165:  # the signature's part that matters, as in exllamav3 1.6.5
        def __init__(self, model, cache, tokenizer, max_batch_size=256, max_chunk_size=2048,
                     shared_chunk_size=None, prefill_cooldown=4, max_q_size=8): ...

    class GeneratorOlder:
        def __init__(self, model, cache, tokenizer, max_batch_size=256, max_chunk_size=2048, max_q_size=8): ...

    assert prefill_every_step(Generator165, 2048) == {"prefill_cooldown": 0, "shared_chunk_size": 2048}
    assert prefill_every_step(GeneratorOlder, 2048) == {}
