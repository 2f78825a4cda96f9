"""Real clients against the real server with the tiny model: langchain-openai, llm, the Continue CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.servers import Servers
from tests.server_harness import ServerThread

ROOT = Path(__file__).resolve().parent.parent
CN = Path(os.environ.get("EXLLAMA_TRAY_CN", ROOT / ".cache" / "node" / "node_modules" / ".bin" / "cn"))


@pytest.fixture(scope="module")
def server(serve_module: Servers) -> ServerThread:
    # agents send long system prompts and tool lists: give the tiny model room; keep answers short
    return serve_module(models={"tiny": {"context_length": 32768, "max_tokens": 12}})


def finished(server: ServerThread) -> float:
    text = __import__("httpx").get(f"{server.root}/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("exllama_tray_requests_total{"))


def test_langchain_invoke_stream_and_bind_tools(server: ServerThread) -> None:
    from langchain_core.messages import AIMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI, OpenAI

    before = finished(server)
    chat = ChatOpenAI(base_url=server.base_url, api_key="unused", model="tiny", max_tokens=8, max_retries=0)
    reply = chat.invoke("Hello there")
    assert isinstance(reply, AIMessage) and isinstance(reply.content, str)
    assert reply.usage_metadata and reply.usage_metadata["output_tokens"] >= 1
    chunks = list(chat.stream("Tell me a story"))
    assert len(chunks) >= 2 and all(isinstance(c.content, str) for c in chunks)

    @tool
    def get_weather(city: str) -> str:
        """Get the weather for a city."""
        return "sunny"

    with_tools = chat.bind_tools([get_weather])
    answer = with_tools.invoke("What is the weather in Paris?")
    assert isinstance(answer, AIMessage)  # the random model writes no call (test_tool_calls_langchain forces one)
    llm = OpenAI(base_url=server.base_url, api_key="unused", model="tiny", max_tokens=6, max_retries=0)
    assert isinstance(llm.invoke("Once upon a time"), str)
    assert finished(server) >= before + 4


def test_llm_cli(server: ServerThread, tmp_path: Path) -> None:
    pytest.importorskip("llm")
    (tmp_path / "extra-openai-models.yaml").write_text(
        f'- model_id: tiny\n  model_name: tiny\n  api_base: "{server.base_url}"\n')
    env = {**os.environ, "LLM_USER_PATH": str(tmp_path)}
    before = finished(server)
    for extra in ([], ["--no-stream"], ["-o", "max_tokens", "5", "-o", "temperature", "0.5"]):
        res = subprocess.run([sys.executable, "-m", "llm", "-m", "tiny", *extra, "Say hello"], env=env,
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip()
    assert finished(server) >= before + 3


def test_continue_cli_headless(server: ServerThread, tmp_path: Path) -> None:
    if not CN.exists():
        pytest.skip(f"Continue CLI not installed at {CN} (scripts/dev.py test installs it when npm is present)")
    home, work = tmp_path / "home", tmp_path / "project"
    home.mkdir()
    work.mkdir()
    (work / "README.md").write_text("# scratch project\n")
    config = work / "config.yaml"
    config.write_text(
        "name: exllama-tray-test\nversion: 0.0.1\nschema: v1\nmodels:\n"
        f"  - name: tiny\n    provider: openai\n    model: tiny\n    apiBase: {server.base_url}\n"
        "    apiKey: unused\n    roles:\n      - chat\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI", "CONTINUE"))}
    env.update(HOME=str(home), CI="true", NO_COLOR="1")
    before = finished(server)
    res = subprocess.run([str(CN), "-p", "Say hello in one word", "--config", str(config)], cwd=work, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (res.stdout[-1000:], res.stderr[-1000:])
    assert res.stdout.strip()
    assert finished(server) >= before + 1
    assert shutil.which("node")
