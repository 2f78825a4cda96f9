"""exllamav2's set-up, apart from the backend: whether paged mode is possible (flash-attn), whether the
first import will build its CUDA extension, and the cache and prefill sizes in whole pages."""

from __future__ import annotations

import importlib.util
import logging
from typing import NamedTuple

from app.engine.backends import gpu_common
from app.engine.backends.contract import ProgressFn
from app.engine.backends.slots import SHORT_SLOTS, short_reserve_tokens

log = logging.getLogger(__name__)

MAX_CHUNK = 2048
PAGE = 256  # exllamav2's page: its cache length (paged or not) and, paged, its prefill chunk are multiples
MAX_Q = 8  # tokens a job may pass in one decode step (the generator's default max_q_size)


def flash_attn_ok() -> bool:
    """Whether flash-attn >= 2.5.7 is importable (paged mode needs it)."""
    if importlib.util.find_spec("flash_attn") is None:
        return False
    try:
        import flash_attn
    except Exception:  # a broken flash-attn build raises all sorts of errors
        return False
    parts = [int(p) for p in flash_attn.__version__.split(".")[:3] if p.isdigit()]
    return tuple(parts) >= (2, 5, 7)


def extension_needs_build() -> bool:
    """Whether importing exllamav2 will compile its CUDA extension (minutes)."""
    return gpu_common.extension_needs_build("exllamav2", "exllamav2_ext")


def announce_extension_build(progress: ProgressFn) -> bool:
    """Say so (progress and log) when importing exllamav2 is about to build its extension."""
    return gpu_common.announce_extension_build(progress, "exllamav2", "exllamav2_ext")


class CacheSizes(NamedTuple):
    #: the cache's length: one job's context; paged, context x batch and the short slots' pages
    cache_tokens: int
    chunk: int  # the most prompt tokens one prefill step takes (the model's max_input_len)
    config_batch: int  # the model config's max_batch_size, so that the generator's batch x MAX_Q fits its input buffers


def cache_sizes(context_length: int, max_batch: int, paged: bool) -> CacheSizes:
    """exllamav2's sizes for a context and batch: whole pages (its generator asserts multiples of 256);
    paged, the generator's batch is ``max_batch`` + SHORT_SLOTS (app.engine.backends.slots)."""
    per_job = -(-context_length // PAGE) * PAGE
    chunk = min(MAX_CHUNK, per_job)
    if not paged:
        return CacheSizes(per_job, chunk, max(1, -(-MAX_Q // chunk)))
    tokens = per_job * max_batch + short_reserve_tokens(context_length, PAGE)
    return CacheSizes(tokens, chunk, max(1, -(-(max_batch + SHORT_SLOTS) * MAX_Q // chunk)))
