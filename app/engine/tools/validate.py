"""The rules a request's ``tools`` and ``tool_choice`` must follow (OpenAI's, which Ollama's tools share):
checked before anything is rendered or parsed, so that a malformed tool is a clear 400 naming the part
at fault. Both wire translations call :func:`check_tools`; it raises ValueError with the reason."""

from __future__ import annotations

from typing import Any


def check_tools(tools: list[dict[str, Any]] | None, choice: str | dict[str, Any] | None) -> None:
    """OpenAI's rules for ``tools`` and ``tool_choice`` (raises ValueError with the reason)."""
    names = [check_tool(i, tool) for i, tool in enumerate(tools or [])]
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise ValueError(f"tool_choice must be 'none', 'auto', 'required' or a function, not {choice!r}")
        if choice == "required" and not names:
            raise ValueError("tool_choice 'required' needs tools")
    elif isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if isinstance(choice.get("function"), dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise ValueError("tool_choice must be {'type': 'function', 'function': {'name': NAME}}")
        if name not in names:
            raise ValueError(f"tool_choice names the function {name!r}, which is not among the tools")


def check_tool(index: int, tool: Any) -> str:
    """One entry of ``tools``: a function with a name and a parameters schema; returns its name."""
    where = f"tools[{index}]"
    fn = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(fn, dict):
        raise ValueError(f"{where}: only tools of type 'function' with a 'function' object are supported")
    if not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ValueError(f"{where}.function.name must be a non-empty string")
    check_parameters(f"{where}.function.parameters", fn.get("parameters", {}))
    return fn["name"]


def check_parameters(where: str, parameters: Any) -> None:
    """A function's ``parameters``: a JSON schema object whose ``properties`` are schemas."""
    if parameters is None:
        return
    if not isinstance(parameters, dict):
        raise ValueError(f"{where} must be a JSON schema object")
    _check_type(where, parameters.get("type"))
    props = parameters.get("properties")
    if props is not None:
        if not isinstance(props, dict):
            raise ValueError(f"{where}.properties must be an object of parameter schemas")
        for name, schema in props.items():
            if not isinstance(schema, (dict, bool)):
                raise ValueError(f"{where}.properties.{name} must be a JSON schema object, "
                                 f"not {type(schema).__name__}")
            if isinstance(schema, dict):
                _check_type(f"{where}.properties.{name}", schema.get("type"))
    required = parameters.get("required")
    if required is not None and (not isinstance(required, list) or not all(isinstance(r, str) for r in required)):
        raise ValueError(f"{where}.required must be a list of parameter names")


def _check_type(where: str, kind: Any) -> None:
    if kind is None or isinstance(kind, str):
        return
    if isinstance(kind, list) and kind and all(isinstance(k, str) for k in kind):
        return
    raise ValueError(f"{where}.type must be a type name or a list of them")
