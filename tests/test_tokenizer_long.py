"""A long text is tokenized without holding the GIL (encode_batch), with the same ids as encode."""

from __future__ import annotations

from pathlib import Path

from app.engine.catalog.tokenizer import RELEASE_GIL_CHARS, FolderTokenizer


def test_a_long_text_gets_the_same_ids_through_the_path_that_releases_the_gil(tiny_model_dir: Path) -> None:
    tok = FolderTokenizer(tiny_model_dir)
    unit = "<|im_start|>user\nThe quick brown fox — jumps over the lazy dog.<|im_end|>\n"
    text = unit * (RELEASE_GIL_CHARS // len(unit) + 2)
    assert len(text) >= RELEASE_GIL_CHARS
    long_ids = tok.encode_plain(text)
    assert long_ids == tok._tok.encode(text, add_special_tokens=False).ids  # what the GIL-holding call gives
    im_start = tok.token_id("<|im_start|>")
    assert im_start is not None and long_ids.count(im_start) == text.count("<|im_start|>")
    short = unit * 3  # below the threshold: the plain call, the same ids as the start of the long one
    assert tok.encode_plain(short) == long_ids[:len(tok.encode_plain(short))]
