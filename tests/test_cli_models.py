from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from app.cli.main import main
from app.engine.catalog.model_folder import inspect_model_folder
from app.engine.catalog.registry import Registry

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)


def test_detects_tiny_fp16_model(tiny_model_dir: Path) -> None:
    info = inspect_model_folder(tiny_model_dir)
    assert info.format == "FP16" and info.bits_per_weight == 32
    assert info.architecture == "LlamaForCausalLM"
    assert info.context_length == 2048 and info.has_chat_template
    assert info.size_bytes > 100_000


def _fake_quant_folder(src: Path, dst: Path, extra: dict, extra_file: tuple[str, dict] | None = None) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(extra)
    (dst / "config.json").write_text(json.dumps(cfg))
    if extra_file:
        (dst / extra_file[0]).write_text(json.dumps(extra_file[1]))
    return dst


def test_detects_exl2_and_gptq(tiny_model_dir: Path, tmp_path: Path) -> None:
    exl2 = _fake_quant_folder(tiny_model_dir, tmp_path / "exl2",
                              {"quantization_config": {"quant_method": "exl2", "bits": 4.65, "head_bits": 6}})
    info = inspect_model_folder(exl2)
    assert (info.format, info.bits_per_weight) == ("EXL2", 4.65)
    gptq = _fake_quant_folder(tiny_model_dir, tmp_path / "gptq", {},
                              ("quantize_config.json", {"bits": 4, "group_size": 128}))
    assert (inspect_model_folder(gptq).format, inspect_model_folder(gptq).bits_per_weight) == ("GPTQ", 4.0)


def test_add_list_remove_through_the_cli(tiny_model_dir: Path, models_path: Path, capsys) -> None:
    rc = main(["--models", str(models_path), "add-model", "--no-ollama", "--model-dir", str(tiny_model_dir),
               "--context-length", "512", "--stop", "END", "--stop", "STOP", "--temperature", "0.3", "tiny:test"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "added tiny:test" in out and "FP16" in out
    e = Registry(models_path).get("tiny:test")
    assert e.settings.set_fields() == {"context_length": 512, "stop": ["END", "STOP"], "temperature": 0.3}
    assert e.info["format"] == "FP16"
    assert main(["--models", str(models_path), "models"]) == 0
    listing = capsys.readouterr().out
    assert "tiny:test" in listing and "512" in listing and str(tiny_model_dir) in listing
    assert main(["--models", str(models_path), "remove-model", "tiny:test"]) == 0
    assert Registry(models_path).names() == []


def test_missing_folder_in_listing_is_flagged(tiny_model_dir: Path, tmp_path: Path, models_path: Path,
                                              capsys) -> None:
    copy = tmp_path / "gone"
    shutil.copytree(tiny_model_dir, copy)
    assert main(["--models", str(models_path), "add-model", "--no-ollama", "--model-dir", str(copy), "gone"]) == 0
    shutil.rmtree(copy)
    main(["--models", str(models_path), "models"])
    assert "(missing)" in capsys.readouterr().out


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "nope", "does not exist"),
    (lambda p: p, "config.json is missing"),
    (lambda p: (p / "config.json").write_text("{oops") and p, "not valid JSON"),
])
def test_add_model_bad_folder_exits_nonzero_with_message(tmp_path: Path, models_path: Path, make,
                                                         message: str) -> None:
    folder = make(tmp_path)
    res = run_cli("--models", str(models_path), "add-model", "--no-ollama", "--model-dir", str(folder), "x")
    assert res.returncode == 2
    assert res.stderr.startswith("error: ") and message in res.stderr
    assert "Traceback" not in res.stderr
    assert not models_path.exists()


def test_invalid_override_is_refused(tiny_model_dir: Path, models_path: Path) -> None:
    res = run_cli("--models", str(models_path), "add-model", "--no-ollama", "--model-dir", str(tiny_model_dir),
                  "--top-p", "7", "x")
    assert res.returncode == 2 and "top_p" in res.stderr and not models_path.exists()


def test_every_subcommand_has_help() -> None:
    for sub in ("serve", "add-model", "models", "remove-model", "prompt"):
        res = run_cli(sub, "--help")
        assert res.returncode == 0 and "usage:" in res.stdout
    assert "--context-length" in run_cli("serve", "--help").stdout


def test_input_edges_get_readable_errors_and_nothing_is_registered(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Issue #15 item 7: each of these ended in a traceback, served on, or was registered."""
    models = str(tmp_path / "models.json")
    out = run_cli("--models", models, "serve", "--port", "99999")
    assert out.returncode == 2 and "port must be 0-65535" in out.stderr and "Traceback" not in out.stderr
    out = run_cli("--models", models, "serve", "--port", "0", "--model", "nosuch")
    assert out.returncode == 2 and "'nosuch' does not exist" in out.stderr and "serving" not in out.stderr
    for bad in ("bad name!", "../etc", "a:b:c"):
        out = run_cli("--models", models, "add-model", "--no-ollama", "--model-dir", str(tiny_model_dir), bad)
        assert out.returncode == 2 and f"model name {bad!r}" in out.stderr and "Traceback" not in out.stderr, bad
    assert not (tmp_path / "models.json").exists() or "etc" not in (tmp_path / "models.json").read_text()
    out = run_cli("--models", models, "add-model", "--no-ollama", "--model-dir", str(tiny_model_dir), "team/tiny:v2")
    assert out.returncode == 0, out.stderr
    out = run_cli("models", "--models", models)  # the option after the command works too
    assert out.returncode == 0 and "team/tiny:v2" in out.stdout
