"""A backend in its own model process (how the exllamav2 backend runs), exercised with the CPU backend."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from app.engine.backends.contract import BackendLoadError, LoadCancelled
from app.engine.backends.model_process.client import ProcessBackend
from app.engine.backends.transformers_backend import TransformersBackend
from app.engine.events import BackendJob, SamplingParams, StepEvent
from app.engine.serving.pipe_runner import PipeRunner
from app.engine.catalog.registry import ModelEntry, Registry
from app.engine.settings.layers import ResolvedSettings
from tests.helpers.servers import Servers
from tests.helpers.tiny import KEEP_TALKING, KEEP_TALKING_IDS
from tests.helpers.waiting import wait_until
from tests.openai_schema import validate
from tests.server_harness import ServerThread, register

TARGET = "app.engine.backends.transformers_backend:TransformersBackend"
#: a backend whose model processes are spawned (as exllamav2's are), so kept with a spare
SPAWNED = "tests.fixed_step_backend:FixedStepBackend"
GREEDY = SamplingParams(temperature=0.0, logit_bias=KEEP_TALKING_IDS)


def in_process(model_dir: Path) -> TransformersBackend:
    backend = TransformersBackend(model_dir, context_length=256, max_batch=4)
    backend.load(lambda f, m: None, threading.Event())
    return backend


def in_child(model_dir: Path, progress: list | None = None, cancel: threading.Event | None = None) -> ProcessBackend:
    backend = ProcessBackend(TARGET, "transformers", str(model_dir), keep_spare=False, context_length=256,
                             max_batch=4)
    backend.load(lambda f, m: progress.append((f, m)) if progress is not None else None, cancel or threading.Event())
    return backend


def run_jobs(backend, jobs: list[BackendJob]) -> dict[int, str]:
    """Step until every job has ended, as a runner does (it alone knows which jobs are out)."""
    for job in jobs:
        backend.submit(job)
    texts = {job.job_id: "" for job in jobs}
    running = set(texts)
    while running:
        for event in backend.step():
            texts[event.job_id] += event.text
            if event.finished:
                running.discard(event.job_id)
    return texts


def job(prompt_ids: list[int], n: int = 8, **kw) -> BackendJob:
    return BackendJob(prompt_ids=prompt_ids, max_new_tokens=n, sampling=kw.pop("sampling", GREEDY),
                      stop_strings=[], stop_token_ids={2}, **kw)


def test_model_process_generates_what_the_backend_generates_in_process(tiny_model_dir: Path) -> None:
    progress: list = []
    child = in_child(tiny_model_dir, progress)
    local = in_process(tiny_model_dir)
    try:
        assert progress[0][1] == "starting the model process" and progress[-1] == (1.0, "loaded")
        assert child.pid is not None and child.pid != os.getpid() and child.dead is None
        assert not child.encode_blocks  # tokenizer.json is read here: no round trip per request
        for text in ("Hello there", "<|im_start|>user\nhi<|im_end|>", "héllo ✓"):
            assert child.encode(text, add_bos=True) == local.encode(text, add_bos=True)
        assert child.eos_token_ids() == local.eos_token_ids() and child.vocab_size == local.vocab_size
        assert child.memory_used() and all(v > 0 for v in child.memory_used().values())
        prompts = [local.encode("Once upon a time"), local.encode("The end of the story"), local.encode("x")]
        want = run_jobs(local, [job(p) for p in prompts])
        got = run_jobs(child, [job(p) for p in prompts])
        assert list(got.values()) == list(want.values()) and all(got.values())
        assert child.last_step_batch >= 1
        # without a usable tokenizer.json here, encoding is asked of the model process
        child._encoder = None  # noqa: SLF001
        assert child.encode("Hello there", add_bos=True) == local.encode("Hello there", add_bos=True)
        assert child.cuda_tensor_census() == {"tensors": [], "allocated": 0, "reserved": 0}  # CPU only
    finally:
        child.unload()
        local.unload()
    assert child.pid is None


def test_cancelled_job_reports_nothing_more(tiny_model_dir: Path) -> None:
    child = in_child(tiny_model_dir)
    try:
        ids = child.encode("Once upon a time")
        keep, drop = job(ids, 12), job(ids, 200)
        child.submit(keep)
        child.submit(drop)
        seen_after_cancel: list[StepEvent] = []
        cancelled = False
        keep_done = False
        while not keep_done:
            for event in child.step():
                if cancelled:
                    seen_after_cancel.append(event)
                keep_done = keep_done or (event.job_id == keep.job_id and event.finished)
            if not cancelled:
                child.cancel(drop.job_id)
                cancelled = True
        time.sleep(0.3)
        late = [e for e in seen_after_cancel + [e for m in child.read_available() for e in child.take_step(m)]
                if e.job_id == drop.job_id]
        # what the model process had stepped before it read the cancel may still come (how much depends on
        # timing; the runner drops it), but never an end
        assert not any(e.finished for e in late), late
        # the model process has dropped the job: the next one steps alone, and nothing of the old one comes
        after = job(ids, 4)
        child.submit(after)
        events, batches = [], []
        while not any(e.finished for e in events):
            events += child.step()
            batches.append(child.last_step_batch)
        assert {e.job_id for e in events} == {after.job_id} and max(batches) == 1, (events, batches)  # 0: prefill
    finally:
        child.unload()


def test_load_failure_is_readable_and_the_process_is_gone(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    backend = ProcessBackend(TARGET, "transformers", str(tmp_path), context_length=256, max_batch=1)
    with pytest.raises(BackendLoadError) as err:
        backend.load(lambda f, m: None, threading.Event())
    assert "tokenizer.json" in str(err.value)
    assert backend.pid is None


def test_load_cancel_ends_the_model_process(tiny_model_dir: Path) -> None:
    cancel = threading.Event()
    cancel.set()
    backend = ProcessBackend(TARGET, "transformers", str(tiny_model_dir), context_length=256, max_batch=1)
    with pytest.raises(LoadCancelled):
        backend.load(lambda f, m: None, cancel)
    assert backend.pid is None


def test_killed_model_process_fails_its_jobs_clearly(tiny_model_dir: Path) -> None:
    child = in_child(tiny_model_dir)
    try:
        ids = child.encode("Once upon a time")
        child.submit(job(ids, 10_000))
        child.step()
        os.kill(child.pid, signal.SIGKILL)
        with pytest.raises(RuntimeError, match="model process has exited"):
            for _ in range(10_000):
                child.step()
        assert child.dead and "exit code" in child.dead
        late = job(ids, 4)
        child.submit(late)  # never raises: the job ends with the reason
        events = child.step()
    except BaseException:
        child.unload()
        raise
    child.unload()
    assert any(e.job_id == late.job_id and e.finish_reason == "error" and "exited" in (e.error or "") for e in events)


# -- through the server -------------------------------------------------------------------
def process_factory(entry: ModelEntry, settings: ResolvedSettings) -> ProcessBackend:
    return ProcessBackend(TARGET, "transformers", entry.model_dir, context_length=int(settings.context_length),
                          max_batch=int(settings.batch_size))


@pytest.fixture(scope="module")
def server(serve_module: Servers) -> ServerThread:
    return serve_module(models={"tiny": {"context_length": 256, "batch_size": 4}}, backend_factory=process_factory)


def model_pid(server: ServerThread) -> int | None:
    resident = server.engine.manager.resident("tiny:latest")
    return None if resident is None else resident.backend.pid


def test_server_streams_from_the_model_process(server: ServerThread) -> None:
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Say something."}], "max_tokens": 8,
            "temperature": 0, "logit_bias": KEEP_TALKING}
    raw = client.chat.completions.with_raw_response.create(**body)
    whole = json.loads(raw.text)
    validate("CreateChatCompletionResponse", whole)
    pieces = []
    for chunk in client.chat.completions.create(**body, stream=True):
        pieces.extend(c.delta.content or "" for c in chunk.choices)
    assert "".join(pieces) == whole["choices"][0]["message"]["content"] != ""
    assert model_pid(server) not in (None, os.getpid())


def test_a_killed_model_process_is_loaded_again_on_the_next_request(server: ServerThread) -> None:
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    client.chat.completions.create(**body)
    first = model_pid(server)
    os.kill(first, signal.SIGKILL)
    wait_until(lambda: server.engine.manager.resident("tiny:latest").backend.dead is not None, 30)
    out = client.chat.completions.create(**body)
    assert out.choices[0].finish_reason in ("stop", "length")
    assert model_pid(server) not in (None, first)


def test_unload_ends_the_model_process(server: ServerThread) -> None:
    httpx.post(f"{server.root}/admin/load", json={"model": "tiny"}, timeout=120).raise_for_status()
    pid = model_pid(server)
    census = httpx.get(f"{server.root}/admin/cuda-tensors", timeout=120).json()
    assert set(census) == {"server", "tiny:latest"} and census["tiny:latest"]["tensors"] == []
    httpx.post(f"{server.root}/admin/unload", json={"model": "tiny"}, timeout=120).raise_for_status()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def resident_backend(server: ServerThread) -> ProcessBackend:
    return server.engine.manager.resident("tiny:latest").backend


def open_stream(server: ServerThread, max_tokens: int = 400):
    """A raw SSE stream that has delivered its first text chunk (context manager)."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me a story."}],
            "max_tokens": max_tokens, "stream": True, "temperature": 0, "logit_bias": KEEP_TALKING}
    return httpx.stream("POST", f"{server.base_url}/chat/completions", json=body, timeout=120)


