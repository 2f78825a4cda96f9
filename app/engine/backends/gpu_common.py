"""What the GPU backends (exllamav2, exllamav3) share: the tokenizer probe, and telling out-of-memory
errors and impossible manual GPU splits apart readably."""

from __future__ import annotations

from app.engine.backends.contract import BackendLoadError

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
