"""Where a runtime lives, what goes into it, and which of its steps are done (one marker file per step)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import platformdirs

from app.paths import APP_NAME

#: the torch release the app is tested with (scripts/dev.py pins the same one)
TORCH = "torch==2.13.0"
#: PyTorch's index of CPU-only builds (PyPI's Linux torch is the CUDA build: gigabytes more)
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
#: PyTorch's index of CUDA builds for Windows, where PyPI's torch is the CPU build (untested)
WINDOWS_CUDA_TORCH_INDEX = "https://download.pytorch.org/whl/cu128"
#: what the model process imports from the app's own dependencies (pyproject's, without Qt and the server)
ENGINE_PACKAGES = ("jinja2>=3.1", "tokenizers>=0.15", "safetensors>=0.4", "filelock>=3.12", "psutil>=5.9",
                   "llguidance>=1.0", "platformdirs>=4", "pydantic>=2.6", "numpy")
#: each backend's own library (pyproject's extras, without torch)
BACKEND_PACKAGES = {"transformers": ("transformers>=4.45",), "exllamav2": ("exllamav2>=0.2.8",),
                    "exllamav3": ("exllamav3>=1.6.5",)}
#: the module whose presence says that a backend's library is installed
BACKEND_MODULES = {"transformers": "transformers", "exllamav2": "exllamav2", "exllamav3": "exllamav3"}
STEPS = ("venv", "torch", "engine")


def runtime_root() -> Path:
    """``$EXLLAMA_TRAY_RUNTIME_DIR``, else ``runtime`` in the user's data folder
    (``~/.local/share/exllama-tray/runtime`` on Linux)."""
    env = os.environ.get("EXLLAMA_TRAY_RUNTIME_DIR")
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False)) / "runtime"


def steps_for(backend: str) -> tuple[str, ...]:
    """The install steps of ``backend``'s runtime, in order (the first three are shared by all backends)."""
    if backend not in BACKEND_PACKAGES:
        raise ValueError(f"unknown backend {backend!r}: one of {', '.join(BACKEND_PACKAGES)}")
    return (*STEPS, f"backend-{backend}")


@dataclass
class RuntimeStatus:
    """What :meth:`Runtime.status` reports (also ``runtime status`` on the command line)."""

    root: str
    python: str | None
    backends: list[str] = field(default_factory=list)
    done_steps: list[str] = field(default_factory=list)
    partial_steps: list[str] = field(default_factory=list)
    torch: str | None = None
    torch_index: str | None = None
    size_bytes: int = 0


class Runtime:
    """The runtime folder ``root``: a virtual environment plus ``steps/`` (``NAME.done`` for a finished
    step, ``NAME.partial`` for one that was cancelled or failed) and ``runtime.json`` (how it was made)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else runtime_root()
        self.venv = self.root / "venv"
        self.steps_dir = self.root / "steps"

    @property
    def python(self) -> Path:
        if sys.platform == "win32":
            return self.venv / "Scripts" / "python.exe"
        return self.venv / "bin" / "python"

    def is_done(self, step: str) -> bool:
        return (self.steps_dir / f"{step}.done").is_file()

    def mark(self, step: str, state: str) -> None:
        """Record ``step`` as ``"partial"`` (started, cancelled or failed) or ``"done"``."""
        self.steps_dir.mkdir(parents=True, exist_ok=True)
        other = "partial" if state == "done" else "done"
        (self.steps_dir / f"{step}.{other}").unlink(missing_ok=True)
        (self.steps_dir / f"{step}.{state}").write_text("", encoding="utf-8")

    def has(self, backend: str) -> bool:
        """Whether ``backend``'s runtime is completely installed here."""
        return self.python.exists() and all(self.is_done(step) for step in steps_for(backend))

    def manifest(self) -> dict:
        try:
            return json.loads((self.root / "runtime.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def write_manifest(self, **values: object) -> None:
        data = {**self.manifest(), **values}
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / "runtime.json.tmp"
        tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
        tmp.replace(self.root / "runtime.json")

    def status(self) -> RuntimeStatus:
        done = sorted(p.stem for p in self.steps_dir.glob("*.done")) if self.steps_dir.is_dir() else []
        partial = sorted(p.stem for p in self.steps_dir.glob("*.partial")) if self.steps_dir.is_dir() else []
        manifest = self.manifest()
        return RuntimeStatus(root=str(self.root), python=str(self.python) if self.python.exists() else None,
                             backends=[b for b in BACKEND_PACKAGES if self.has(b)], done_steps=done,
                             partial_steps=partial, torch=manifest.get("torch"),
                             torch_index=manifest.get("torch_index"), size_bytes=folder_size(self.root))

    def remove(self) -> bool:
        """Delete the whole runtime; whether there was one."""
        if not self.root.exists():
            return False
        shutil.rmtree(self.root)
        return True


def folder_size(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                continue
    return total