def test_the_event_loop_reads_the_model_process_directly(server: ServerThread) -> None:
    httpx.post(f"{server.root}/admin/load", json={"model": "tiny"}, timeout=120).raise_for_status()
    resident = server.engine.manager.resident("tiny:latest")
    assert isinstance(resident.runner, PipeRunner) and resident.backend.loop_reads
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=6, stream=True, temperature=0,
        logit_bias=KEEP_TALKING) if c.choices)
    assert text
    records = httpx.get(f"{server.root}/admin/requests", timeout=10).json()["data"]
    last = records[-1]
    # where the first text's time went, measured on both sides of the pipe
    assert last["to_model_step_s"] is not None and last["to_model_step_s"] >= 0
    assert 0 < last["model_step_s"] < 60 and last["from_model_s"] >= 0
    # and its decoding in the model process: 5 steps after the first, inside a span that holds them
    assert last["completion_tokens"] == 6 and last["model_decode_steps"] == 5
    assert 0 < last["model_decode_in_steps_s"] <= last["model_decode_span_s"] < 60


def test_encoding_asked_of_the_model_process_is_answered_while_the_loop_reads(server: ServerThread) -> None:
    httpx.post(f"{server.root}/admin/load", json={"model": "tiny"}, timeout=120).raise_for_status()
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 5, "temperature": 0,
            "logit_bias": KEEP_TALKING}
    here = client.completions.create(**body)  # encoded in this process (tokenizer.json)
    backend = resident_backend(server)
    local, backend._encoder, backend.encode_blocks = backend._encoder, None, True  # noqa: SLF001
    try:
        there = client.completions.create(**body)  # encoded by the model process, reply read by the loop
    finally:
        backend._encoder, backend.encode_blocks = local, False  # noqa: SLF001
    assert there.usage.prompt_tokens == here.usage.prompt_tokens > 1
    assert there.choices[0].text == here.choices[0].text != ""


