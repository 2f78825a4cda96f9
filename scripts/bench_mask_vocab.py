#!/usr/bin/env python3
"""What a grammar costs per token at real vocabulary sizes (32k, 128k, 152k), on the CPU.

No real tokenizer can be downloaded here, so each vocabulary is a synthetic byte-level BPE tokenizer.json:
the 256 byte tokens plus random words of 2-9 characters (half of them with a leading space) up to the size
asked, no merges (the grammar engine reads only each token's bytes). For each size: the time to build the
grammar engine's view of the tokenizer, then for three JSON schemas of the tests the compile time and, over
up to 64 tokens of a random walk through what the grammar allows, the mask time (p50, max) and the time to
feed a token. The first mask of the process is timed on its own: the grammar engine's one-time start-up.

Usage: python scripts/bench_mask_vocab.py [--vocabs 32000 128256 151936]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.engine.constraints.grammars import json_schema_grammar  # noqa: E402
from app.engine.constraints.masks import ConstraintCompiler  # noqa: E402
from tests.test_structured_output import SCHEMAS  # noqa: E402

TIMED = ("nested", "array_of_objects", "number_ranges")
LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_{}[]\":,. -"


def byte_chars() -> dict[int, str]:
    """The byte-level BPE alphabet: each byte as the printable character tokenizers use for it."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, extra = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def write_tokenizer(vocab: int, path: Path, seed: int = 0) -> None:
    alphabet, rng = byte_chars(), random.Random(seed)
    tokens = [alphabet[b] for b in range(256)]
    seen = set(tokens)
    while len(tokens) < vocab:
        word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(2, 9)))
        text = "".join(alphabet[b] for b in ((" " if rng.random() < 0.5 else "") + word).encode())
        if text not in seen:
            seen.add(text)
            tokens.append(text)
    level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    path.write_text(json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
        "pre_tokenizer": level, "post_processor": None, "decoder": level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": []}}))


def walk(compiler: ConstraintCompiler, schema: dict, steps: int, seed: int) -> dict[str, float]:
    import numpy as np

    started = time.perf_counter()
    constraint = compiler.compile(json_schema_grammar(schema))
    compile_s = time.perf_counter() - started
    rng, masks, feeds = np.random.default_rng(seed), [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        allowed = constraint.allowed()
        masks.append(time.perf_counter() - t0)
        choices = np.flatnonzero(allowed.numpy())
        if constraint.done or not len(choices):
            break
        t0 = time.perf_counter()
        constraint.accept(int(rng.choice(choices)))
        feeds.append(time.perf_counter() - t0)
    return {"compile_ms": round(1e3 * compile_s, 2), "mask_us_p50": round(1e6 * statistics.median(masks), 1),
            "mask_us_max": round(1e6 * max(masks), 1),
            "feed_us_p50": round(1e6 * statistics.median(feeds), 1) if feeds else None, "tokens": len(masks)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocabs", type=int, nargs="+", default=[32000, 128256, 151936])
    args = parser.parse_args()
    report: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k, vocab in enumerate(args.vocabs):
            path = Path(tmp) / f"tokenizer-{vocab}.json"
            write_tokenizer(vocab, path)
            compiler = ConstraintCompiler(path, vocab, [0])
            t0 = time.perf_counter()
            compiler.tokenizer()
            row: dict = {"tokenizer_view_ms": round(1e3 * (time.perf_counter() - t0), 1)}
            if k == 0:  # the grammar engine's one-time start-up, on the first mask of the process
                first = compiler.compile(json_schema_grammar(SCHEMAS["number_ranges"]))
                t0 = time.perf_counter()
                first.allowed()
                row["process_first_mask_ms"] = round(1e3 * (time.perf_counter() - t0), 1)
            row.update({name: walk(compiler, SCHEMAS[name], 64, 1) for name in TIMED})
            report[vocab] = row
            print(vocab, json.dumps(row), flush=True)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
