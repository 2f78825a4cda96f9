"""Inspect a model folder: format (EXL2 / EXL3 / GPTQ / FP16), bits per weight, architecture, context, size."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

ModelFormat = Literal["EXL2", "EXL3", "GPTQ", "FP16"]
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


class ModelFolderError(ValueError):
    """The folder is not a usable model folder; the message says why."""


@dataclass(frozen=True)
class ModelInfo:
    path: str
    format: ModelFormat
    bits_per_weight: float
    architecture: str
    context_length: int | None
    size_bytes: int
    has_chat_template: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        ctx = self.context_length if self.context_length is not None else "?"
        return (f"{self.format} {self.bits_per_weight:g} bpw, {self.architecture}, context {ctx}, "
                f"{format_size(self.size_bytes)}")


def format_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ModelFolderError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFolderError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ModelFolderError(f"{path} must hold a JSON object")
    return data


def inspect_model_folder(folder: str | Path) -> ModelInfo:
    """Validate ``folder`` and describe the model in it, or raise ModelFolderError."""
    path = Path(folder).expanduser()
    if not path.exists():
        raise ModelFolderError(f"model folder {path} does not exist")
    if not path.is_dir():
        raise ModelFolderError(f"{path} is not a folder")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelFolderError(f"{path} is not a model folder: config.json is missing")
    config = _read_json(config_path)
    files = [p for p in path.iterdir() if p.is_file()]
    if not any(p.suffix in WEIGHT_SUFFIXES for p in files):
        raise ModelFolderError(f"{path} has config.json but no weight files (*.safetensors, *.bin)")

    fmt, bits = _detect_format(path, config)
    arch = (config.get("architectures") or [config.get("model_type") or "unknown"])[0]
    ctx = config.get("max_position_embeddings") or config.get("max_sequence_length") or config.get("n_positions")
    tok_cfg = path / "tokenizer_config.json"
    has_template = (path / "chat_template.jinja").is_file()
    if tok_cfg.is_file() and not has_template:
        try:
            has_template = bool(_read_json(tok_cfg).get("chat_template"))
        except ModelFolderError:
            has_template = False
    return ModelInfo(
        path=str(path.resolve()),
        format=fmt,
        bits_per_weight=bits,
        architecture=str(arch),
        context_length=int(ctx) if isinstance(ctx, int) else None,
        size_bytes=sum(p.stat().st_size for p in files),
        has_chat_template=has_template,
    )


def _detect_format(path: Path, config: dict[str, Any]) -> tuple[ModelFormat, float]:
    qcfg = config.get("quantization_config")
    if isinstance(qcfg, dict):
        method = str(qcfg.get("quant_method", "")).lower()
        if method == "exl2":
            return "EXL2", float(qcfg.get("bits", 0) or 0)
        if method == "exl3":
            return "EXL3", float(qcfg.get("bits", 0) or 0)
        if method == "gptq":
            return "GPTQ", float(qcfg.get("bits", 4) or 4)
    gptq = path / "quantize_config.json"
    if gptq.is_file():
        return "GPTQ", float(_read_json(gptq).get("bits", 4) or 4)
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "float16")
    return "FP16", 32.0 if dtype == "float32" else 16.0