def test_client_disconnect_cancels_the_job_in_the_model_process(server: ServerThread) -> None:
    def cancelled_total() -> float:
        try:
            return server.metric('exllama_tray_requests_total{finish_reason="cancelled"}')
        except KeyError:  # no request was cancelled yet
            return 0.0

    cancelled = cancelled_total()
    with open_stream(server) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: {") and '"content":"' in line.replace(" ", ""):
                break
    runner = server.engine.manager.resident("tiny:latest").runner
    assert wait_until(lambda: server.metric("exllama_tray_requests_running") == 0 and runner.job_count() == 0, 20)
    assert cancelled_total() == cancelled + 1
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)
    assert client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=3).choices[0].finish_reason in ("stop", "length")


def stream_until_end(server: ServerThread, during) -> list[dict]:
    """Start a long stream, call ``during()`` after its first chunk, return every chunk it sent."""
    chunks = []
    with open_stream(server, max_tokens=2000) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                chunks.append(json.loads(line[6:]))
                if len(chunks) == 2:
                    during()
    return chunks


def test_unload_asked_during_a_stream_lets_it_finish_then_ends_the_process(server: ServerThread) -> None:
    httpx.post(f"{server.root}/admin/load", json={"model": "tiny"}, timeout=120).raise_for_status()
    pid = model_pid(server)
    unload = threading.Thread(target=lambda: httpx.post(f"{server.root}/admin/unload", json={"model": "tiny"},
                                                        timeout=120).raise_for_status())
    chunks = stream_until_end(server, unload.start)
    unload.join(60)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"  # clamped to the context left
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_model_process_killed_during_a_stream_ends_it_with_the_reason(server: ServerThread) -> None:
    httpx.post(f"{server.root}/admin/load", json={"model": "tiny"}, timeout=120).raise_for_status()
    chunks = stream_until_end(server, lambda: os.kill(model_pid(server), signal.SIGKILL))
    assert "model process has exited" in json.dumps(chunks[-1])
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    assert out.choices[0].finish_reason in ("stop", "length")  # loaded again


