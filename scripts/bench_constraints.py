#!/usr/bin/env python3
"""Benchmark: grammar-constrained decoding with llguidance, formatron and lm-format-enforcer on tiny
random Llama models on the CPU. Prints, per library: set-up time (tokenizer and schema), time per token
with a JSON-schema constraint against the same loop without one, the constraint's own share, how that
scales with the vocabulary (1k / 8k / 32k tokens), and JSON-schema coverage (does the schema compile,
and does what the random model writes under it validate).

Then the transformers backend's batched decode step with 9 free jobs against 8 free + 1 constrained.

The other two libraries are not dependencies: `pip install formatron lm-format-enforcer` first (a
library that is missing is reported and skipped).

Usage: python scripts/bench_constraints.py [--tokens 64] [--vocabs 1024,8192,32000] [--out DIR]
Results are written to docs/structured-output.md by hand.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.test_structured_output import SCHEMAS  # noqa: E402  the schemas the tests use

TIMED = ("nested", "array_of_objects", "number_ranges")
EXTRA_SCHEMAS: dict[str, dict[str, Any]] = {
    "oneOf": {"type": "object", "properties": {"v": {"oneOf": [{"type": "integer"}, {"type": "boolean"}]}},
              "required": ["v"], "additionalProperties": False},
    "allOf": {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                        {"type": "object", "properties": {"b": {"type": "boolean"}}, "required": ["b"]}]},
    "format_date": {"type": "object", "properties": {"d": {"type": "string", "format": "date"}}, "required": ["d"],
                    "additionalProperties": False},
    "recursive": {"$defs": {"node": {"type": "object", "properties": {"kids": {
        "type": "array", "maxItems": 2, "items": {"$ref": "#/$defs/node"}}}, "required": ["kids"],
        "additionalProperties": False}},
        "$ref": "#/$defs/node"},
    "minLength": {"type": "object", "properties": {"s": {"type": "string", "minLength": 3, "maxLength": 6}},
                  "required": ["s"], "additionalProperties": False},
    "uniqueItems": {"type": "array", "items": {"enum": [1, 2, 3]}, "uniqueItems": True, "maxItems": 3},
    "multipleOf": {"type": "object", "properties": {"n": {"type": "integer", "multipleOf": 5, "maximum": 100}},
                   "required": ["n"], "additionalProperties": False},
    "additional_schema": {"type": "object", "additionalProperties": {"type": "integer"}, "maxProperties": 2},
}


class Adapter:
    """One library: ``start(schema)`` then, per token, ``allowed()`` (bool tensor) and ``accept(token)``."""

    name = ""

    def __init__(self, model_dir: Path, vocab: int, eos: int) -> None:
        self.model_dir, self.vocab, self.eos = model_dir, vocab, eos

    def start(self, schema: dict[str, Any]) -> None: ...
    def allowed(self) -> Any: ...
    def accept(self, token: int) -> None: ...
    def done(self) -> bool: return False


class LLGuidance(Adapter):
    name = "llguidance"

    def __init__(self, *a: Any) -> None:
        super().__init__(*a)
        from app.engine.constraints.masks import ConstraintCompiler

        self.compiler = ConstraintCompiler(self.model_dir / "tokenizer.json", self.vocab, [self.eos])
        self.compiler.tokenizer()

    def start(self, schema: dict[str, Any]) -> None:
        from app.engine.constraints.grammars import json_schema_grammar

        self.job = self.compiler.compile(json_schema_grammar(schema, strict=True))

    def allowed(self) -> Any:
        return self.job.allowed()

    def accept(self, token: int) -> None:
        self.job.accept(token)

    def done(self) -> bool:
        return self.job.done


def _hf_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


class Formatron(Adapter):
    name = "formatron"

    def __init__(self, *a: Any) -> None:
        super().__init__(*a)
        import typing

        import pydantic

        pydantic.typing = typing  # type: ignore[attr-defined]  formatron 0.5 reads typing.Type from there
        from formatron.integrations.transformers import create_engine_vocabulary

        self.tok = _hf_tokenizer(self.model_dir)
        self.vocabulary = create_engine_vocabulary(self.tok)

    def start(self, schema: dict[str, Any]) -> None:
        from formatron.formatter import FormatterBuilder
        from formatron.schemas.json_schema import create_schema

        builder = FormatterBuilder()
        builder.append_line(f"{builder.json(create_schema({'$schema': 'https://json-schema.org/draft/2020-12/schema', '$id': 'https://x/s', **schema}), capture_name='j')}")
        self.formatter = builder.build(self.vocabulary, lambda ids: self.tok.decode(ids))

    def allowed(self) -> Any:
        import torch

        self.formatter.compute_allowed_tokens()
        logits = torch.zeros(self.vocab)
        return self.formatter.mask_logits(logits) > float("-inf")

    def accept(self, token: int) -> None:
        self.formatter.accept_token(token)

    def done(self) -> bool:
        return self.formatter.is_completed()


class FormatEnforcer(Adapter):
    name = "lm-format-enforcer"

    def __init__(self, *a: Any) -> None:
        super().__init__(*a)
        from lmformatenforcer.tokenenforcer import TokenEnforcerTokenizerData

        # its transformers integration does not import with transformers 5: the same table, built here
        tok = _hf_tokenizer(self.model_dir)
        zero, special, table = tok.encode("0")[-1], set(tok.all_special_ids), []
        for i in range(self.vocab):
            if i not in special:
                after_zero, alone = tok.decode([zero, i])[1:], tok.decode([i])
                table.append((i, after_zero, len(after_zero) > len(alone)))
        self.data = TokenEnforcerTokenizerData(table, lambda ids: tok.decode(ids).rstrip("\ufffd"), self.eos,
                                               False, self.vocab)

    def start(self, schema: dict[str, Any]) -> None:
        from lmformatenforcer import JsonSchemaParser, TokenEnforcer

        self.enforcer, self.seq = TokenEnforcer(self.data, JsonSchemaParser(schema)), [0]

    def allowed(self) -> Any:
        import torch

        mask = torch.zeros(self.vocab, dtype=torch.bool)
        allowed = self.enforcer.get_allowed_tokens(self.seq)
        ids = getattr(allowed, "allowed_tokens", allowed)
        mask[torch.tensor(list(ids) if not hasattr(ids, "shape") else ids.nonzero().flatten(), dtype=torch.long)] = True
        return mask

    def accept(self, token: int) -> None:
        self.seq.append(token)


ADAPTERS: list[type[Adapter]] = [LLGuidance, Formatron, FormatEnforcer]


def generate(model: Any, prompt: list[int], tokens: int, adapter: Adapter | None, eos: int,
             seed: int = 0) -> tuple[list[int], float, float]:
    """Sample up to ``tokens`` tokens; returns (ids, seconds per token, constraint seconds per token)."""
    import torch
    from transformers import DynamicCache

    gen = torch.Generator().manual_seed(seed)
    cache, ids, out, in_constraint = DynamicCache(), torch.tensor([prompt]), [], 0.0
    started = time.perf_counter()
    with torch.inference_mode():
        for _ in range(tokens):
            logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[0, -1].float()
            if adapter is not None:
                t0 = time.perf_counter()
                allowed = adapter.allowed()
                logits[:allowed.shape[0]][~allowed] = float("-inf")
                in_constraint += time.perf_counter() - t0
            token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
            out.append(token)
            if token == eos or (adapter is not None and _accept(adapter, token)):
                break
            ids = torch.tensor([[token]])
    n = max(1, len(out))
    return out, (time.perf_counter() - started) / n, in_constraint / n


def _accept(adapter: Adapter, token: int) -> bool:
    adapter.accept(token)
    return adapter.done()


def make_model(vocab: int, folder: Path) -> Path:
    out = folder / f"tiny-{vocab}"
    if not (out / "model.safetensors").exists():
        subprocess.check_call([sys.executable, str(ROOT / "scripts" / "make_tiny_model.py"), str(out),
                               "--vocab", str(vocab)], stdout=subprocess.DEVNULL)
    return out


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t0


def coverage(adapter: Adapter, model: Any, tok: Any, prompt: list[int], eos: int) -> dict[str, str]:
    import jsonschema

    out = {}
    for name, schema in {**SCHEMAS, **EXTRA_SCHEMAS}.items():
        try:
            adapter.start(schema)
        except Exception as exc:  # the library refuses the schema
            out[name] = f"refused ({type(exc).__name__})"
            continue
        try:
            ids, _, _ = generate(model, prompt, 150, adapter, eos, seed=1)
        except Exception as exc:  # the library failed while generating
            out[name] = f"failed ({type(exc).__name__})"
            continue
        finished = adapter.done() or ids[-1] == eos
        text = tok.decode([i for i in ids if i != eos])
        if not finished:
            out[name] = "cut at 150 tokens"
            continue
        try:
            jsonschema.validate(json.loads(text), schema)
            out[name] = "valid"
        except (ValueError, jsonschema.ValidationError) as exc:
            out[name] = f"INVALID: {str(exc).splitlines()[0][:50]}"
    return out


def bench_vocab(vocab: int, folder: Path, tokens: int, with_coverage: bool) -> None:
    from transformers import AutoModelForCausalLM

    model_dir = make_model(vocab, folder)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    tok = _hf_tokenizer(model_dir)
    eos, n_vocab = int(tok.convert_tokens_to_ids("<|im_end|>")), int(model.config.vocab_size)
    prompt = tok.encode("Answer in JSON:")
    free = statistics.median(generate(model, prompt, tokens, None, -1, seed=s)[1] for s in range(3))
    print(f"\nvocab {n_vocab}: free decoding {free * 1e3:.2f} ms/token")
    print(f"{'library':20} {'setup s':>8} {'compile ms':>10} {'ms/token':>9} {'mask ms':>8} {'overhead':>9}")
    for cls in ADAPTERS:
        try:
            adapter, setup = timed(lambda: cls(model_dir, n_vocab, eos))
        except Exception as exc:
            print(f"{cls.name:20} set-up failed: {exc}")
            continue
        compiles, per_token, masks = [], [], []
        for name in TIMED:
            try:
                _, compile_s = timed(lambda: adapter.start(SCHEMAS[name]))
                _, tok_s, mask_s = generate(model, prompt, tokens, adapter, eos)
            except Exception as exc:  # reported, the other schemas and libraries go on
                print(f"  {cls.name} on {name}: {type(exc).__name__}: {str(exc)[:80]}")
                continue
            compiles.append(compile_s), per_token.append(tok_s), masks.append(mask_s)
        if not per_token:
            continue
        ms = statistics.median(per_token) * 1e3
        print(f"{cls.name:20} {setup:8.2f} {statistics.median(compiles) * 1e3:10.1f} {ms:9.2f} "
              f"{statistics.median(masks) * 1e3:8.3f} {ms / (free * 1e3):8.2f}x")
        if with_coverage:
            results = coverage(adapter, model, tok, prompt, eos)
            ok = sum(v == "valid" for v in results.values())
            print(f"  coverage: {ok}/{len(results)} valid; " +
                  "; ".join(f"{k}: {v}" for k, v in results.items() if v != "valid"))


def bench_batch(model_dir: Path, free: int, tokens: int) -> None:
    """The transformers backend's decode steps with ``free + 1`` free jobs against ``free`` free jobs and
    one constrained job (llguidance, per-row mask in the same batch): what a constraint costs the others."""
    import threading

    from app.engine.backends.transformers_backend import TransformersBackend
    from app.engine.constraints.grammars import json_schema_grammar
    from app.engine.events import BackendJob, SamplingParams

    backend = TransformersBackend(model_dir, context_length=2048, max_batch=free + 1)
    backend.load(lambda *_: None, threading.Event())
    grammar = json_schema_grammar({"type": "string"})  # a random model seldom closes the string
    prompt = backend.encode("Answer in JSON:")
    steps: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(3):  # interleaved, so that a busy moment of the machine hits both
        for constrained in (False, True):
            for i in range(free + 1):
                backend.submit(BackendJob(list(prompt), tokens, SamplingParams(temperature=1.0, seed=i), [], set(),
                                          grammar=grammar if constrained and i == free else None))
            while backend.has_work():
                t0 = time.perf_counter()
                backend.step()
                if backend.last_step_batch == free + 1:
                    steps[constrained].append(time.perf_counter() - t0)
    plain, mixed = (statistics.median(steps[k]) * 1e3 for k in (False, True))
    print(f"  decode step, batch of {free + 1}: {plain:.2f} ms all free, {mixed:.2f} ms with one constrained "
          f"({(mixed / plain - 1) * 100:+.1f} %)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--vocabs", default="1024,8192,32000")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "bench-constraints")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    vocabs = [int(v) for v in args.vocabs.split(",")]
    for i, vocab in enumerate(vocabs):
        bench_vocab(vocab, args.out, args.tokens, with_coverage=i == 0)
        bench_batch(make_model(vocab, args.out), 8, args.tokens * 2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
