"""What the GPU backends share, on CPU: a load's failures come out readable with the half-loaded model
unloaded, the fast tokenizer is taken only when it agrees with the library's, and a model is unloaded
through its own unload even when that fails."""

from __future__ import annotations

import types
from pathlib import Path

import pytest

from app.engine.backends.contract import BackendLoadError, LoadCancelled
from app.engine.backends.gpu_common import agreeing_fast_tokenizer, load_failures_readable, unload_model
from app.engine.catalog.tokenizer import FolderTokenizer


class FakeOOM(RuntimeError):
    pass


TORCH = types.SimpleNamespace(cuda=types.SimpleNamespace(OutOfMemoryError=FakeOOM))


class HalfLoaded:
    model_dir = "/models/big"

    def __init__(self) -> None:
        self.unloads = 0

    def unload(self) -> None:
        self.unloads += 1

    def out_of_memory_message(self) -> str:
        return "out of GPU memory loading /models/big: lower context_length"


@pytest.mark.parametrize("raised, kind, text", [
    (FakeOOM("CUDA out of memory"), BackendLoadError, "out of GPU memory loading /models/big: lower context_length"),
    (RuntimeError("Insufficient VRAM for model and cache"), BackendLoadError,
     "lower context_length (Insufficient VRAM for model and cache)"),
    (ValueError("bad tensor shape"), BackendLoadError, "cannot load /models/big: bad tensor shape"),
    (LoadCancelled("load cancelled"), LoadCancelled, "load cancelled"),
    (BackendLoadError("gpu_split names 3 GPUs"), BackendLoadError, "gpu_split names 3 GPUs"),
])
def test_every_load_failure_unloads_and_says_what_to_do(raised: Exception, kind: type, text: str) -> None:
    backend = HalfLoaded()
    with pytest.raises(kind) as info:
        with load_failures_readable(backend, TORCH):
            raise raised
    assert text in str(info.value)
    assert backend.unloads == 1


def test_a_load_that_works_unloads_nothing() -> None:
    backend = HalfLoaded()
    with load_failures_readable(backend, TORCH):
        pass
    assert backend.unloads == 0


def test_the_fast_tokenizer_is_taken_only_when_it_agrees(tiny_model_dir: Path) -> None:
    reference = FolderTokenizer(str(tiny_model_dir))
    same = agreeing_fast_tokenizer(str(tiny_model_dir), reference.encode_plain, "testlib")
    assert same is not None and same.encode_plain("hello world") == reference.encode_plain("hello world")
    off_by_one = agreeing_fast_tokenizer(str(tiny_model_dir), lambda t: [i + 1 for i in reference.encode_plain(t)],
                                         "testlib")
    assert off_by_one is None
    assert agreeing_fast_tokenizer("/nonexistent/folder", reference.encode_plain, "testlib") is None


def test_unload_model_takes_the_model_off_its_owner_even_when_its_unload_fails() -> None:
    class Model:
        def __init__(self, fails: bool) -> None:
            self.fails, self.unloaded = fails, False

        def unload(self) -> None:
            self.unloaded = True
            if self.fails:
                raise RuntimeError("half-loaded module")

    for fails in (False, True):
        model = Model(fails)
        owner = types.SimpleNamespace(_model=model)
        unload_model(owner)
        assert owner._model is None and model.unloaded
    unload_model(types.SimpleNamespace(_model=None))  # nothing loaded: nothing to do