def test_outbox_sends_streams_at_once_and_holds_a_non_streaming_jobs_middle(tmp_path: Path) -> None:
    from multiprocessing import Pipe

    from app.engine.backends.model_process.child import Outbox
    from app.engine.backends.model_process.protocol import from_wire, pipe_writer

    here, there = Pipe()
    outbox = Outbox(pipe_writer(there))
    streaming, whole = job([1, 2], 50), job([1, 2], 50, stream=False)
    outbox.submitted(streaming)
    outbox.submitted(whole)

    def sent() -> list:
        out = []
        while here.poll(0):
            msg = here.recv()
            out.append((msg[0], from_wire(msg[1]), *msg[2:]))
        return out

    outbox.step([StepEvent(whole.job_id, "a", 1)], 1, 0.0, 0.001)  # a job's first event: at once
    assert [m[1] for m in sent()] == [[StepEvent(whole.job_id, "a", 1)]]
    outbox.step([StepEvent(whole.job_id, "b", 1)], 1, 0.001, 0.002)
    outbox.step([StepEvent(whole.job_id, "c", 1)], 1, 0.002, 0.003)
    assert sent() == []  # held, merged
    outbox.step([StepEvent(streaming.job_id, "x", 1)], 2, 0.003, 0.004)  # a stream's event takes them along
    (msg,) = sent()
    assert msg[1] == [StepEvent(whole.job_id, "bc", 2), StepEvent(streaming.job_id, "x", 1)]
    outbox.step([StepEvent(whole.job_id, "d", 1)], 1, 0.004, 0.005)
    outbox.step([StepEvent(whole.job_id, "e", 1)], 1, 0.2, 0.201)  # held longer than HOLD_S: sent
    (msg,) = sent()
    assert msg[1] == [StepEvent(whole.job_id, "de", 2)]
    outbox.step([StepEvent(whole.job_id, "f", 1)], 1, 0.202, 0.203)
    outbox.step([StepEvent(whole.job_id, "g", 1, True, "length")], 1, 0.203, 0.204)  # the end: at once
    (msg,) = sent()
    # the end carries the job's decode times: every step after its first counts, the one that gave it
    # no event too (seven, 1 ms each), from the end of its first step to the end of its last (0.203 s)
    (end,) = msg[1]
    assert end.decode_times is not None and end.decode_times.steps == 7
    assert end.decode_times.in_steps_s == pytest.approx(0.007) and end.decode_times.span_s == pytest.approx(0.203)
    assert msg[1] == [StepEvent(whole.job_id, "fg", 2, True, "length", None, end.decode_times)]
    outbox.step([StepEvent(streaming.job_id, "y", 1)], 1, 0.3, 0.301)
    assert [m[1] for m in sent()] == [[StepEvent(streaming.job_id, "y", 1)]]


