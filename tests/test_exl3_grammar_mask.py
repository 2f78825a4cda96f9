"""The grammar mask the exllamav3 backend hands its generator: the packed int32 bitmask exllamav3's job
reads (bit ``i & 31`` of word ``i >> 5`` set: token ``i`` allowed; it unpacks it with numpy's little-endian
bit order), made from the same grammar state the other backends use, on the tiny model's tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from app.engine.constraints.exllamav3_filter import packed_mask
from app.engine.constraints.grammars import json_object_grammar
from app.engine.constraints.masks import ConstraintCompiler


def unpack(mask) -> np.ndarray:
    """exllamav3's reading of a packed mask (generator/job.py, _expand_bitmask)."""
    return np.unpackbits(mask.view(-1).numpy().view(np.uint8), bitorder="little").astype(bool)


def test_the_packed_mask_allows_exactly_the_grammars_tokens(tiny_model_dir: Path) -> None:
    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    compiler = ConstraintCompiler(tiny_model_dir / "tokenizer.json", vocab, [2])
    constraint = compiler.compile(json_object_grammar())
    for step in range(6):
        allowed = constraint.allowed().numpy()
        mask = packed_mask(constraint)
        assert mask.dtype == torch.int32 and mask.shape == (1, -(-vocab // 32))
        bits = unpack(mask)
        assert bits[:vocab].tolist() == allowed.tolist()
        assert not bits[vocab:].any()  # the padding words allow nothing
        assert 0 < allowed.sum() < vocab  # a JSON object constrains every step
        constraint.accept(int(np.flatnonzero(allowed)[step % int(allowed.sum())]))


def test_no_bit_past_the_vocabulary_when_it_is_not_a_multiple_of_32(tiny_model_dir: Path) -> None:
    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"] + 7  # e.g. a model vocab of 32,007
    compiler = ConstraintCompiler(tiny_model_dir / "tokenizer.json", vocab, [2])
    constraint = compiler.compile(json_object_grammar())
    mask = packed_mask(constraint)
    assert mask.shape == (1, -(-vocab // 32))
    bits = unpack(mask)
    assert bits[:vocab].tolist() == constraint.allowed().numpy().tolist() and not bits[vocab:].any()
