"""EXL3 folders: format detection, what the CLI and the registry show, and which backend serves them.

The folders are made here from config files alone (a placeholder weights file: nothing reads it), with
``quantization_config`` as exllamav3 1.6.5's converter writes it (conversion/compile.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from app.cli.main import main
from app.engine.backends import factory
from app.engine.backends.contract import BackendLoadError
from app.engine.catalog.model_folder import inspect_model_folder
from app.engine.catalog.registry import ModelEntry, Registry
from app.engine.settings.schema import Settings

ROOT = Path(__file__).resolve().parent.parent.parent
LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1024, "max_position_embeddings": 2048,
         "torch_dtype": "float16"}
EXL3_QCFG = {"quant_method": "exl3", "version": "1.6.5", "bits": 4.0, "head_bits": 6,
             "calibration": {"rows": 250, "cols": 2048}, "out_scales": "auto", "codebook": "mul1"}


def make_folder(path: Path, quantization_config: dict | None = None, weights: str = "model.safetensors",
                extra_files: dict[str, dict] | None = None) -> Path:
    path.mkdir(parents=True)
    cfg = dict(LLAMA)
    if quantization_config is not None:
        cfg["quantization_config"] = quantization_config
    (path / "config.json").write_text(json.dumps(cfg))
    (path / weights).write_bytes(b"\0" * 64)
    for name, data in (extra_files or {}).items():
        (path / name).write_text(json.dumps(data))
    return path


def exl3_folder(path: Path, bits: float = 4.0) -> Path:
    qcfg = {**EXL3_QCFG, "bits": bits}
    # the converter also writes quantization_config.json (the same dict plus its tensor storage map)
    return make_folder(path, qcfg, extra_files={"quantization_config.json": {**qcfg, "tensor_storage": {}}})


def entry(folder: Path) -> ModelEntry:
    return ModelEntry(model_dir=str(folder), info=inspect_model_folder(folder).to_dict())


def effective(**values: object):
    from app.engine.settings.layers import SettingsLayers

    return SettingsLayers(model=Settings(**values)).resolve().effective


@pytest.mark.parametrize("bits", [4.0, 2.5, 6.25])
def test_exl3_folders_are_recognised_with_their_bits(tmp_path: Path, bits: float) -> None:
    info = inspect_model_folder(exl3_folder(tmp_path / "m", bits))
    assert (info.format, info.bits_per_weight, info.architecture) == ("EXL3", bits, "LlamaForCausalLM")
    assert info.summary().startswith(f"EXL3 {bits:g} bpw, LlamaForCausalLM, context 2048")


def test_an_exl3_requant_of_an_exl2_model_is_exl3(tmp_path: Path) -> None:
    # exllamav3's converter keeps the source's quantization_config under original_quantization_config
    qcfg = {**EXL3_QCFG, "bits": 3.0, "original_quantization_config": {"quant_method": "exl2", "bits": 6.0}}
    info = inspect_model_folder(make_folder(tmp_path / "m", qcfg))
    assert (info.format, info.bits_per_weight) == ("EXL3", 3.0)


def test_exl2_gptq_and_fp16_stay_what_they_are(tmp_path: Path) -> None:
    exl2 = make_folder(tmp_path / "exl2", {"quant_method": "exl2", "bits": 4.65, "head_bits": 6})
    gptq = make_folder(tmp_path / "gptq", extra_files={"quantize_config.json": {"bits": 4, "group_size": 128}})
    fp16 = make_folder(tmp_path / "fp16")
    found = [(i.format, i.bits_per_weight) for i in map(inspect_model_folder, (exl2, gptq, fp16))]
    assert found == [("EXL2", 4.65), ("GPTQ", 4.0), ("FP16", 16.0)]


def test_the_cli_and_the_registry_show_exl3_and_its_bits(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    models = tmp_path / "models.json"
    folder = exl3_folder(tmp_path / "m3", 3.5)
    assert main(["--models", str(models), "add-model", "--no-ollama", "--model-dir", str(folder), "m3:test"]) == 0
    assert "EXL3 3.5 bpw" in capsys.readouterr().out
    info = Registry(models).get("m3:test").info
    assert (info["format"], info["bits_per_weight"]) == ("EXL3", 3.5)
    assert main(["--models", str(models), "models"]) == 0
    assert "EXL3 3.5bpw" in capsys.readouterr().out


@pytest.mark.parametrize(("fmt", "want"), [("EXL3", "exllamav3"), ("EXL2", "exllamav2"), ("GPTQ", "exllamav2")])
def test_auto_picks_the_backend_that_loads_the_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      fmt: str, want: str) -> None:
    monkeypatch.setattr(factory, "nvidia_gpu_present", lambda: True)  # this machine has no GPU to ask
    folders = {"EXL3": lambda p: exl3_folder(p),
               "EXL2": lambda p: make_folder(p, {"quant_method": "exl2", "bits": 5.0}),
               "GPTQ": lambda p: make_folder(p, {"quant_method": "gptq", "bits": 4})}
    assert factory.choose_backend(entry(folders[fmt](tmp_path / "m")), effective()) == want


def fake_package(root: Path, name: str) -> None:
    """An installed-looking package that cannot be imported: choosing a backend must only look it up."""
    (root / name).mkdir(parents=True)
    (root / name / "__init__.py").write_text("raise RuntimeError('imported while choosing a backend')\n")


@pytest.mark.parametrize(("installed", "gpu", "want"), [
    (["exllamav3", "exllamav2"], True, "exllamav3"), (["exllamav2"], True, "exllamav2"),
    (["exllamav3"], True, "exllamav3"), (["exllamav3", "exllamav2"], False, "transformers")])
def test_auto_on_fp16_takes_the_installed_gpu_backend_exllamav3_first(tmp_path: Path, installed: list[str],
                                                                     gpu: bool, want: str) -> None:
    """In a fresh interpreter: the libraries are found on the path, never imported, and neither is torch."""
    for name in installed:
        fake_package(tmp_path / "site", name)
    folder = make_folder(tmp_path / "fp16")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from app.engine.backends import factory; "
            f"factory.nvidia_gpu_present = lambda: {gpu}; "
            "from app.engine.catalog.registry import ModelEntry; "
            "from app.engine.settings.layers import SettingsLayers; "
            "print(factory.choose_backend(ModelEntry(model_dir=sys.argv[2]), SettingsLayers().resolve().effective), "
            "'torch' in sys.modules, 'exllamav2' in sys.modules or 'exllamav3' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "site"), str(folder)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [want, "False", "False"]


def test_auto_on_fp16_without_a_gpu_backend_is_transformers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(factory, "nvidia_gpu_present", lambda: True)
    monkeypatch.setattr(factory, "installed_gpu_backend", lambda: None)
    assert factory.choose_backend(entry(make_folder(tmp_path / "fp16")), effective()) == "transformers"


@pytest.mark.parametrize(("backend", "folder", "words"), [
    ("exllamav3", "exl2", "the exllamav3 backend cannot load EXL2 models"),
    ("exllamav3", "gptq", "the exllamav3 backend cannot load GPTQ models"),
    ("exllamav2", "exl3", "set backend to exllamav3 or auto"),
    ("transformers", "exl3", "EXL3 models need the exllamav3 backend and an NVIDIA GPU")])
def test_a_backend_that_cannot_load_the_format_says_which_one_can(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  backend: str, folder: str, words: str) -> None:
    monkeypatch.setattr(factory, "nvidia_gpu_present", lambda: True)
    made = {"exl2": lambda p: make_folder(p, {"quant_method": "exl2", "bits": 5.0}),
            "gptq": lambda p: make_folder(p, {"quant_method": "gptq", "bits": 4}),
            "exl3": lambda p: exl3_folder(p)}[folder](tmp_path / "m")
    with pytest.raises(BackendLoadError, match=words):
        factory.choose_backend(entry(made), effective(backend=backend))


def test_exl3_without_an_nvidia_gpu_is_a_readable_refusal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(factory, "nvidia_gpu_present", lambda: False)
    with pytest.raises(BackendLoadError, match="EXL3 model for the exllamav3 backend, which needs an NVIDIA GPU"):
        factory.choose_backend(entry(exl3_folder(tmp_path / "m")), effective())


def test_create_backend_builds_exllamav3_in_a_model_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.engine.backends.model_process.client import ProcessBackend

    from app.engine.runtime import launcher

    monkeypatch.setattr(factory, "nvidia_gpu_present", lambda: True)
    monkeypatch.setattr(launcher, "importable_here", lambda backend: True)  # as on a machine that has it
    settings = effective(cache_type="Q6", gpu_split="20,24", gpu_split_mode="tensor", context_length=8192,
                         batch_size=4, rope_alpha=2.0)
    backend = factory.create_backend(entry(exl3_folder(tmp_path / "m")), settings)
    assert isinstance(backend, ProcessBackend) and backend.name == "exllamav3"
    assert backend.target == factory.EXLLAMAV3_TARGET and backend._proc is None  # nothing started before load
    assert backend._kwargs == {"context_length": 8192, "max_batch": 4, "cache_type": "Q6", "gpu_split": "20,24",
                               "split_mode": "tensor", "rope_scale": 1.0, "rope_alpha": 2.0}
    in_process = factory.create_backend_in_process(entry(exl3_folder(tmp_path / "n")), settings)
    assert isinstance(in_process, ProcessBackend)  # a GPU backend never runs in the server's process


def test_the_backend_target_names_a_class_with_the_contract() -> None:
    """The model process imports the target by name: it must resolve, without importing torch or exllamav3."""
    code = ("import importlib, sys; m, c = sys.argv[1].split(':'); cls = getattr(importlib.import_module(m), c); "
            "from app.engine.backends.contract import BackendBase; "
            "print(issubclass(cls, BackendBase), cls.name, 'torch' in sys.modules, 'exllamav3' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, factory.EXLLAMAV3_TARGET], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "exllamav3", "False", "False"]