def test_a_non_streaming_request_wakes_the_server_a_few_times_not_per_token(server: ServerThread) -> None:
    from app.engine.backends.model_process.child import Outbox

    httpx.post(f"{server.root}/admin/load", json={"model": "tiny"}, timeout=120).raise_for_status()
    runner = server.engine.manager.resident("tiny:latest").runner
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 60,
            "temperature": 0, "logit_bias": KEEP_TALKING}
    before, started = runner.steps, time.monotonic()
    whole = client.chat.completions.create(**body)
    messages_whole, took = runner.steps - before, time.monotonic() - started
    before = runner.steps
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**body, stream=True)
                       if c.choices)
    messages_streamed = runner.steps - before
    assert streamed == whole.choices[0].message.content and whole.usage.completion_tokens == 60
    # held and merged: its first event, its last, and one message per HOLD_S between (not one per token);
    # how many depends on how long the 60 tokens took on this machine
    assert messages_whole <= took / Outbox.HOLD_S + 3, (messages_whole, took)
    assert messages_streamed >= 60 > messages_whole, (messages_streamed, messages_whole)


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:  # ended but not reaped (a container's first process may not reap orphans)
        return "\tZ" in Path(f"/proc/{pid}/status").read_text().split("State:")[1].splitlines()[0]
    except (OSError, IndexError):
        return True


@pytest.fixture(scope="module")
def spare_server(serve_module: Servers) -> ServerThread:
    """Model processes of a spawned backend, with a spare kept (how exllamav2's run)."""
    def factory(entry: ModelEntry, settings: ResolvedSettings) -> ProcessBackend:
        return ProcessBackend(SPAWNED, "fixed-step", entry.model_dir, context_length=256, max_batch=1, step_s=0.001)

    return serve_module(models={"tiny": {"context_length": 256}}, backend_factory=factory)


def test_a_load_after_the_first_takes_the_spare_process_and_a_new_spare_is_started(spare_server: ServerThread) -> None:
    httpx.post(f"{spare_server.root}/admin/load", json={"model": "tiny"}, timeout=120).raise_for_status()

    def spare_pid() -> int | None:
        spares = httpx.get(f"{spare_server.root}/health", timeout=10).json()["spare_processes"]
        return next((s["pid"] for s in spares if s["alive"]), None)

    assert wait_until(lambda: spare_pid() is not None, 60)
    spare, serving = spare_pid(), model_pid(spare_server)
    assert spare != serving
    httpx.post(f"{spare_server.root}/admin/unload", json={"model": "tiny"}, timeout=120).raise_for_status()
    assert wait_until(lambda: process_gone(serving), 60)
    httpx.post(f"{spare_server.root}/admin/load", json={"model": "tiny"}, timeout=120).raise_for_status()
    assert model_pid(spare_server) == spare  # the model went to the process that was ready
    assert wait_until(lambda: spare_pid() not in (None, spare), 60)
    client = openai.OpenAI(base_url=spare_server.base_url, api_key="unused", max_retries=0, timeout=120)
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    assert out.choices[0].finish_reason in ("stop", "length")


def test_a_spare_that_died_is_replaced_by_a_fresh_process(spare_server: ServerThread) -> None:
    httpx.post(f"{spare_server.root}/admin/load", json={"model": "tiny"}, timeout=120).raise_for_status()
    assert wait_until(lambda: any(s["alive"] for s in httpx.get(f"{spare_server.root}/health").json()["spare_processes"]), 60)
    (spare,) = [s["pid"] for s in httpx.get(f"{spare_server.root}/health").json()["spare_processes"]]
    os.kill(spare, signal.SIGKILL)
    httpx.post(f"{spare_server.root}/admin/unload", json={"model": "tiny"}, timeout=120).raise_for_status()
    httpx.post(f"{spare_server.root}/admin/load", json={"model": "tiny"}, timeout=120).raise_for_status()
    assert model_pid(spare_server) not in (None, spare)
    client = openai.OpenAI(base_url=spare_server.base_url, api_key="unused", max_retries=0, timeout=120)
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    assert out.choices[0].finish_reason in ("stop", "length")


