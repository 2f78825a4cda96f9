"""exllamav2's cache and chunk sizes: whole 256-token pages whatever context a user sets."""

import pytest

from app.engine.backends.exllamav2_setup import PAGE, cache_sizes
from app.engine.backends.slots import SHORT_SLOTS


@pytest.mark.parametrize("context,batch,paged,cache,chunk", [
    (2048, 32, True, 65536 + 2048, 2048),  # paged: context x batch and the short slot's 2,048 tokens
    (2048, 32, False, 2048, 2048),  # unpaged: one job's context whatever the batch says
    (3000, 4, True, 3072 * 4 + 2048, 2048),  # a context that is not whole pages is rounded up to them
    (1000, 8, True, 1024 * 8 + 1024, 1024),  # the chunk never exceeds one job's cache; nor the short slot's
    (100, 1, False, 256, 256),
])
def test_sizes_are_whole_pages(context: int, batch: int, paged: bool, cache: int, chunk: int) -> None:
    sizes = cache_sizes(context, batch, paged)
    assert (sizes.cache_tokens, sizes.chunk) == (cache, chunk)
    assert sizes.cache_tokens % PAGE == 0 and sizes.chunk % PAGE == 0
    assert sizes.cache_tokens >= context * (batch if paged else 1)


def test_model_input_buffers_hold_a_whole_decode_batch() -> None:
    # the generator asserts config.max_batch_size x max_input_len >= its batch x 8 decode tokens (paged,
    # its batch is batch_size + SHORT_SLOTS)
    for context, batch in [(256, 128), (512, 64), (2048, 256), (4096, 1)]:
        sizes = cache_sizes(context, batch, True)
        slots = batch + SHORT_SLOTS
        assert sizes.config_batch * sizes.chunk >= slots * 8
        assert sizes.config_batch == 1 or (sizes.config_batch - 1) * sizes.chunk < slots * 8


def test_out_of_memory_advice_names_what_the_cache_is_sized_by() -> None:
    from app.engine.backends.exllamav2_backend import ExLlamaV2Backend

    backend = ExLlamaV2Backend("/models/x", context_length=32768, max_batch=16, cache_type="FP16")
    backend.paged = True  # flash-attn present: the cache holds context x batch
    paged = backend.out_of_memory_message()
    assert "context 32768, batch 16" in paged and "lower context_length or batch_size" in paged
    backend.paged = False  # without flash-attn: one job's context, whatever batch_size says
    unpaged = backend.out_of_memory_message()
    assert "unpaged: one job at a time" in unpaged and "batch_size" not in unpaged
    assert "Q4/Q8 cache" in unpaged and "gpu_split" in unpaged


def test_a_backend_says_how_it_batches_before_and_after_flash_attn_is_known() -> None:
    from app.engine.backends.exllamav2_backend import ExLlamaV2Backend
    from app.engine.serving.manager import ModelState

    backend = ExLlamaV2Backend("/models/x", context_length=2048, max_batch=32)
    assert backend.batching == "single"  # until load() finds flash-attn
    state = ModelState("m", "ready", 1.0, "", "exllamav2", "continuous", 0, max_batch=32)
    assert state.batching_summary == "continuous batching (32)"
    assert ModelState("m", "ready", 1.0, "", "exllamav2", "single", 0).batching_summary == "one request at a time"
