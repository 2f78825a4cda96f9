"""A job submitted to a model that is unloading is refused as a load error (the API's 503 with the reason),
not a bare RuntimeError (a 500)."""

from __future__ import annotations

import asyncio

import pytest

from app.engine.errors import ModelLoadError
from app.engine.events import BackendJob, SamplingParams
from app.engine.observability.metrics import EngineMetrics
from app.engine.serving.runner import Runner
from tests.helpers.fake_backend import FakeBackend


def test_a_stopped_runner_refuses_new_jobs_with_a_load_error() -> None:
    async def scenario() -> None:
        runner = Runner("m:latest", FakeBackend("m"), EngineMetrics(), asyncio.get_running_loop())
        runner.start()
        await asyncio.to_thread(runner.stop)
        with pytest.raises(ModelLoadError, match="model m:latest is unloading; send the request again"):
            runner.submit(BackendJob([1, 2], 2, SamplingParams(), [], set(), job_id=7))

    asyncio.run(scenario())