def test_spares_end_with_the_pool_and_by_themselves_when_the_server_process_dies(tmp_path: Path) -> None:
    from app.engine.backends.model_process.spares import SparePool

    pool = SparePool()
    pool.refill(SPAWNED)
    (spare,) = pool.describe()
    pool.close()
    assert process_gone(spare["pid"]) and pool.describe() == []
    # a server that dies without closing anything (the tray app leaves without finalization)
    code = ("import os, sys; sys.path.insert(0, sys.argv[1])\n"
            "from app.engine.backends.model_process.spares import SPARES\n"
            f"SPARES.refill({SPAWNED!r})\n"
            "print(SPARES.describe()[0]['pid'], flush=True)\n"
            "os._exit(0)\n")
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code, str(Path(__file__).resolve().parent.parent)],
                         capture_output=True, text=True, timeout=60)
    orphan = int(out.stdout.strip())
    assert wait_until(lambda: process_gone(orphan), 90), "the orphaned spare process kept running"


@pytest.fixture(scope="module")
def fixed_step_server(serve_module: Servers, tmp_path_factory: pytest.TempPathFactory,
                      tiny_model_dir: Path) -> ServerThread:
    """Model processes whose steps take 2 ms ("fast", a small model on a GPU) and 30 ms ("slow")."""
    import shutil

    base = tmp_path_factory.mktemp("fixed")
    registry = Registry(base / "models.json")
    for name in ("fast", "slow"):
        shutil.copytree(tiny_model_dir, base / name)
        register(registry, name, base / name, context_length=4096)

    def factory(entry: ModelEntry, settings: ResolvedSettings) -> ProcessBackend:
        step_s = 0.002 if Path(entry.model_dir).name == "fast" else 0.030
        return ProcessBackend("tests.fixed_step_backend:FixedStepBackend", "fixed-step", entry.model_dir,
                              keep_spare=False, context_length=4096, max_batch=1, step_s=step_s)

    return serve_module(registry=registry, models={}, max_loaded=2, backend_factory=factory)


def stream_tokens(server: ServerThread, model: str, n: int) -> list[str]:
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": n, "stream": True}
    pieces = []
    with httpx.stream("POST", f"{server.base_url}/completions", json=body, timeout=120) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                pieces.extend(c["text"] for c in json.loads(line[6:])["choices"] if c.get("text"))
    return pieces


def test_fast_steps_are_read_on_a_timer_once_the_first_text_is_out(fixed_step_server: ServerThread) -> None:
    from app.engine.serving.pipe_runner import POLL_FASTER_THAN_S

    stream_tokens(fixed_step_server, "fast", 20)  # the runner learns how fast the model steps
    runner = fixed_step_server.engine.manager.resident("fast:latest").runner
    assert runner._step_s is not None and runner._step_s < POLL_FASTER_THAN_S  # noqa: SLF001
    polled, woken = runner.polled_reads, runner.woken_reads
    pieces = stream_tokens(fixed_step_server, "fast", 300)
    assert "".join(pieces) == "a" * 300  # every token, in order, none twice
    assert runner.polled_reads - polled > 50  # read on the timer ...
    assert runner.woken_reads - woken < 100  # ... not woken by each of the 300 tokens (slack for a busy CI)
    records = httpx.get(f"{fixed_step_server.root}/admin/requests", timeout=10).json()["data"]
    assert records[-1]["completion_tokens"] == 300 and records[-1]["finish_reason"] == "length"


