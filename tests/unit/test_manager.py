"""The model manager's scheduling rules (app/engine/serving/manager.py) with a fake backend, in milliseconds.

A lease (``acquire`` .. ``release``) stands for a running job: the manager only counts leases.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from app.engine.observability.metrics import EngineMetrics
from app.engine.errors import ModelLoadError
from app.engine.serving.manager import ModelManager, Resident
from tests.helpers.fake_backend import FakeFleet
from tests.helpers.waiting import async_wait_until

A, B, C = "a:latest", "b:latest", "c:latest"


def manager(fleet: FakeFleet, max_loaded: int = 1) -> ModelManager:
    return ModelManager(fleet, EngineMetrics(), max_loaded=max_loaded)


def waiting_for(mgr: ModelManager, name: str) -> asyncio.Task[Resident]:
    return asyncio.ensure_future(mgr.acquire(name))


async def settle(n: int = 5) -> None:
    """Let the loop run callbacks and short worker-thread hops."""
    for _ in range(n):
        await asyncio.sleep(0.01)


def resident_names(mgr: ModelManager) -> set[str]:
    return {s.name for s in mgr.states()}


@pytest.fixture
async def fleet():
    fleet = FakeFleet()
    yield fleet
    for gate in fleet.gates.values():
        gate.set()  # never leave a load thread waiting


async def test_max_loaded_must_be_at_least_one(fleet: FakeFleet) -> None:
    with pytest.raises(ValueError):
        manager(fleet, max_loaded=0)


async def test_a_model_is_loaded_on_demand_and_reports_progress(fleet: FakeFleet) -> None:
    fleet.gates[A] = threading.Event()
    mgr = manager(fleet)
    task = waiting_for(mgr, A)
    assert await async_wait_until(lambda: [s.message for s in mgr.states()] == ["half way"])
    (state,) = mgr.states()
    assert (state.name, state.state, state.progress, state.backend) == (A, "loading", 0.5, "fake")
    assert mgr.waiting() == 1 and not task.done()
    fleet.gates[A].set()
    resident = await asyncio.wait_for(task, 5)
    assert resident.state == "ready" and resident.active == 1 and fleet.last(A).loaded
    assert (mgr.states()[0].progress, mgr.states()[0].message, mgr.states()[0].active_jobs) == (1.0, "ready", 1)
    mgr.release(resident)
    assert resident.active == 0 and mgr.waiting() == 0
    await mgr.close()


async def test_requests_for_the_old_model_queue_behind_a_switch(fleet: FakeFleet) -> None:
    mgr = manager(fleet)
    lease_a = await mgr.acquire(A)
    want_b = waiting_for(mgr, B)
    await settle()
    want_a = waiting_for(mgr, A)  # A is resident and ready, but B asked first
    await settle()
    assert not want_b.done() and not want_a.done()
    assert lease_a.active == 1 and resident_names(mgr) == {A}
    order: list[str] = []
    want_b.add_done_callback(lambda t: order.append("b"))
    want_a.add_done_callback(lambda t: order.append("a"))
    mgr.release(lease_a)  # A drains: it is unloaded, B loads and is served
    lease_b = await asyncio.wait_for(want_b, 5)
    await settle()
    assert order == ["b"] and not want_a.done() and resident_names(mgr) == {B}
    assert fleet.last(A).unloads == 1
    mgr.release(lease_b)
    lease_a2 = await asyncio.wait_for(want_a, 5)
    assert order == ["b", "a"] and fleet.loads(A) == 2 and fleet.last(B).unloads == 1
    mgr.release(lease_a2)
    await mgr.close()


async def test_waiters_for_a_ready_model_are_served_together(fleet: FakeFleet) -> None:
    mgr = manager(fleet)
    leases = await asyncio.wait_for(asyncio.gather(*(mgr.acquire(A) for _ in range(5))), 5)
    assert {id(r) for r in leases} == {id(leases[0])} and leases[0].active == 5 and fleet.loads(A) == 1
    for lease in leases:
        mgr.release(lease)
    await mgr.close()


async def test_with_room_for_two_the_idle_least_recently_used_is_evicted(fleet: FakeFleet) -> None:
    mgr = manager(fleet, max_loaded=2)
    for name in (A, B):
        mgr.release(await mgr.acquire(name))
    await asyncio.sleep(0.002)
    mgr.release(await mgr.acquire(A))  # A used last: B is the least recently used
    lease_c = await asyncio.wait_for(mgr.acquire(C), 5)
    assert resident_names(mgr) == {A, C}
    assert fleet.last(B).unloads == 1 and fleet.last(A).unloads == 0
    mgr.release(lease_c)
    await mgr.close()


async def test_a_busy_model_is_never_evicted_even_when_it_is_older(fleet: FakeFleet) -> None:
    mgr = manager(fleet, max_loaded=2)
    busy = await mgr.acquire(A)
    await asyncio.sleep(0.002)
    mgr.release(await mgr.acquire(B))  # B is newer, but idle
    lease_c = await asyncio.wait_for(mgr.acquire(C), 5)
    assert resident_names(mgr) == {A, C} and busy.active == 1
    mgr.release(busy)
    mgr.release(lease_c)
    await mgr.close()


async def test_when_every_resident_is_busy_a_new_model_waits_for_one_to_drain(fleet: FakeFleet) -> None:
    mgr = manager(fleet, max_loaded=2)
    lease_a, lease_b = await mgr.acquire(A), await mgr.acquire(B)
    want_c = waiting_for(mgr, C)
    await settle()
    assert not want_c.done() and resident_names(mgr) == {A, B} and fleet.loads(C) == 0
    mgr.release(lease_b)
    lease_c = await asyncio.wait_for(want_c, 5)
    assert resident_names(mgr) == {A, C} and fleet.last(B).unloads == 1
    mgr.release(lease_a)
    mgr.release(lease_c)
    await mgr.close()


async def test_a_failed_load_fails_only_its_waiters_and_is_kept_until_it_loads(fleet: FakeFleet) -> None:
    fleet.failures[A] = "weights are cut short"
    fleet.gates[A] = threading.Event()
    mgr = manager(fleet)
    want_a = [waiting_for(mgr, A) for _ in range(2)]
    want_b = waiting_for(mgr, B)  # queued behind the load of A
    await settle()
    fleet.gates[A].set()
    for task in want_a:
        with pytest.raises(ModelLoadError, match="model a:latest failed to load: weights are cut short"):
            await asyncio.wait_for(task, 5)
    lease_b = await asyncio.wait_for(want_b, 5)
    assert fleet.last(A).unloads == 1  # a failed load releases what it had
    (failure,) = mgr.load_failures()
    assert failure.name == A and failure.message == "model a:latest failed to load: weights are cut short"
    # another model loading clears the tray's error, not A's record
    assert mgr.last_failure is None
    mgr.release(lease_b)
    # the user repairs A: the next request loads it and the record goes
    del fleet.failures[A]
    mgr.release(await asyncio.wait_for(mgr.acquire(A), 5))
    assert mgr.load_failures() == [] and mgr.last_failure is None
    await mgr.close()


async def test_the_newest_failure_is_the_one_shown_until_any_model_loads(fleet: FakeFleet) -> None:
    fleet.failures.update({A: "broken a", B: "broken b"})
    mgr = manager(fleet)
    for name in (A, B):
        with pytest.raises(ModelLoadError):
            await asyncio.wait_for(mgr.acquire(name), 5)
    assert [f.name for f in mgr.load_failures()] == [A, B]  # oldest first
    assert mgr.last_failure is not None and mgr.last_failure.name == B
    del fleet.failures[A]
    mgr.release(await asyncio.wait_for(mgr.acquire(A), 5))
    assert [f.name for f in mgr.load_failures()] == [B] and mgr.last_failure is None
    await mgr.close()


async def test_a_factory_that_refuses_fails_the_waiters_at_once(fleet: FakeFleet) -> None:
    fleet.factory_errors[A] = "exllamav2 is not installed"
    mgr = manager(fleet)
    with pytest.raises(ModelLoadError, match="exllamav2 is not installed"):
        await asyncio.wait_for(mgr.acquire(A), 5)
    assert mgr.states() == [] and mgr.waiting() == 0
    # kept like any failed load (shown in /health and the tray) until the model loads
    assert [f.message for f in mgr.load_failures()] == ["model a:latest failed to load: exllamav2 is not installed"]
    assert mgr.last_failure is not None and mgr.last_failure.name == A
    mgr.release(await asyncio.wait_for(mgr.acquire(B), 5))  # the slot was never taken
    assert mgr.last_failure is None and [f.name for f in mgr.load_failures()] == [A]
    await mgr.close()


async def test_a_factory_refusal_at_the_head_of_a_queue_lets_the_next_waiter_through(fleet: FakeFleet) -> None:
    fleet.factory_errors[B] = "exllamav2 is not installed"
    mgr = manager(fleet)
    lease_a = await mgr.acquire(A)
    want_b, want_c = waiting_for(mgr, B), waiting_for(mgr, C)  # both wait for A to drain
    await settle()
    mgr.release(lease_a)
    with pytest.raises(ModelLoadError):
        await asyncio.wait_for(want_b, 5)
    try:
        mgr.release(await asyncio.wait_for(want_c, 1))
    finally:
        await mgr.close()


async def test_a_cancelled_load_is_not_a_failure(fleet: FakeFleet) -> None:
    fleet.gates[A] = threading.Event()  # never set: only a cancel ends this load
    mgr = manager(fleet)
    want_a = waiting_for(mgr, A)
    assert await async_wait_until(lambda: fleet.built and fleet.last(A).load_started.is_set())
    assert await asyncio.wait_for(mgr.unload(A), 5) is True
    with pytest.raises(ModelLoadError, match="load cancelled"):
        await asyncio.wait_for(want_a, 5)
    assert mgr.load_failures() == [] and mgr.last_failure is None
    assert mgr.states() == [] and fleet.last(A).unloads == 1
    await mgr.close()


async def test_unload_asked_during_a_load_that_still_completes_unloads_it(fleet: FakeFleet) -> None:
    fleet.gates[A] = threading.Event()
    fleet.deaf.add(A)  # the load is past its last look at the cancel event
    mgr = manager(fleet)
    want_a = waiting_for(mgr, A)
    assert await async_wait_until(lambda: fleet.built and fleet.last(A).load_started.is_set())
    unload = asyncio.ensure_future(mgr.unload(A))
    await settle()
    fleet.gates[A].set()  # the weights finish loading
    try:
        lease = await asyncio.wait_for(want_a, 5)
    except ModelLoadError:
        pass
    else:
        mgr.release(lease)
    try:
        assert await asyncio.wait_for(unload, 1) is True
        assert mgr.states() == []
    finally:
        unload.cancel()
        await mgr.close()


async def test_a_cancelled_load_keeps_an_earlier_failure(fleet: FakeFleet) -> None:
    fleet.failures[A] = "broken"
    mgr = manager(fleet)
    with pytest.raises(ModelLoadError):
        await asyncio.wait_for(mgr.acquire(A), 5)
    del fleet.failures[A]
    fleet.gates[A] = threading.Event()
    want_a = waiting_for(mgr, A)
    assert await async_wait_until(lambda: fleet.loads(A) == 2 and fleet.last(A).load_started.is_set())
    await asyncio.wait_for(mgr.unload(A), 5)
    with pytest.raises(ModelLoadError):
        await asyncio.wait_for(want_a, 5)
    assert [f.message for f in mgr.load_failures()] == ["model a:latest failed to load: broken"]
    await mgr.close()


async def test_a_waiter_that_gives_up_is_skipped(fleet: FakeFleet) -> None:
    mgr = manager(fleet)
    lease_a = await mgr.acquire(A)
    want_b = waiting_for(mgr, B)
    await settle()
    want_b.cancel()
    await asyncio.gather(want_b, return_exceptions=True)
    assert mgr.waiting() == 0
    mgr.release(lease_a)
    await settle()
    assert fleet.loads(B) == 0 and resident_names(mgr) == {A}  # nobody wants B any more
    await mgr.close()


async def test_an_idle_model_is_unloaded_after_its_idle_time(fleet: FakeFleet) -> None:
    fleet.idle_minutes[A] = 0.002  # 120 ms
    mgr = manager(fleet)
    lease = await mgr.acquire(A)
    await asyncio.sleep(0.3)  # a lease held longer than the idle time: a running job is not idleness
    assert resident_names(mgr) == {A}
    mgr.release(lease)
    assert await async_wait_until(lambda: mgr.states() == [], timeout=3)
    assert fleet.last(A).unloads == 1
    mgr.release(await asyncio.wait_for(mgr.acquire(A), 5))  # and it loads again on demand
    assert fleet.loads(A) == 2
    await mgr.close()


async def test_a_new_request_restarts_the_idle_time(fleet: FakeFleet) -> None:
    fleet.idle_minutes[A] = 0.004  # 240 ms
    mgr = manager(fleet)
    mgr.release(await mgr.acquire(A))
    for _ in range(4):  # a request every 120 ms for ~0.5 s: never idle long enough
        await asyncio.sleep(0.12)
        mgr.release(await mgr.acquire(A))
    assert resident_names(mgr) == {A} and fleet.loads(A) == 1
    assert await async_wait_until(lambda: mgr.states() == [], timeout=3)
    await mgr.close()


async def test_without_an_idle_time_a_model_stays(fleet: FakeFleet) -> None:
    mgr = manager(fleet)
    mgr.release(await mgr.acquire(A))
    resident = mgr.resident(A)
    assert resident is not None and resident.idle_timer is None
    await mgr.close()


async def test_unload_waits_for_running_jobs(fleet: FakeFleet) -> None:
    mgr = manager(fleet)
    lease = await mgr.acquire(A)
    unload = asyncio.ensure_future(mgr.unload(A))
    await settle()
    (state,) = mgr.states()
    assert not unload.done() and (state.state, state.message) == ("unloading", "waiting for running jobs")
    assert fleet.last(A).unloads == 0
    again = waiting_for(mgr, A)  # not served by a model that is going away
    await settle()
    assert not again.done()
    mgr.release(lease)
    assert await asyncio.wait_for(unload, 5) is True
    assert fleet.loads(A) >= 1 and fleet.built[0].unloads == 1
    lease2 = await asyncio.wait_for(again, 5)  # loaded afresh for the request that came during the unload
    assert fleet.loads(A) == 2 and lease2.backend is fleet.last(A)
    mgr.release(lease2)
    await mgr.close()


async def test_unloading_a_model_that_is_not_resident_says_so(fleet: FakeFleet) -> None:
    mgr = manager(fleet)
    assert await mgr.unload(A) is False
    await mgr.close()


async def test_close_fails_waiters_and_unloads_once_jobs_end(fleet: FakeFleet) -> None:
    mgr = manager(fleet)
    lease_a = await mgr.acquire(A)
    want_b = waiting_for(mgr, B)
    await settle()
    closing = asyncio.ensure_future(mgr.close())
    with pytest.raises(ModelLoadError, match="the server is shutting down"):
        await asyncio.wait_for(want_b, 5)
    await settle()
    assert not closing.done() and fleet.last(A).unloads == 0  # the running job ends first
    mgr.release(lease_a)
    await asyncio.wait_for(closing, 5)
    assert mgr.states() == [] and fleet.last(A).unloads == 1 and fleet.loads(B) == 0
    with pytest.raises(ModelLoadError, match="the server is shutting down"):
        await mgr.acquire(A)


async def test_close_cancels_a_load_in_progress(fleet: FakeFleet) -> None:
    fleet.gates[A] = threading.Event()
    mgr = manager(fleet)
    want_a = waiting_for(mgr, A)
    assert await async_wait_until(lambda: fleet.built and fleet.last(A).load_started.is_set())
    await asyncio.wait_for(mgr.close(), 5)
    with pytest.raises(ModelLoadError):
        await want_a
    assert mgr.states() == [] and mgr.load_failures() == []


async def test_a_load_cancelled_after_its_last_cancel_check_keeps_an_earlier_failure(fleet: FakeFleet) -> None:
    fleet.failures[A] = "broken"
    mgr = manager(fleet)
    with pytest.raises(ModelLoadError):
        await asyncio.wait_for(mgr.acquire(A), 5)
    del fleet.failures[A]
    fleet.gates[A] = threading.Event()
    fleet.deaf.add(A)
    want_a = waiting_for(mgr, A)
    assert await async_wait_until(lambda: fleet.last(A).load_started.is_set())
    unload = asyncio.ensure_future(mgr.unload(A))
    await settle()
    fleet.gates[A].set()
    with pytest.raises(ModelLoadError, match="load cancelled"):
        await asyncio.wait_for(want_a, 5)
    assert await asyncio.wait_for(unload, 5) is True
    assert [f.message for f in mgr.load_failures()] == ["model a:latest failed to load: broken"]
    assert mgr.last_failure is not None
    await mgr.close()


async def test_a_load_asked_without_a_request_is_not_a_waiting_request(fleet: FakeFleet) -> None:
    fleet.gates[A] = threading.Event()
    metrics = EngineMetrics()
    mgr = ModelManager(fleet, metrics, max_loaded=1)
    load = asyncio.ensure_future(mgr.load(A))  # the tray's Load, /admin/load
    assert await async_wait_until(lambda: [s.message for s in mgr.states()] == ["half way"])
    assert mgr.waiting() == 0 and metrics.waiting._value.get() == 0  # noqa: SLF001
    request = waiting_for(mgr, A)  # a client's request for the model being loaded: that one waits
    await settle()
    assert mgr.waiting() == 1 and metrics.waiting._value.get() == 1  # noqa: SLF001
    fleet.gates[A].set()
    await load
    mgr.release(await request)
    assert mgr.waiting() == 0 and metrics.waiting._value.get() == 0  # noqa: SLF001
