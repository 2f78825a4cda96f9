"""Pick and build the backend for a model (not loaded yet)."""

from __future__ import annotations

import logging
import os
import sys
from functools import lru_cache
from pathlib import Path

from app.engine.backends.contract import Backend, BackendLoadError
from app.engine.catalog.model_folder import ModelFolderError, inspect_model_folder
from app.engine.catalog.registry import ModelEntry
from app.engine.settings.layers import EffectiveSettings

log = logging.getLogger(__name__)
EXLLAMAV2_TARGET = "app.engine.backends.exllamav2_backend:ExLlamaV2Backend"
TRANSFORMERS_TARGET = "app.engine.backends.transformers_backend:TransformersBackend"


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


def choose_backend(entry: ModelEntry, settings: EffectiveSettings) -> str:
    fmt = entry.info.get("format")
    if fmt is None:
        try:
            fmt = inspect_model_folder(entry.model_dir).format
        except ModelFolderError as exc:
            raise BackendLoadError(str(exc)) from None
    choice: str = settings.backend
    if choice == "auto":
        choice = "exllamav2" if fmt in ("EXL2", "GPTQ") else "transformers"
    if choice == "transformers" and fmt in ("EXL2", "GPTQ", "EXL3"):
        raise BackendLoadError(f"{fmt} models need the exllamav2 backend and an NVIDIA GPU; the CPU "
                               "backend can only serve FP16 Hugging Face folders")
    if choice == "exllamav2" and not nvidia_gpu_present():
        raise BackendLoadError(
            f"{entry.model_dir} is an {fmt} model, which needs an NVIDIA GPU with CUDA (none was found). "
            "The CPU (transformers) backend can serve FP16 Hugging Face folders.")
    return choice


def create_backend(entry: ModelEntry, settings: EffectiveSettings) -> Backend:
    """A backend for ``entry``, not yet loaded, in a model process of its own.

    Both backends run there: the step loop does not share the GIL with the server (see
    model_process), and unloading ends the process, which gives back every byte its libraries kept
    (torch is never imported in the server's process: a CPU model left the app at ~570 MB after
    unload when it ran here)."""
    from app.engine.backends.model_process.client import ProcessBackend

    choice = _checked_choice(entry, settings)
    if choice == "exllamav2":
        return ProcessBackend(EXLLAMAV2_TARGET, "exllamav2", entry.model_dir,
                              context_length=settings.context_length, max_batch=settings.batch_size,
                              cache_type=settings.cache_type, gpu_split=settings.gpu_split,
                              rope_scale=settings.rope_scale, rope_alpha=settings.rope_alpha)
    return ProcessBackend(TRANSFORMERS_TARGET, "transformers", entry.model_dir,
                          context_length=settings.context_length, max_batch=settings.batch_size,
                          rope_scale=settings.rope_scale)


def create_backend_in_process(entry: ModelEntry, settings: EffectiveSettings) -> Backend:
    """The transformers backend in the server's own process (a debugger sees its internals; its memory
    stays with the server after unload). exllamav2 models always get a model process."""
    if _checked_choice(entry, settings) == "exllamav2":
        return create_backend(entry, settings)
    from app.engine.backends.transformers_backend import TransformersBackend

    return TransformersBackend(entry.model_dir, context_length=settings.context_length,
                               max_batch=settings.batch_size, rope_scale=settings.rope_scale)


def _checked_choice(entry: ModelEntry, settings: EffectiveSettings) -> str:
    if not Path(entry.model_dir).is_dir():
        raise BackendLoadError(f"model folder {entry.model_dir} does not exist any more")
    return choose_backend(entry, settings)