def test_a_non_streaming_request_alone_is_never_polled(fixed_step_server: ServerThread) -> None:
    stream_tokens(fixed_step_server, "fast", 20)  # the runner knows the steps are fast
    runner = fixed_step_server.engine.manager.resident("fast:latest").runner
    polled, woken = runner.polled_reads, runner.woken_reads
    body = {"model": "fast", "prompt": "Once upon a time", "max_tokens": 300}
    out = httpx.post(f"{fixed_step_server.base_url}/completions", json=body, timeout=120).json()
    assert out["choices"][0]["text"] == "a" * 300
    # its middle comes merged a few times a second and its end wakes the loop: no timer needed
    assert runner.polled_reads == polled and 2 <= runner.woken_reads - woken < 40


def test_slow_steps_wake_the_loop_and_are_never_polled(fixed_step_server: ServerThread) -> None:
    pieces = stream_tokens(fixed_step_server, "slow", 12)
    runner = fixed_step_server.engine.manager.resident("slow:latest").runner
    assert "".join(pieces) == "a" * 12
    assert runner.polled_reads == 0 and runner.woken_reads >= 12


def test_a_request_arriving_while_polling_is_answered_and_idle_the_loop_waits_on_the_pipe(fixed_step_server: ServerThread) -> None:
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        long = pool.submit(stream_tokens, fixed_step_server, "fast", 400)
        time.sleep(0.3)  # the first is being polled by now
        short = pool.submit(stream_tokens, fixed_step_server, "fast", 5)
        assert "".join(short.result(60)) == "a" * 5 and "".join(long.result(60)) == "a" * 400
    runner = fixed_step_server.engine.manager.resident("fast:latest").runner
    assert runner._fd is not None and runner._timer is None  # noqa: SLF001 - idle again: waiting on the pipe


def test_a_spare_ends_a_while_after_the_last_model_of_its_backend_is_unloaded() -> None:
    from app.engine.backends.model_process.spares import SparePool

    pool = SparePool(idle_s=0.5)
    try:
        pool.loaded(SPAWNED)
        pool.refill(SPAWNED)
        (first,) = pool.describe()
        pool.unloaded(SPAWNED)
        pool.loaded(SPAWNED)  # loaded again in time (a model switch): the spare stays
        time.sleep(1.0)
        assert [s["pid"] for s in pool.describe()] == [first["pid"]] and not process_gone(first["pid"])
        pool.unloaded(SPAWNED)  # nothing of this backend loaded any more
        assert wait_until(lambda: pool.describe() == [], 10) and wait_until(lambda: process_gone(first["pid"]), 10)
    finally:
        pool.close()


def test_where_the_loop_cannot_watch_the_pipe_the_runner_thread_reads_it(serve: Servers,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Windows' proactor loop has no add_reader: the model process is then driven by the runner thread."""
    from app.engine.serving import manager as model_manager
    from app.engine.serving.runner import Runner

    monkeypatch.setattr(model_manager, "loop_can_read", lambda loop, backend: False)
    srv = serve(models={"tiny": {"context_length": 256, "batch_size": 4}},
                backend_factory=lambda e, s: ProcessBackend(TARGET, "transformers", e.model_dir, keep_spare=False,
                                                            context_length=256, max_batch=4))
    client = openai.OpenAI(base_url=srv.base_url, api_key="unused", max_retries=0, timeout=120)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Say something."}], "max_tokens": 8,
            "temperature": 0, "logit_bias": KEEP_TALKING}
    whole = client.chat.completions.create(**body).choices[0].message.content
    runner = srv.engine.manager.resident("tiny:latest").runner
    steps = runner.steps
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        **body, stream=True) if c.choices)
    assert type(runner) is Runner and not runner.backend.loop_reads
    assert streamed == whole != ""
    # a step counted per step message of the model process (prefill, then one per token), never per
    # idle wait for one
    assert runner.steps - steps <= 9, runner.steps - steps


