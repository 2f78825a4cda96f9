"""The batch slot kept for short jobs: an autocomplete request starts while the batch is full of chats."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import openai
import pytest

from app.engine.backends.slots import SHORT_MAX_TOKENS, ShortSlots, short_limit, short_reserve_tokens
from app.engine.events import BackendJob, SamplingParams
from tests.helpers.stand_in_backend import StandInBackend
from tests.helpers.servers import Servers
from tests.helpers.tiny import KEEP_TALKING as BAN
from tests.server_harness import ServerThread


def test_long_jobs_beyond_the_batch_are_held_in_order_and_short_ones_pass() -> None:
    slots: ShortSlots[str] = ShortSlots(2)
    running: set[int] = set()
    for job_id in (1, 2):
        assert slots.admit(job_id, 256, f"long{job_id}", running)
        running.add(job_id)
    assert not slots.admit(3, 256, "long3", running)
    assert not slots.admit(4, SHORT_MAX_TOKENS + 1, "long4", running)
    assert slots.admit(5, SHORT_MAX_TOKENS, "short5", running)  # the kept slot
    assert len(slots) == 2
    assert slots.release(running) == []  # both long slots still taken
    running.discard(1)  # job 1 ended
    assert slots.release(running) == ["long3"]
    running.add(3)
    assert slots.cancel(4) and not slots.cancel(4) and not slots.cancel(3)
    running -= {2, 3}
    assert slots.release(running) == [] and len(slots) == 0
    assert slots.admit(6, 100, "long6", running)  # nothing held: straight in


def test_a_short_job_must_fit_the_pages_kept_for_it() -> None:
    """On the GPU backends the short slot has 2,048 tokens of cache pages: a long prompt is not short."""
    assert short_reserve_tokens(32768, 256) == 2048 and short_limit(32768) == 2047
    assert short_reserve_tokens(1000, 256) == 1024 and short_limit(1000) == 999
    slots: ShortSlots[str] = ShortSlots(1, short_tokens=short_limit(4096))
    assert slots.admit(1, 500, "chat", set())
    assert slots.admit(2, 16, "autocomplete", {1}, prompt_tokens=1500)
    assert not slots.admit(3, 16, "a 16-token answer to a 3,000-token prompt", {1}, prompt_tokens=3000)


def test_a_held_job_keeps_its_place_behind_earlier_ones() -> None:
    slots: ShortSlots[int] = ShortSlots(1)
    assert slots.admit(1, 500, 1, {1})
    assert not slots.admit(2, 500, 2, {1})
    # a long slot is free, but job 2 came first: job 3 waits behind it
    assert not slots.admit(3, 500, 3, set())
    assert slots.release(set()) == [2]
    assert slots.release({2}) == []
    assert slots.release(set()) == [3]
    with pytest.raises(ValueError):
        ShortSlots(0)


def _job(job_id: int, max_new_tokens: int) -> BackendJob:
    return BackendJob(prompt_ids=[5, 6], max_new_tokens=max_new_tokens, sampling=SamplingParams(), stop_strings=[],
                      stop_token_ids={2}, job_id=job_id)


def test_the_gpu_backends_hold_long_jobs_beyond_the_batch_until_one_ends(tiny_model_dir) -> None:
    """GeneratorJobs (exllamav2's and exllamav3's job handling) over a stand-in for their generators."""
    backend = StandInBackend(tiny_model_dir, long_slots=1)
    for job_id, tokens in ((1, 256), (2, 256), (3, 16), (4, 300)):
        backend.submit(_job(job_id, tokens))
    in_generator = lambda: [j["id"] for j in backend._generator.jobs]  # noqa: E731
    assert in_generator() == [1, 3]  # the long job 1 and the short job 3 in the kept slot
    assert backend.active_jobs() == 4 and backend.has_work()
    backend.cancel(2)  # held: dropped without ever reaching the generator
    assert backend.active_jobs() == 3
    assert backend._take_refused() == [] and in_generator() == [1, 3]  # job 1 still runs
    backend._generator.jobs.pop(0)  # job 1 ends: what a step does when the library reports its end
    backend._jobs.pop(1)
    assert backend._take_refused() == [] and in_generator() == [3, 4]
    backend.cancel(3)
    backend.cancel(4)
    assert not backend.has_work() and backend.active_jobs() == 0


@pytest.fixture(scope="module")
def server(serve_module: Servers) -> ServerThread:
    return serve_module(models={"tiny": {"context_length": 512, "batch_size": 1}})


async def _stream(session: aiohttp.ClientSession, url: str, max_tokens: int, times: dict, key: str) -> None:
    body = {"model": "tiny", "prompt": f"chat {key}", "max_tokens": max_tokens, "stream": True, "logit_bias": BAN,
            "temperature": 0}
    async with session.post(f"{url}/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        async for line in resp.content:
            if line.startswith(b"data: {") and key + "_first" not in times:
                times[key + "_first"] = time.monotonic()
    times[key + "_end"] = time.monotonic()


def test_autocomplete_starts_while_the_batch_is_full_and_a_second_chat_waits(server: ServerThread) -> None:
    """batch_size 1: chat A runs; chat B is held until A ends; a 16-token completion (what an editor
    asks for) runs beside A in the slot kept for short jobs, and ends long before A."""
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)
    times: dict[str, float] = {}

    async def go() -> None:
        async with aiohttp.ClientSession() as session:
            a = asyncio.ensure_future(_stream(session, server.base_url, 400, times, "a"))
            while "a_first" not in times:
                await asyncio.sleep(0.005)
            b = asyncio.ensure_future(_stream(session, server.base_url, SHORT_MAX_TOKENS + 16, times, "b"))
            short = await asyncio.to_thread(lambda: client.completions.create(
                model="tiny", prompt="def add(a, b):", max_tokens=16, temperature=0,
                logit_bias=BAN))
            times["short_end"] = time.monotonic()
            times["short_tokens"] = short.usage.completion_tokens
            assert not a.done(), "chat A ended before the short request did: the test proves nothing"
            await asyncio.gather(a, b)

    asyncio.run(go())
    assert times["short_tokens"] == 16
    assert times["short_end"] < times["a_end"]
    assert times["b_first"] > times["a_end"] - 0.05, times  # B held for the one long slot


def test_the_cpu_backend_prefills_a_short_job_before_a_long_prompt_ahead_of_it(tiny_model_dir) -> None:
    """The CPU backend prefills one chunk (256 tokens) a step. A 16-token completion that arrives behind a
    1,000-token chat prompt gets the next chunk and its first token at the first step, not after the four
    steps of that prompt; the chat's prefill then goes on where it was and it answers whole."""
    import threading

    from app.engine.backends.transformers_backend import PREFILL_CHUNK, TransformersBackend

    backend = TransformersBackend(str(tiny_model_dir), context_length=2048, max_batch=2)
    backend.load(lambda f, m: None, threading.Event())
    # every token gives text at once: none that ends the job, none whose text alone is held (a lone byte)
    quiet = [i for i in range(backend.vocab_size or 0) if (text := backend.decode([i])) == "" or "\ufffd" in text]
    assert quiet, "the tiny tokenizer has lone bytes: none found, so the ban below means nothing"
    greedy = SamplingParams(temperature=0.0, logit_bias={2: -100.0, 5: -100.0, **{i: -100.0 for i in quiet}})
    long_prompt = [10 + (i * 37) % 900 for i in range(1000)]
    backend.submit(BackendJob(prompt_ids=long_prompt, max_new_tokens=SHORT_MAX_TOKENS + 16, sampling=greedy,
                              stop_strings=[], stop_token_ids=set(), job_id=1))
    backend.submit(BackendJob(prompt_ids=[10, 11, 12], max_new_tokens=16, sampling=greedy, stop_strings=[],
                              stop_token_ids=set(), job_id=2))
    first: dict[int, int] = {}
    tokens = {1: 0, 2: 0}
    step = 0
    try:
        while backend.has_work():
            step += 1
            for event in backend.step():
                first.setdefault(event.job_id, step)
                tokens[event.job_id] += event.new_tokens
    finally:
        backend.unload()
    chunks = -(-len(long_prompt) // PREFILL_CHUNK)
    assert first[2] == 1, first
    assert first[1] == chunks + 1, first  # its chunks came one a step, the first after the short job's
    assert tokens == {1: SHORT_MAX_TOKENS + 16, 2: 16}


def _grammar_job(job_id: int, max_new_tokens: int) -> BackendJob:
    from app.engine.constraints.grammars import json_object_grammar

    return BackendJob(prompt_ids=[5, 6], max_new_tokens=max_new_tokens, sampling=SamplingParams(), stop_strings=[],
                      stop_token_ids={2}, job_id=job_id, grammar=json_object_grammar())


def _steps_until(backend: StandInBackend, done, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done() and time.monotonic() < deadline:
        backend._take_refused()  # what each step does first
    assert done(), [j["id"] for j in backend._generator.jobs]


def test_a_grammar_job_keeps_its_place_for_a_slot_while_it_compiles(tiny_model_dir) -> None:
    """One long slot. A long job with a grammar takes the free slot when it is submitted, though its
    grammar still compiles: a plain long job sent just after it waits for that slot rather than taking it.
    And one held behind a running job gets the slot that job frees before a plain job sent after it."""
    in_generator = lambda: [j["id"] for j in backend._generator.jobs]  # noqa: E731
    backend = StandInBackend(tiny_model_dir, long_slots=1)
    backend.submit(_grammar_job(1, 256))
    backend.submit(_job(2, 256))
    assert in_generator() == [] and backend.active_jobs() == 2  # 1 compiling with its slot, 2 held
    _steps_until(backend, lambda: in_generator() == [1])
    backend._take_refused()
    assert in_generator() == [1]  # job 2 still held: the slot is job 1's
    backend.cancel(1)
    _steps_until(backend, lambda: in_generator() == [2])

    backend.submit(_grammar_job(3, 256))  # held behind job 2
    backend.submit(_job(4, 256))  # held behind job 3
    _steps_until(backend, lambda: 3 in backend._compiled)  # its grammar ready while it is held
    assert in_generator() == [2] and backend.active_jobs() == 3
    backend.cancel(2)  # job 2 ends: its slot is job 3's, which starts at the next step with its filters
    backend._take_refused()
    assert in_generator() == [3] and backend.active_jobs() == 2
    backend.cancel(3)
    _steps_until(backend, lambda: in_generator() == [4])
    backend.cancel(4)
    assert not backend.has_work() and backend.active_jobs() == 0


def test_completions_sent_one_after_another_slow_a_long_prefill_but_never_stop_it(tiny_model_dir) -> None:
    """An editor sends a new completion while the last one still prefills (each a 600-token prompt: three
    chunks). The chat's 1,000-token prompt ahead of them still gets every other chunk: it is prefilled
    (and has its first token) within twice its own chunks' steps, where taking every short job first kept
    it waiting until the completions stopped (step 25)."""
    import threading

    from app.engine.backends.transformers_backend import PREFILL_CHUNK, TransformersBackend

    backend = TransformersBackend(str(tiny_model_dir), context_length=2048, max_batch=4)
    backend.load(lambda f, m: None, threading.Event())
    greedy = SamplingParams(temperature=0.0, logit_bias={2: -100.0, 5: -100.0})
    prompt = [10 + (i * 37) % 900 for i in range(1000)]
    backend.submit(BackendJob(prompt_ids=prompt, max_new_tokens=SHORT_MAX_TOKENS + 16, sampling=greedy,
                              stop_strings=[], stop_token_ids=set(), job_id=1))
    prefilled_at: dict[int, int] = {}
    try:
        for step in range(1, 40):
            if step % 2 == 1 and step < 20:  # a new completion every other step, the previous one dropped
                backend.cancel(100 + step - 2)
                backend.submit(BackendJob(prompt_ids=prompt[:600], max_new_tokens=16, sampling=greedy,
                                          stop_strings=[], stop_token_ids=set(), job_id=100 + step))
            backend.step()
            if 1 not in prefilled_at and any(j.job.job_id == 1 for j in backend._running):
                prefilled_at[1] = step
    finally:
        backend.unload()
    chunks = -(-len(prompt) // PREFILL_CHUNK)
    assert prefilled_at.get(1, 99) <= 2 * chunks, prefilled_at


def test_a_held_grammar_job_refused_gives_up_its_place(tiny_model_dir) -> None:
    """One long slot, job 1 running: a grammar job held behind it whose grammar the engine refuses ends
    (the request's fault) without ever reaching the generator, and the plain job held after it gets the
    slot job 1 frees."""
    in_generator = lambda: [j["id"] for j in backend._generator.jobs]  # noqa: E731
    backend = StandInBackend(tiny_model_dir, long_slots=1)
    backend.submit(_job(1, 256))
    backend.submit(BackendJob(prompt_ids=[5, 6], max_new_tokens=256, sampling=SamplingParams(), stop_strings=[],
                              stop_token_ids={2}, job_id=2, grammar="start: not lark ((("))
    backend.submit(_job(3, 256))
    events: list = []
    deadline = time.monotonic() + 30
    while not events and time.monotonic() < deadline:
        events += backend._take_refused()
    assert [(e.job_id, e.finish_reason, e.error_kind) for e in events] == [(2, "error", "request")]
    assert in_generator() == [1] and backend.active_jobs() == 2  # 1 runs, 3 is held
    backend.cancel(1)
    backend._take_refused()
    assert in_generator() == [3] and backend.active_jobs() == 1
