"""What the GPU backends (exllamav2, exllamav3) share: a load's failures made readable (and the
half-loaded model unloaded), the fast tokenizer when it agrees with the library's, their GPU memory, and
impossible manual GPU splits told apart readably. torch is imported only inside the functions."""

from __future__ import annotations

import gc
import importlib.util
import logging
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from app.engine.backends.contract import BackendLoadError, LoadCancelled, ProgressFn
from app.engine.catalog.tokenizer import FolderTokenizer, TokenizerError

if TYPE_CHECKING:
    from app.engine.events import StepEvent

log = logging.getLogger(__name__)

PROBE_TEXT = "Héllo wörld, 1234 ✓ 你好 🙂\n\tdef f(x):  return x"


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether a load error is the GPU running out of memory (exllamav2's autosplit raises a plain
    error saying "Insufficient VRAM for model and cache"; CUDA's allocator says "out of memory")."""
    text = str(exc).lower()
    return "insufficient vram" in text or "out of memory" in text


def check_split(split: list[float]) -> None:
    """A manual split must not name more GPUs than exist nor ask for more memory than they have."""
    import torch

    totals = [torch.cuda.get_device_properties(i).total_memory / 1024**3 for i in range(torch.cuda.device_count())]
    problem = split_problem(split, totals)
    if problem:
        raise BackendLoadError(problem)


def split_problem(split: list[float], gpu_gib: list[float]) -> str | None:
    """Why ``split`` (GiB per GPU) cannot work on GPUs with ``gpu_gib`` GiB each, or None when it can."""
    if len(split) > len(gpu_gib):
        return (f"gpu_split names {len(split)} GPUs but {len(gpu_gib)} "
                f"{'is' if len(gpu_gib) == 1 else 'are'} present")
    for i, (want, have) in enumerate(zip(split, gpu_gib)):
        if want > have:
            return f"gpu_split asks {want:g} GiB of GPU {i}, which has {have:.1f} GiB"
    if sum(split) > sum(gpu_gib):
        return f"gpu_split asks {sum(split):g} GiB in all; the GPUs have {sum(gpu_gib):.1f} GiB"
    return None


@contextmanager
def load_failures_readable(backend: Any, torch: Any) -> Iterator[None]:
    """Around a GPU backend's load: whatever fails unloads what was loaded, and comes out as a
    BackendLoadError saying what to do (out of memory: the backend's ``out_of_memory_message()``); a
    cancel stays a LoadCancelled."""
    try:
        yield
    except (LoadCancelled, BackendLoadError):
        backend.unload()
        raise
    except torch.cuda.OutOfMemoryError:
        backend.unload()
        raise BackendLoadError(backend.out_of_memory_message()) from None
    except Exception as exc:
        backend.unload()
        if is_out_of_memory(exc):  # the libraries' automatic splits say so in their own words
            raise BackendLoadError(f"{backend.out_of_memory_message()} ({exc})") from None
        raise BackendLoadError(f"cannot load {backend.model_dir}: {exc}") from None


def agreeing_fast_tokenizer(model_dir: str, slow_encode: Callable[[str], list[int]],
                            library: str) -> FolderTokenizer | None:
    """The folder's tokenizer.json through `tokenizers`, if it gives the same ids as the library's own
    tokenizer (``slow_encode``, special tokens encoded) on probe texts made of this model's special
    tokens and ordinary text; then the server can tokenize without asking the model process."""
    try:
        fast = FolderTokenizer(model_dir)
    except TokenizerError:
        return None
    specials = fast.special_token_texts()[:64]
    probes = [PROBE_TEXT, "".join(specials), PROBE_TEXT.join(specials[:8]), " " + PROBE_TEXT, "\n\n"]
    for text in probes:
        if slow_encode(text) != fast.encode_plain(text):
            log.info("tokenizer.json encodes differently from %s's tokenizer; using %s's", library, library)
            return None
    return fast


def extension_needs_build(library: str, extension: str) -> bool:
    """Whether importing ``library`` will compile its CUDA ``extension`` (minutes): not installed prebuilt
    and not in torch's JIT build cache from an earlier start."""
    if library in sys.modules or importlib.util.find_spec(extension) is not None:
        return False
    try:
        from torch.utils.cpp_extension import _get_build_directory  # where torch keeps JIT builds

        folder = Path(_get_build_directory(extension, verbose=False))
        return not any(folder.glob(f"{extension}*.so")) and not any(folder.glob(f"{extension}*.pyd"))
    except Exception:  # noqa: BLE001 - torch's private helper moved: assume the worst, say "first time"
        return True


def announce_extension_build(progress: ProgressFn, library: str, extension: str) -> bool:
    """Say so (progress and log) when importing ``library`` is about to build its CUDA extension."""
    if not extension_needs_build(library, extension):
        return False
    progress(0.0, f"building {library}'s CUDA extension (first run only; this takes several minutes)")
    log.warning("building %s's CUDA extension; the first start takes several minutes", library)
    return True


def free_gpu_memory() -> None:
    """Collect what was let go, then hand torch's freed blocks back to the driver (once per unload)."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def unload_model(owner: Any, attr: str = "_model") -> None:
    """Take the library model out of ``owner.attr`` and unload it (a half-loaded one may fail: its memory
    then goes with gc, this being its last reference), then hand the freed blocks back to the driver."""
    model = getattr(owner, attr)
    setattr(owner, attr, None)
    if model is not None:
        try:
            model.unload()
        except Exception:  # noqa: BLE001
            log.debug("model.unload() failed", exc_info=True)
    del model
    free_gpu_memory()


def cuda_memory() -> dict[str, int]:
    """torch's reserved and allocated bytes per visible GPU (empty without torch or CUDA)."""
    try:
        import torch
    except ImportError:
        return {}
    if not torch.cuda.is_available():
        return {}
    out: dict[str, int] = {}
    for i in range(torch.cuda.device_count()):
        out[f"cuda:{i}"] = int(torch.cuda.memory_reserved(i))
        out[f"cuda:{i}:allocated"] = int(torch.cuda.memory_allocated(i))
    return out


def fault_of(exc: BaseException) -> str | None:
    """Whose fault a job's refusal at submit is: "request" for a grammar the engine refuses (the API answers
    400), None for anything else (a server error)."""
    from app.engine.constraints.grammars import GrammarError

    return "request" if isinstance(exc, GrammarError) else None


def refusal(job_id: int, exc: BaseException) -> StepEvent:
    """The event that ends one job a GPU backend could not start (its grammar refused, exllamav2/3's
    reason), with whose fault it was."""
    from app.engine.events import StepEvent

    return StepEvent(job_id, "", 0, True, "error", str(exc) or type(exc).__name__, error_kind=fault_of(exc))