def test_a_step_of_the_model_process_is_waited_for_not_polled_empty(tiny_model_dir: Path) -> None:
    """Where the runner thread reads the pipe, one step() is one step of the model process however long
    it takes (steps of 0.15 s here, three times the pipe's poll): no empty steps for the metrics."""
    backend = ProcessBackend("tests.fixed_step_backend:FixedStepBackend", "fixed-step", str(tiny_model_dir),
                             keep_spare=False, context_length=256, max_batch=1, step_s=0.15)
    backend.load(lambda f, m: None, threading.Event())
    try:
        backend.submit(job([1, 2, 3], 3))
        steps = [backend.step() for _ in range(3)]
        assert [len(s) for s in steps] == [1, 1, 1] and steps[-1][0].finished
    finally:
        backend.unload()


def test_cpu_model_processes_fork_from_a_fork_server_that_ends_a_while_after_the_last_unload(tmp_path: Path) -> None:
    """A CPU model's process forks from a server with torch imported (no import per load, no spare
    kept); a while after the last CPU model is unloaded the fork server ends and its memory goes back."""
    import subprocess
    import sys

    code = ("import sys, time; sys.path.insert(0, sys.argv[1])\n"
            "import psutil\n"
            "from multiprocessing import forkserver\n"
            "from app.engine.backends.model_process.spares import SparePool, start_process\n"
            "pool = SparePool(idle_s=0.5)\n"
            f"first, conn = start_process({TARGET!r})\n"
            "print(psutil.Process(first.pid).ppid(), forkserver._forkserver._forkserver_pid, flush=True)\n"
            f"t = time.perf_counter(); second, conn2 = start_process({TARGET!r})\n"
            "print(time.perf_counter() - t, flush=True)\n"
            "for proc in (first, second): proc.kill(); proc.join()\n"
            f"pool.loaded({TARGET!r}); pool.refill({TARGET!r})\n"
            "print(pool.describe(), flush=True)\n"
            f"pool.unloaded({TARGET!r})\n"
            "deadline = time.monotonic() + 30\n"
            "while forkserver._forkserver._forkserver_pid is not None and time.monotonic() < deadline:\n"
            "    time.sleep(0.1)\n"
            "print(forkserver._forkserver._forkserver_pid, flush=True)\n")
    out = subprocess.run([sys.executable, "-c", code, str(Path(__file__).resolve().parent.parent)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    parents, second, spares, after = out.stdout.strip().splitlines()
    parent, server = map(int, parents.split())
    assert parent == server  # forked from the fork server, not spawned by the server's process
    assert float(second) < 1.0  # no import of torch again (~2.5 s when spawned)
    assert spares == "[]"  # no spare: the fork server is the process with the imports done
    assert after == "None" and process_gone(server)


def test_a_gpu_backends_model_process_gives_torch_one_cpu_thread(tiny_model_dir: Path) -> None:
    """A backend with host_threads 1 (exllamav2, exllamav3) runs its model process with torch's operators
    on one CPU thread (idle OpenMP workers spinning beside the kernel-launching thread kept 9 cores busy
    and doubled the step on the H200); a backend without (transformers: the CPU computes) keeps torch's
    default."""
    import subprocess
    import sys

    from app.engine.backends import exllamav2_backend, exllamav3_backend

    assert exllamav2_backend.ExLlamaV2Backend.host_threads == 1
    assert exllamav3_backend.ExLlamaV3Backend.host_threads == 1
    default = int(subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                                 capture_output=True, text=True, check=True).stdout)
    notices = {}
    for cls in ("OneThreadBackend", "ThreadReportingBackend"):
        backend = ProcessBackend(f"tests.fixed_step_backend:{cls}", "fixed-step", str(tiny_model_dir),
                                 keep_spare=False, context_length=256, max_batch=1)
        backend.load(lambda f, m: None, threading.Event())
        try:
            notices[cls] = backend.notice
        finally:
            backend.unload()
    assert notices["OneThreadBackend"] == "torch threads 1, OMP_NUM_THREADS 1"
    assert notices["ThreadReportingBackend"].startswith(f"torch threads {default}, ")
