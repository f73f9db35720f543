"""OpenAI's ``tools`` and ``tool_choice`` on ``/v1/chat/completions``, into the request message.

``tool_choice``:

- ``none``: the tools are not shown and the output is text;
- ``auto`` (the default with tools): the output is free; calls the model writes in its format
  (``server.tool_calls``) come back as ``tool_calls``;
- ``required``: a constraint forces one or more calls of the given tools in the model's format,
  each with arguments valid against that function's ``parameters``;
- ``{"type": "function", "function": {"name": N}}``: the same, exactly one call of N.
"""

from __future__ import annotations

import json
from typing import Any

from mistralserve.v1 import generation_pb2 as pb

from server.invalid import InvalidRequest
from server.tool_calls import ToolSpec


def _kind(value: Any) -> str:
    return type(value).__name__ if value is not None else "null"


def parse_tools(value: Any) -> list[ToolSpec]:
    """OpenAI's ``tools``: ``[{"type": "function", "function": {name, description?, parameters?}}]``."""
    if not isinstance(value, list):
        raise InvalidRequest(f"tools: must be an array of tools, got {_kind(value)}")
    specs: list[ToolSpec] = []
    for i, tool in enumerate(value):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise InvalidRequest(f"{where}: must be {{'type': 'function', 'function': {{name, parameters}}}}")
        function = tool["function"]
        unknown = sorted(set(function) - {"name", "description", "parameters", "strict"})
        if unknown:
            raise InvalidRequest(f"{where}.function.{unknown[0]}: unknown field (allowed: name, description, "
                                 "parameters, strict)")  # fmt: skip
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidRequest(f"{where}.function.name: must be a non-empty string, got {_kind(name)}")
        if name in {s.name for s in specs}:
            raise InvalidRequest(f"{where}.function.name: {name!r} is given twice")
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise InvalidRequest(f"{where}.function.description: must be a string, got {_kind(description)}")
        parameters = function.get("parameters")
        if parameters is None:
            parameters = {"type": "object", "properties": {}}
        if not isinstance(parameters, dict):
            raise InvalidRequest(f"{where}.function.parameters: must be a JSON schema object, got {_kind(parameters)}")
        specs.append(ToolSpec(name, parameters))
    return specs


def add_tools(messages: pb.ChatMessages, tools: list[dict[str, Any]], specs: list[ToolSpec]) -> None:
    for tool, spec in zip(tools, specs, strict=True):
        messages.tools.add(
            name=spec.name,
            description=tool["function"].get("description") or "",
            parameters=json.dumps(spec.parameters),
        )


def choose(value: Any, specs: list[ToolSpec]) -> pb.ToolChoice | None:
    """OpenAI's ``tool_choice`` as the request's (None: unset, "auto" with tools)."""
    if value is None:
        return None
    if value in ("none", "auto", "required"):
        if value != "none" and not specs:
            raise InvalidRequest(f"tool_choice: {value!r} needs tools")
        return pb.ToolChoice(mode=value)
    if isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("function"), dict):
        name = value["function"].get("name")
        if name not in {s.name for s in specs}:
            known = ", ".join(s.name for s in specs) or "no tools were given"
            raise InvalidRequest(f"tool_choice.function.name: {name!r} is not one of the tools ({known})")
        return pb.ToolChoice(function=name)
    raise InvalidRequest(
        "tool_choice: must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}"
    )
