"""Typed contracts across the layers: named pipe messages, errors with their OpenAI code, the declared
settings schema, and the GPU probe that never imports torch."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from app.api.errors import from_engine
from app.engine.backends.model_process import protocol as p
from app.engine.errors import ContextLengthExceeded, InvalidRequest, ModelLoadError, ModelNotFound
from app.engine.events import BackendJob, SamplingParams, StepEvent
from app.engine.settings.schema import DEFAULTS, GROUPS, LOAD_TIME_FIELDS, OLLAMA_PARAM_MAP, SCHEMA, Settings

ROOT = Path(__file__).resolve().parent.parent.parent
JOB = BackendJob([1, 2], 4, SamplingParams(), [], set())
EVERY_MESSAGE = [
    p.Load("/models/m", {"context_length": 256}), p.CancelLoad(), p.Serve(), p.Submit(JOB), p.Cancel(7),
    p.Encode(1, "hi", True), p.Census(2), p.Unload(), p.Progress(0.5, "half"),
    p.Loaded(p.LoadedInfo("single", "", 32, {2}, None)), p.LoadFailed(True, "load cancelled"),
    p.Events([(7, "a", 1, False, None, None, None)], 1, 1.0, 1.5), p.StepFailedMsg([7], "boom", [], 1),
    p.StepError("boom"), p.Memory({"cuda:0": 1}), p.Reply(1, [5, 6]), p.Unloaded(),
]


@pytest.mark.parametrize("msg", EVERY_MESSAGE, ids=lambda m: type(m).__name__)
def test_every_message_travels_as_a_plain_tuple_and_comes_back_named(msg: p.Message) -> None:
    wire = p.pack(msg)
    assert type(wire) is tuple and wire[0] == msg.KIND
    back = p.unpack(pickle.loads(pickle.dumps(wire)))
    assert type(back) is type(msg) and back == msg


def test_the_per_token_message_is_built_as_events_are() -> None:
    events = p.to_wire([StepEvent(3, "x", 1), StepEvent(4, "", 0, True, "stop")])
    assert p.events_wire(events, 2, 1.0, 2.0) == p.pack(p.Events(events, 2, 1.0, 2.0))
    named = p.unpack(p.events_wire(events, 2, 1.0, 2.0))
    assert isinstance(named, p.Events) and (named.batch, named.t_start, named.t_end) == (2, 1.0, 2.0)
    assert p.from_wire(named.events) == [StepEvent(3, "x", 1), StepEvent(4, "", 0, True, "stop")]


def test_message_kinds_are_distinct() -> None:
    kinds = [type(m).KIND for m in EVERY_MESSAGE]
    assert len(kinds) == len(set(kinds))


def test_errors_carry_their_openai_code_and_status() -> None:
    cases = [(ContextLengthExceeded("too long", "messages"), 400, "context_length_exceeded", "messages"),
             (InvalidRequest("bad bias", "logit_bias"), 400, None, "logit_bias"),
             (ModelNotFound("The model 'x' does not exist"), 404, "model_not_found", "model"),
             (ModelLoadError("failed to load"), 503, "model_load_failed", None)]
    for exc, status, code, param in cases:
        api = from_engine(exc)
        assert (api.status, api.code, api.param, api.message) == (status, code, param, str(exc))
    assert isinstance(ContextLengthExceeded("x"), InvalidRequest)
    assert from_engine(ModelLoadError("x")).error_type == "server_error"


def test_the_schema_declares_every_setting_once() -> None:
    assert set(SCHEMA) == set(Settings.model_fields)
    assert sorted(n for names in GROUPS.values() for n in names) == sorted(SCHEMA)
    assert list(GROUPS) == ["Model & memory", "Sampling", "Prompt", "Lifecycle"]
    assert LOAD_TIME_FIELDS == {"context_length", "batch_size", "cache_type", "gpu_split", "rope_scale",
                                "rope_alpha", "backend", "gpu_split_mode"}
    assert OLLAMA_PARAM_MAP["num_ctx"] == "context_length" and OLLAMA_PARAM_MAP["repeat_penalty"] == \
        "repetition_penalty" and OLLAMA_PARAM_MAP["num_predict"] == "max_tokens" and len(OLLAMA_PARAM_MAP) == 12
    assert DEFAULTS.set_fields().keys() == {n for n, i in SCHEMA.items() if i.default is not None}
    assert SCHEMA["context_length"].cli == ("--max-seq-len", "--num-ctx")


def test_the_cli_options_come_from_the_schema() -> None:
    import argparse

    from app.cli.main import add_setting_options, settings_from_args

    parser = argparse.ArgumentParser()
    add_setting_options(parser)
    args = parser.parse_args(["--max-seq-len", "2048", "--max-batch-size", "2", "--system", "Be brief.",
                              "--stop", "A", "--stop", "B", "--cache-type", "Q4"])
    assert settings_from_args(args).set_fields() == {"context_length": 2048, "batch_size": 2, "cache_type": "Q4",
                                                     "system_prompt": "Be brief.", "stop": ["A", "B"]}


def test_asking_for_a_gpu_does_not_import_torch() -> None:
    code = ("import sys; from app.engine.backends.factory import nvidia_gpu_present; nvidia_gpu_present(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
