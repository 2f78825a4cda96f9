"""The Continue CLI running one agent turn that calls a tool the test defines (an MCP server of its
own): the scripted backend writes the call in the model's Hermes format, the server's parser turns it
into tool_calls, Continue runs the tool, and the tool's answer (scripted back) ends the turn."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests.helpers.scripted_backend import say, scripted_factory
from tests.helpers.servers import Servers
from tests.server_harness import ServerThread
from tests.test_live_clients import CN

HELPERS = Path(__file__).resolve().parent / "helpers"


@pytest.fixture(scope="module")
def server(serve_module: Servers) -> ServerThread:
    return serve_module(models={"tiny": {"context_length": 32768}}, backend_factory=scripted_factory)


def test_continue_agent_turn_calls_the_test_tool(server: ServerThread, tmp_path: Path) -> None:
    import subprocess

    if not CN.exists():
        pytest.skip(f"Continue CLI not installed at {CN} (scripts/dev.py test installs it when npm is present)")
    home, work = tmp_path / "home", tmp_path / "project"
    home.mkdir()
    work.mkdir()
    calls = tmp_path / "calls.jsonl"
    config = work / "config.yaml"
    config.write_text(
        "name: exllama-tray-agent-test\nversion: 0.0.1\nschema: v1\nmodels:\n"
        f"  - name: tiny\n    provider: openai\n    model: tiny\n    apiBase: {server.base_url}\n"
        "    apiKey: unused\n    roles: [chat]\n    capabilities: [tool_use]\n"
        f"mcpServers:\n  - name: test-tools\n    command: {sys.executable}\n"
        f"    args: [{json.dumps(str(HELPERS / 'mcp_tool_server.py'))}]\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI", "CONTINUE"))}
    env.update(HOME=str(home), CI="true", NO_COLOR="1", MCP_CALLS=str(calls),
               MCP_ANSWER=say("The answer is 42."))
    call = '<tool_call>\n{"name": "lookup_answer", "arguments": {"question": "meaning of life"}}\n</tool_call>'
    res = subprocess.run([str(CN), "-p", say(call), "--config", str(config), "--auto"], cwd=work, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (res.stdout[-1500:], res.stderr[-1500:])
    assert calls.exists(), (res.stdout[-1500:], res.stderr[-1500:])
    assert [json.loads(line) for line in calls.read_text().splitlines()] == [
        {"name": "lookup_answer", "arguments": {"question": "meaning of life"}}]
    assert "The answer is 42." in res.stdout
