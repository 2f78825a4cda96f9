"""The serving benchmark (scripts/bench_serving.py) against the real server on the tiny CPU model: one
small level of each workload, checking the report's shape and that its counts add up (not its speed)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from tests.helpers.tiny import KEEP_TALKING

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_serving.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_serving", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_one_level_of_each_workload_gives_a_complete_report(serve, tmp_path: Path) -> None:
    bench = load_bench()
    server = serve()
    out = tmp_path / "bench"
    rc = bench.main(["--base-url", f"{server.root}/v1", "--model", "tiny", "--out", str(out),
                     "--levels", "2", "--requests-per-client", "2", "--chat-prompt", "48", "--chat-output", "6",
                     "--long-prompt", "200", "--long-output", "4", "--burst-s", "1.0", "--burst-ms", "40",
                     "--logit-bias", json.dumps(KEEP_TALKING)])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["workloads"]) == {"chat", "long", "autocomplete"}
    assert 0 < report["words_per_token"] < 10
    for name, want_tokens in (("chat", 6), ("long", 4)):
        row = report["workloads"][name]["2"]
        assert row["requests"] == row["completed"] == 4, row  # 2 clients x 2 requests, all answered
        assert row["errors"] == row["dropped_streams"] == row["cancelled"] == 0, row
        assert row["output_tokens"] == 4 * want_tokens  # EOS kept away: every request ran to max_tokens
        assert row["output_tok_s"] > 0 and row["requests_per_s"] > 0
        assert 0 < row["ttft_p50_ms"] <= row["ttft_p99_ms"]
        assert 0 < row["itl_p50_ms"] <= row["itl_p99_ms"]
    burst = report["workloads"]["autocomplete"]["2"]
    assert burst["errors"] == burst["dropped_streams"] == 0, burst
    assert burst["completed"] + burst["cancelled"] == burst["requests"] >= 2
    # TTFT counts every request that got a first token, the dropped ones too: at least every completed one
    assert burst["completed"] <= burst["ttft_samples"] <= burst["requests"], burst
    table = (out / "report.md").read_text()
    assert "## chat" in table and "| 2 |" in table
    # every request the editors dropped was let go by the server too
    assert server.metric("exllama_tray_requests_running") == 0


def test_bad_arguments_are_refused_readably(capsys) -> None:
    bench = load_bench()
    try:
        bench.parse_args(["--base-url", "http://x/v1", "--model", "m", "--out", "o", "--levels", "0"])
    except SystemExit as exc:
        assert exc.code == 2
    assert "levels and --requests-per-client must be positive" in capsys.readouterr().err


def test_mixed_and_slot_workloads_report_their_figures(serve, tmp_path: Path) -> None:
    """mixed: an editor's burst beside running chats; slot: a batch filled (batch_size 2), streams dropped one
    at a time, each followed at once by a short request whose wait is counted in the streams' steps."""
    bench = load_bench()
    server = serve(models={"tiny": {"context_length": 2048, "batch_size": 2}})
    out = tmp_path / "bench"
    rc = bench.main(["--base-url", f"{server.root}/v1", "--model", "tiny", "--out", str(out), "--workloads",
                     "mixed", "slot", "--levels", "2", "--requests-per-client", "2", "--chat-prompt", "40",
                     "--chat-output", "24", "--burst-ms", "40", "--slot-trials", "2", "--slot-output", "1500",
                     "--top-k", "40", "--logit-bias", json.dumps(KEEP_TALKING)])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    mixed = report["workloads"]["mixed"]["2"]
    assert mixed["load_completed"] == 4 and mixed["load_output_tok_s"] > 0, mixed  # the chats all answered
    assert mixed["requests"] >= 1 and mixed["errors"] == mixed["dropped_streams"] == 0, mixed
    assert mixed["completed"] + mixed["cancelled"] == mixed["requests"]
    slot = report["workloads"]["slot"]["2"]
    assert slot["requests"] == slot["completed"] == 2 and slot["errors"] == 0, slot  # both short requests answered
    assert slot["idle_ttft_ms"] > 0 and slot["slot_wait_steps_p50"] is not None, slot
    # freed at once: a slot kept until a stream ended would wait hundreds of its 1,500-token steps
    assert slot["slot_wait_steps_max"] < 100, slot
    assert report["settings"]["top_k"] == 40
    assert server.metric("exllama_tray_requests_running") == 0  # the dropped and the stopped streams let go


async def test_calibration_uses_the_tokenizer_endpoint_of_a_server_without_usage() -> None:
    """A server whose non-streamed completions carry no ``usage`` (TabbyAPI's) is calibrated through its
    ``/token/encode``; one with neither is refused with the reason."""
    import aiohttp
    from aiohttp import web

    bench = load_bench()
    counted: list[str] = []

    async def completions(request: web.Request) -> web.Response:
        return web.json_response({"choices": [{"text": "x"}], "usage": None})

    async def encode(request: web.Request) -> web.Response:
        text = (await request.json())["text"]
        counted.append(text)
        return web.json_response({"tokens": list(range(100)), "length": 100})

    for with_encode in (True, False):
        app = web.Application()
        app.router.add_post("/v1/completions", completions)
        if with_encode:
            app.router.add_post("/v1/token/encode", encode)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        client = bench.Client(f"http://127.0.0.1:{port}/v1", "m", "", {}, 10.0)
        try:
            async with aiohttp.ClientSession() as session:
                if with_encode:
                    await client.calibrate(session)
                    assert client.words_per_token == 0.5 and len(counted[0].split()) == 50  # 50 words, 100 tokens
                else:
                    try:
                        await client.calibrate(session)
                        raise AssertionError("calibrated without a token count")
                    except SystemExit as exc:
                        assert "no prompt token count" in str(exc)
        finally:
            await runner.cleanup()
