"""Validation of a manual gpu_split against the GPUs present (pure logic; CI has no GPU)."""

from __future__ import annotations

import pytest

from app.engine.backends.gpu_common import split_problem
from app.engine.settings.schema import Settings, parse_gpu_split


@pytest.mark.parametrize("split, gpus, message", [
    ([20, 20, 20], [80.0, 80.0], "names 3 GPUs but 2 are present"),
    ([20, 20], [80.0], "names 2 GPUs but 1 is present"),
    ([90], [79.2], "asks 90 GiB of GPU 0, which has 79.2 GiB"),
    ([10, 140], [139.8, 139.8], "asks 140 GiB of GPU 1"),
])
def test_impossible_splits_are_refused_with_the_reason(split, gpus, message) -> None:
    assert message in split_problem(split, gpus)


def test_possible_splits_pass() -> None:
    assert split_problem([20, 24], [79.2, 79.2]) is None
    assert split_problem([70], [79.2, 79.2]) is None  # using fewer GPUs than present is fine


def test_split_syntax() -> None:
    assert parse_gpu_split("20, 24.5") == [20.0, 24.5]
    assert Settings(gpu_split="auto").gpu_split == "auto"
    for bad in ("x", "20;24", "-1,5", ""):
        with pytest.raises(ValueError):
            Settings(gpu_split=bad)


def test_the_extension_build_is_announced_only_when_it_will_happen(tmp_path, monkeypatch) -> None:
    """exllamav2's CUDA extension compiles at first import (minutes); later starts find torch's build."""
    from app.engine.backends.exllamav2_setup import extension_needs_build

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert extension_needs_build()  # no exllamav2 here, nothing built
    from torch.utils.cpp_extension import _get_build_directory

    built = tmp_path / _get_build_directory("exllamav2_ext", verbose=False)
    built.mkdir(parents=True, exist_ok=True)
    (built / "exllamav2_ext.so").write_bytes(b"")
    assert not extension_needs_build()


def test_out_of_memory_at_load_is_told_apart_from_other_load_errors() -> None:
    from app.engine.backends.gpu_common import is_out_of_memory

    # the words exllamav2's autosplit and CUDA's allocator use (the first measured on an H100)
    assert is_out_of_memory(ValueError("Insufficient VRAM for model and cache"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not is_out_of_memory(ValueError("Unsupported model architecture: GPTNeoX"))


def test_the_out_of_memory_advice_names_what_sizes_the_cache() -> None:
    from app.engine.backends.exllamav2_backend import ExLlamaV2Backend

    backend = ExLlamaV2Backend("/models/m", context_length=1_048_576, max_batch=8, cache_type="FP16")
    backend.paged = False  # without flash-attn: one job's cache, the batch size does not count
    unpaged = backend.out_of_memory_message()
    assert "context 1048576 (unpaged" in unpaged and "lower context_length," in unpaged
    assert "batch" not in unpaged
    backend.paged = True
    paged = backend.out_of_memory_message()
    assert "context 1048576, batch 8" in paged and "lower context_length or batch_size" in paged
