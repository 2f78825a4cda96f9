"""Structured output and tool calls on a GPU backend (issue #18), for checks.py and exl3_stage.py.

``requests_check``: through the openai SDK, one ``json_schema`` (strict) chat request whose content must
validate against its schema, one ``tool_choice`` naming a function (non-streamed: the call's arguments
validate against the tool's parameters) and one ``tool_choice: required`` streamed with ``parallel_tool_calls`` false (its deltas
assemble into one call that validates), on a model registered with the Hermes tool format.

``overhead``: the constrained-decoding cost in paged batching. Each round runs, in turns, 8 free streams
plus a 9th free one, and 8 free streams plus a 9th under a JSON-schema grammar that cannot end before
``max_tokens`` (an array of at least 200 integers); the figure is the free jobs' decode rate (tokens a
second between their first and last chunk, median of the 8) with the constrained 9th over with the
free 9th, median of the rounds' ratios. Goal: the free jobs lose <= 10%.
"""

from __future__ import annotations

import asyncio
import json
import statistics
from typing import Any

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 24},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}}}
LONG = {"type": "object", "required": ["xs"], "properties": {
    "xs": {"type": "array", "items": {"type": "integer"}, "minItems": 200}}}


def _valid(value: Any, schema: dict) -> str:
    """'' when ``value`` validates against ``schema``, else the reason."""
    import jsonschema

    try:
        jsonschema.validate(value, schema)
        return ""
    except jsonschema.ValidationError as exc:
        return exc.message[:200]


def _args_ok(calls: list[dict]) -> tuple[bool, str]:
    reasons = []
    for call in calls:
        try:
            why = _valid(json.loads(call["function"]["arguments"]), WEATHER)
        except json.JSONDecodeError as exc:
            why = f"arguments are not JSON: {exc}"
        if call["function"]["name"] != "get_weather" or why:
            reasons.append(f"{call['function']['name']}: {why}")
    return bool(calls) and not reasons, "; ".join(reasons)


