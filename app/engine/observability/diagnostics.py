"""Diagnostics for memory problems: what CUDA tensors are alive and who holds them."""

from __future__ import annotations

import gc
import sys
from typing import Any


def cuda_tensor_census(limit: int = 15) -> dict[str, Any]:
    """The largest live CUDA tensors (after a gc pass) with the types of their referrers.

    Never imports torch: when torch is not loaded there is nothing to count.
    """
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {"tensors": [], "allocated": 0, "reserved": 0}
    gc.collect()
    found = []
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.is_cuda:
                found.append(obj)
        except Exception:  # some objects raise on isinstance checks through proxies
            continue
    found.sort(key=lambda t: t.numel() * t.element_size(), reverse=True)
    out = []
    for t in found[:limit]:
        holders = sorted({type(r).__name__ for r in gc.get_referrers(t) if r is not found})[:5]
        out.append({"shape": list(t.shape), "dtype": str(t.dtype), "bytes": t.numel() * t.element_size(),
                    "held_by": holders})
    return {"tensors": out, "count": len(found), "tensor_bytes": sum(t.numel() * t.element_size() for t in found),
            "allocated": int(torch.cuda.memory_allocated()), "reserved": int(torch.cuda.memory_reserved())}
