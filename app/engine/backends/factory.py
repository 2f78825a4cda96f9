"""Pick and build the backend for a model (not loaded yet)."""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from functools import lru_cache
from pathlib import Path

from app.engine.backends.contract import Backend, BackendLoadError
from app.engine.catalog.model_folder import ModelFolderError, inspect_model_folder
from app.engine.catalog.registry import ModelEntry
from app.engine.settings.layers import EffectiveSettings
from app.engine.settings.schema import backend_fit_problem

log = logging.getLogger(__name__)
EXLLAMAV2_TARGET = "app.engine.backends.exllamav2_backend:ExLlamaV2Backend"
EXLLAMAV3_TARGET = "app.engine.backends.exllamav3_backend:ExLlamaV3Backend"
TRANSFORMERS_TARGET = "app.engine.backends.transformers_backend:TransformersBackend"
#: the folder formats each backend loads (exllamav3 cannot load EXL2 or GPTQ, exllamav2 cannot load EXL3)
LOADS = {"exllamav3": ("EXL3", "FP16"), "exllamav2": ("EXL2", "GPTQ", "FP16"), "transformers": ("FP16",)}
GPU_BACKENDS = ("exllamav3", "exllamav2")


@lru_cache(maxsize=1)
def nvidia_gpu_present() -> bool:
    """Whether this machine has an NVIDIA driver with a device, asked without importing torch (the server's
    process never needs torch for a GPU model: the model process imports it). Answered from the
    driver's device files on Linux, its library on Windows; torch's answer when torch is already here."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return bool(torch.cuda.is_available())
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    if sys.platform.startswith("linux"):
        return Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia/version").exists()
    if sys.platform == "win32":
        import ctypes.util

        return ctypes.util.find_library("nvcuda") is not None
    return False


def installed_gpu_backend() -> str | None:
    """The GPU backend whose library is installed, exllamav3 first, or None; asked with find_spec, which
    imports nothing (the library and torch are imported only in the model process)."""
    for name in GPU_BACKENDS:
        try:
            if importlib.util.find_spec(name) is not None:
                return name
        except (ImportError, ValueError):  # a broken install: as good as none
            continue
    from app.engine.runtime.layout import Runtime

    return next((name for name in GPU_BACKENDS if Runtime().has(name)), None)  # installed as a runtime


def auto_backend(fmt: str) -> str:
    """What ``backend: auto`` picks for a folder of format ``fmt``: exllamav3 for EXL3, exllamav2 for EXL2
    and GPTQ, and for FP16 the installed GPU backend on an NVIDIA machine (exllamav3 first), else transformers."""
    if fmt == "EXL3":
        return "exllamav3"
    if fmt in ("EXL2", "GPTQ"):
        return "exllamav2"
    return (installed_gpu_backend() if nvidia_gpu_present() else None) or "transformers"


def choose_backend(entry: ModelEntry, settings: EffectiveSettings) -> str:
    fmt = entry.info.get("format")
    if fmt is None:
        try:
            fmt = inspect_model_folder(entry.model_dir).format
        except ModelFolderError as exc:
            raise BackendLoadError(str(exc)) from None
    explicit = settings.backend != "auto"
    choice: str = settings.backend if explicit else auto_backend(fmt)
    if fmt not in LOADS.get(choice, ("FP16",)):
        needs = "exllamav3" if fmt == "EXL3" else "exllamav2"
        if choice == "transformers":
            raise BackendLoadError(f"{fmt} models need the {needs} backend and an NVIDIA GPU; the CPU "
                                   "backend can only serve FP16 Hugging Face folders")
        raise BackendLoadError(f"the {choice} backend cannot load {fmt} models ({entry.model_dir}); "
                               f"set backend to {needs} or auto")
    if choice in GPU_BACKENDS and not nvidia_gpu_present():
        raise BackendLoadError(
            f"{entry.model_dir} is an {fmt} model for the {choice} backend, which needs an NVIDIA GPU with CUDA "
            "(none was found). The CPU (transformers) backend can serve FP16 Hugging Face folders.")
    problem = backend_fit_problem(choice, settings.cache_type, settings.gpu_split_mode, explicit=explicit)
    if problem:
        raise BackendLoadError(problem)
    return choice


def create_backend(entry: ModelEntry, settings: EffectiveSettings) -> Backend:
    """A backend for ``entry``, not yet loaded, in a model process of its own.

    Both backends run there: the step loop does not share the GIL with the server (see
    model_process), and unloading ends the process, which gives back every byte its libraries kept
    (torch is never imported in the server's process: a CPU model left the app at ~570 MB after
    unload when it ran here)."""
    from app.engine.backends.model_process.client import ProcessBackend

    from app.engine.runtime.launcher import launcher_for

    choice = _checked_choice(entry, settings)
    launcher = launcher_for(choice)  # this interpreter's .venv, or the installed runtime's Python
    if choice == "exllamav2":
        return ProcessBackend(EXLLAMAV2_TARGET, "exllamav2", entry.model_dir,
                              context_length=settings.context_length, max_batch=settings.batch_size,
                              cache_type=settings.cache_type, gpu_split=settings.gpu_split,
                              rope_scale=settings.rope_scale, rope_alpha=settings.rope_alpha, launcher=launcher)
    if choice == "exllamav3":
        return ProcessBackend(EXLLAMAV3_TARGET, "exllamav3", entry.model_dir,
                              context_length=settings.context_length, max_batch=settings.batch_size,
                              cache_type=settings.cache_type, gpu_split=settings.gpu_split,
                              split_mode=settings.gpu_split_mode, rope_scale=settings.rope_scale,
                              rope_alpha=settings.rope_alpha, launcher=launcher)
    return ProcessBackend(TRANSFORMERS_TARGET, "transformers", entry.model_dir,
                          context_length=settings.context_length, max_batch=settings.batch_size,
                          rope_scale=settings.rope_scale, launcher=launcher)


def create_backend_in_process(entry: ModelEntry, settings: EffectiveSettings) -> Backend:
    """The transformers backend in the server's own process (a debugger sees its internals; its memory
    stays with the server after unload). GPU models (exllamav2, exllamav3) always get a model process."""
    if _checked_choice(entry, settings) in GPU_BACKENDS:
        return create_backend(entry, settings)
    from app.engine.backends.transformers_backend import TransformersBackend

    return TransformersBackend(entry.model_dir, context_length=settings.context_length,
                               max_batch=settings.batch_size, rope_scale=settings.rope_scale)


def _checked_choice(entry: ModelEntry, settings: EffectiveSettings) -> str:
    if not Path(entry.model_dir).is_dir():
        raise BackendLoadError(f"model folder {entry.model_dir} does not exist any more")
    return choose_backend(entry, settings)