def requests_check(rep: Any, base: str, model: str, label: str, ban: dict) -> dict[str, Any]:
    """The three requests above against ``model`` (registered with ``--tool-format hermes``)."""
    import openai

    client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=300)
    msgs = [{"role": "user", "content": "Describe a person, then check the weather."}]
    out: dict[str, Any] = {}
    schema = client.chat.completions.create(
        model=model, messages=msgs, max_tokens=300, temperature=0.8, seed=3, logit_bias=ban,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
    text, finish = schema.choices[0].message.content or "", schema.choices[0].finish_reason
    try:
        why = _valid(json.loads(text), PERSON)
    except json.JSONDecodeError as exc:
        why = f"not JSON: {exc}"
    out["json_schema"] = {"content": text[:300], "finish_reason": finish, "tokens": schema.usage.completion_tokens}
    rep.check(f"{label}: a strict json_schema answer parses and validates against its schema",
              finish == "stop" and not why, f"{finish}, {why or 'valid'}: {text[:160]}")
    named = client.chat.completions.create(
        model=model, messages=msgs, tools=TOOLS, max_tokens=200, seed=4, logit_bias=ban,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    calls = [c.model_dump() for c in named.choices[0].message.tool_calls or []]
    ok, why = _args_ok(calls)
    out["named"] = {"calls": calls, "finish_reason": named.choices[0].finish_reason}
    rep.check(f"{label}: tool_choice naming get_weather gives that call with arguments valid for its parameters",
              ok and named.choices[0].finish_reason == "tool_calls", json.dumps(out["named"])[:300] + " " + why)
    parts: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(model=model, messages=msgs, tools=TOOLS, max_tokens=200, seed=5,
                                                logit_bias=ban, tool_choice="required", stream=True,
                                                parallel_tool_calls=False):
        for ch in chunk.choices:
            finish = ch.finish_reason or finish
            for d in ch.delta.tool_calls or []:
                part = parts.setdefault(d.index, {"id": "", "function": {"name": "", "arguments": ""}})
                part["id"] += d.id or ""
                part["function"]["name"] += (d.function.name or "") if d.function else ""
                part["function"]["arguments"] += (d.function.arguments or "") if d.function else ""
    calls = [parts[i] for i in sorted(parts)]
    ok, why = _args_ok(calls)
    out["required_stream"] = {"calls": calls, "finish_reason": finish}
    rep.check(f"{label}: tool_choice required, parallel_tool_calls false, streamed: delta.tool_calls assemble into one "
              "call that validates",
              ok and finish == "tool_calls" and len(calls) == 1 and all(c["id"] for c in calls), json.dumps(calls)[:300] + " " + why)
    return out


def _rate(res: Any) -> float:
    """A stream's decode rate: its tokens after the first over the time from its first chunk to its last (a
    chunk can carry several tokens: a random model's text holds back incomplete UTF-8)."""
    stamps = res.stamps
    return (res.tokens - 1) / (stamps[-1] - stamps[0]) if len(stamps) >= 2 and stamps[-1] > stamps[0] else 0.0


def overhead(rep: Any, base: str, model: str, label: str, ban: dict, prompt: str, rounds: int = 9,
             tokens: int = 256) -> dict[str, Any]:
    """See the module's docstring; the figures and the <= 10% check."""
    import paged_clients

    def body(i: int, constrained: bool = False) -> dict:
        b = {"model": model, "prompt": f"{i} {prompt}", "max_tokens": tokens, "temperature": 0.8, "top_k": 40,
             "top_p": 0.9, "seed": 100 + i, "logit_bias": ban}
        return {**b, "response_format": {"type": "json_schema", "json_schema": {"name": "xs", "schema": LONG}}} \
            if constrained else b

    free = [body(i) for i in range(8)]
    configs = {"free9": [*free, body(8)], "constrained9": [*free, body(8, constrained=True)]}
    asyncio.run(paged_clients.batch(base, configs["free9"][:2]))  # warm: load, first grammar's compiler
    asyncio.run(paged_clients.batch(base, configs["constrained9"][-1:]))
    got: dict[str, list[dict]] = {k: [] for k in configs}
    for r in range(rounds):
        order = list(configs) if r % 2 == 0 else list(reversed(configs))
        for name in order:
            results, wall = asyncio.run(paged_clients.batch(base, configs[name]))
            got[name].append({"free_rate_median": statistics.median(_rate(x) for x in results[:8]),
                              "ninth_rate": _rate(results[8]), "ninth_tokens": results[8].tokens,
                              "ninth_finish": results[8].finish, "lost": sum(not x.ok for x in results),
                              "wall_s": round(wall, 3)})
    ratios = [c["free_rate_median"] / f["free_rate_median"] for f, c in zip(got["free9"], got["constrained9"])
              if f["free_rate_median"]]
    ratio = statistics.median(ratios) if ratios else 0.0
    walls = [f["wall_s"] / c["wall_s"] for f, c in zip(got["free9"], got["constrained9"])]
    lost = sum(x["lost"] for v in got.values() for x in v)
    data = {"rounds": got, "pair_ratios": [round(x, 4) for x in ratios], "free_rate_ratio_median": round(ratio, 4),
            "constrained_rate_median": statistics.median(x["ninth_rate"] for x in got["constrained9"]),
            "free_ninth_rate_median": statistics.median(x["ninth_rate"] for x in got["free9"]),
            "wall_ratio_median": round(statistics.median(walls), 4)}
    rep.check(f"{label}: 8 free + 1 constrained job in one batch: the free jobs decode >= 0.90x their rate "
              "beside a free 9th job", ratio >= 0.90 and lost == 0,
              f"ratio {ratio:.3f} (pairs {data['pair_ratios']}), constrained job "
              f"{data['constrained_rate_median']:.0f} tok/s vs free 9th {data['free_ninth_rate_median']:.0f}, batch wall "
              f"ratio {data['wall_ratio_median']:.3f}, lost {lost}")
    return data


def on_served_model(rep: Any, folder: str, backend: str, out: dict[str, Any]) -> None:
    """Both parts on ``folder`` (a model of the checks' work folder) as served by ``backend``, registered as
    ``<folder>-tools`` with the Hermes tool format; the figures go into ``out``."""
    from gpu_base import BAN, BASE, PAGED_BATCH, PROMPT, register

    name, label = f"{folder}-tools", f"{backend} {folder}"
    register(name, folder, ["--context-length", "2048", "--max-batch-size", str(PAGED_BATCH),
                            "--tool-format", "hermes"], served=True)
    out["requests"] = requests_check(rep, BASE, name, label, BAN)
    rep.save()
    out["overhead"] = overhead(rep, BASE, name, label, BAN, PROMPT)


def overhead_on(rep: Any, folder: str, backend: str) -> dict[str, Any]:
    """The batch overhead alone on ``folder`` (a model of realistic shape: the grammar engine's mask is made
    over its whole vocabulary every step), registered as ``<folder>-json``."""
    from gpu_base import BAN, BASE, PAGED_BATCH, PROMPT, register

    name = f"{folder}-json"
    register(name, folder, ["--context-length", "2048", "--max-batch-size", str(PAGED_BATCH)], served=True)
    return overhead(rep, BASE, name, f"{backend} {folder}", BAN, PROMPT)
