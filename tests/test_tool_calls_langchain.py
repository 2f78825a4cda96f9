"""langchain-openai live: ``bind_tools`` with a tool loop (the scripted backend writes the model's call
in its Hermes format; the tool's answer tells it what to say next), a forced call from the random tiny
model, and ``with_structured_output`` by JSON schema and by function calling."""

from __future__ import annotations

from typing import Literal

import pytest
from pydantic import BaseModel, Field

from tests.helpers.scripted_backend import say, scripted_factory
from tests.helpers.servers import Servers
from tests.server_harness import ServerThread


class Weather(BaseModel):
    """Get the weather for a city."""

    city: Literal["Paris", "Rome", "Oslo"]
    days: int = Field(ge=1, le=7)


class Pet(BaseModel):
    name: str = Field(max_length=10)
    kind: Literal["cat", "dog"]


@pytest.fixture(scope="module")
def scripted(serve_module: Servers) -> ServerThread:
    return serve_module(models={"tiny": {"context_length": 4096}}, backend_factory=scripted_factory)


@pytest.fixture(scope="module")
def tiny(serve_module: Servers) -> ServerThread:
    return serve_module(models={"tiny": {"context_length": 2048}})


def test_bind_tools_and_a_tool_loop(scripted: ServerThread) -> None:
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    calls: list[dict] = []

    @tool(args_schema=Weather)
    def get_weather(city: str, days: int) -> str:
        """Get the weather for a city."""
        calls.append({"city": city, "days": days})
        return say(f"It will be sunny in {city} for {days} days.")  # what the scripted model says next

    chat = ChatOpenAI(base_url=scripted.base_url, api_key="unused", model="tiny", max_retries=0)
    model = chat.bind_tools([get_weather])
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "days": 2}}\n</tool_call>'
    messages: list = [HumanMessage(say("Let me check.\n" + call))]
    for _ in range(3):  # the agent loop: call tools until the model answers
        reply = model.invoke(messages)
        messages.append(reply)
        if not reply.tool_calls:
            break
        for tc in reply.tool_calls:
            messages.append(ToolMessage(get_weather.invoke(tc["args"]), tool_call_id=tc["id"]))
    assert calls == [{"city": "Rome", "days": 2}]
    assert messages[1].content == "Let me check." and messages[1].tool_calls[0]["name"] == "get_weather"
    assert messages[-1].content == "It will be sunny in Rome for 2 days."
    streamed = None
    for chunk in model.stream([HumanMessage(say(call))]):
        streamed = chunk if streamed is None else streamed + chunk
    assert streamed is not None and streamed.tool_calls[0]["args"] == {"city": "Rome", "days": 2}


def test_a_forced_call_from_the_random_model(tiny: ServerThread) -> None:
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(base_url=tiny.base_url, api_key="unused", model="tiny", max_retries=0, max_tokens=120,
                      seed=2)
    reply = chat.bind_tools([Weather], tool_choice="Weather").invoke("Weather in Oslo?")
    (call,) = reply.tool_calls
    assert call["name"] == "Weather"
    Weather.model_validate(call["args"])


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_with_structured_output(tiny: ServerThread, method: str) -> None:
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(base_url=tiny.base_url, api_key="unused", model="tiny", max_retries=0, max_tokens=100,
                      seed=4)
    pet = chat.with_structured_output(Pet, method=method).invoke("Invent a pet.")
    assert isinstance(pet, Pet) and pet.kind in ("cat", "dog") and len(pet.name) <= 10
