"""Grammars for tool calls and schemas, and their token masks on the tiny model's tokenizer: what the
mask allows is exactly what the grammar can continue with, and a finished grammar allows only the end."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.engine.constraints import GrammarError, json_schema_grammar, tool_call_grammar
from app.engine.constraints.masks import ConstraintCompiler
from app.engine.tools import parse_tool_calls
from tests.conftest import make_tiny

TOOLS = [{"type": "function", "function": {"name": "pick", "parameters": {
    "type": "object", "properties": {"n": {"enum": [1, 2]}}, "required": ["n"], "additionalProperties": False}}}]


@pytest.fixture(scope="module")
def compiler(tmp_path_factory: pytest.TempPathFactory) -> tuple[ConstraintCompiler, object]:
    from tokenizers import Tokenizer

    folder = make_tiny(tmp_path_factory.mktemp("grammar") / "tiny", 1234)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    eos = tok.token_to_id("<|im_end|>")
    return ConstraintCompiler(Path(folder) / "tokenizer.json", tok.get_vocab_size(), [eos]), tok


def walk(compiler: ConstraintCompiler, tok, grammar: str, text: str) -> object:
    """Feed ``text`` token by token, checking each token was allowed by the mask before it."""
    job = compiler.compile(grammar)
    for token in tok.encode(text, add_special_tokens=False).ids:
        assert bool(job.allowed()[token]), f"token {token} ({tok.id_to_token(token)!r}) refused"
        assert job.accept(token)
    return job


@pytest.mark.parametrize("fmt,text", [
    ("hermes", '<tool_call>\n{"name": "pick", "arguments": {"n": 2}}\n</tool_call>'),
    ("llama3", '{"name": "pick", "parameters": {"n": 1}}'),
    ("mistral", '[{"name": "pick", "arguments": {"n": 1}}]'),
])
def test_a_forced_call_in_each_format_parses(compiler, fmt: str, text: str) -> None:
    comp, tok = compiler
    job = walk(comp, tok, tool_call_grammar(fmt, TOOLS, name="pick"), text)
    allowed = job.allowed()
    assert job.done or allowed.sum() == 1 and bool(allowed[comp._eos[0]])  # only the end is left
    _, calls = parse_tool_calls(text, fmt)  # type: ignore[arg-type]
    assert [c.name for c in calls] == ["pick"]


def test_the_mask_refuses_what_the_schema_does_not_allow(compiler) -> None:
    comp, tok = compiler
    job = walk(comp, tok, tool_call_grammar("hermes", TOOLS, name="pick"), '<tool_call>\n{"name": "pick", '
                                                                           '"arguments": {"n": ')
    allowed = job.allowed()
    assert allowed[tok.token_to_id("1")] and allowed[tok.token_to_id("2")]
    assert not allowed[tok.token_to_id("3")] and not allowed[tok.token_to_id('"')]


def test_a_mask_covers_the_model_vocabulary(compiler) -> None:
    import torch

    comp, _ = compiler
    job = comp.compile(json_schema_grammar({"type": "boolean"}))
    logits = job.mask(torch.zeros(comp.vocab_size + 7))  # a model whose head is larger than the tokenizer
    assert torch.isinf(logits[comp.vocab_size:]).all()
    assert 0 < int(torch.isfinite(logits).sum()) < comp.vocab_size


def test_unknown_tools_and_bad_schemas_are_refused() -> None:
    with pytest.raises(GrammarError, match="no tool named"):
        tool_call_grammar("hermes", TOOLS, name="other")
    with pytest.raises(GrammarError):
        json_schema_grammar({"type": "object", "properties": {"a": {"type": "nope"}}})


def test_defs_of_a_tool_still_resolve(compiler) -> None:
    comp, tok = compiler
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "$defs": {"x": {"type": "integer"}}, "type": "object", "properties": {"a": {"$ref": "#/$defs/x"}},
        "required": ["a"], "additionalProperties": False}}}]
    job = walk(comp, tok, tool_call_grammar("hermes", tools), '<tool_call>\n{"name": "f", "arguments": {"a": ')
    assert job.allowed()[tok.token_to_id("5")] and not job.allowed()[tok.token_to_id('"')]


def test_the_backend_masks_one_row_and_a_bad_grammar_ends_only_its_job(tmp_path_factory) -> None:
    import threading

    from app.engine.backends.transformers_backend import TransformersBackend
    from app.engine.events import BackendJob, SamplingParams

    folder = make_tiny(tmp_path_factory.mktemp("grammar-backend") / "tiny", 1234)
    backend = TransformersBackend(folder, context_length=256, max_batch=4)
    backend.load(lambda *_: None, threading.Event())
    prompt = backend.encode("Answer:")
    enum = json_schema_grammar({"enum": ["yes", "no"]})
    jobs = [BackendJob(list(prompt), 20, SamplingParams(seed=1), [], backend.eos_token_ids(), grammar=g)
            for g in (None, enum, "%%% not a grammar")]
    for job in jobs:
        backend.submit(job)
    text: dict[int, str] = {j.job_id: "" for j in jobs}
    ends: dict[int, tuple] = {}
    while backend.has_work():
        for event in backend.step():
            text[event.job_id] += event.text
            if event.finished:
                ends[event.job_id] = (event.finish_reason, event.error)
    free, constrained, bad = jobs
    assert ends[constrained.job_id][0] == "stop" and text[constrained.job_id] in ('"yes"', '"no"')
    assert ends[bad.job_id][0] == "error" and "constraint" in ends[bad.job_id][1]
    assert ends[free.job_id][0] in ("length", "stop") and ends[free.job_id][1] is None and text[free.job_id]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_no_penalty_brings_back_a_token_the_grammar_forbids(tmp_path_factory, temperature: float) -> None:
    """A repetition penalty that is 0 in float32 once made -inf x 0 = NaN of a masked token in the
    prompt, and argmax chose it (found by the Ollama API's fuzzing)."""
    import threading

    from app.engine.backends.transformers_backend import TransformersBackend
    from app.engine.events import BackendJob, SamplingParams

    folder = make_tiny(tmp_path_factory.mktemp("grammar-penalty") / "tiny", 1234)
    backend = TransformersBackend(folder, context_length=128, max_batch=2)
    backend.load(lambda *_: None, threading.Event())
    prompt = [6, 7, 8, *backend.encode("Answer:")]  # FIM special tokens: in the history, never allowed
    job = BackendJob(prompt, 6, SamplingParams(temperature=temperature, repetition_penalty=1e-119, top_k=1,
                                              seed=0), [], backend.eos_token_ids(),
                     grammar=json_schema_grammar({"type": "object"}))
    backend.submit(job)
    ends = []
    while backend.has_work():
        ends += [e for e in backend.step() if e.finished]
    assert [(e.finish_reason, e.error) for e in ends] in ([("length", None)], [("stop", None)])
