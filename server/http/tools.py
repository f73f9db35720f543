"""OpenAI tool calls on ``/v1/chat/completions``: the ``tools`` field, ``tool_choice``, and the
model's output read back as ``tool_calls``.

The model writes calls as a JSON list, ``[{"name": ..., "arguments": {...}}]`` (Mistral's
``[TOOL_CALLS]`` payload; the chat template, or ``server.chat_template.TOOL_PROMPT`` for
templates without tools, teaches it). ``tool_choice``:

- ``none``: the tools are not shown and the output is text;
- ``auto`` (the default with tools): the output is free; when it is such a list (optionally
  after the text ``[TOOL_CALLS]``) naming known functions, it becomes ``tool_calls``;
- ``required``: a JSON-schema constraint forces a non-empty list of calls of the given tools,
  each with arguments valid against that function's ``parameters``;
- ``{"type": "function", "function": {"name": N}}``: the same, one call of N.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from mistralserve.v1 import generation_pb2 as pb

from server.validation import InvalidRequest

CALLS_PREFIX = "[TOOL_CALLS]"


def _kind(value: Any) -> str:
    return type(value).__name__ if value is not None else "null"


@dataclass(frozen=True)
class ToolSpec:
    name: str
    parameters: dict[str, Any]


@dataclass(frozen=True)
class ToolChoice:
    """What the route does with the output: ``auto`` parses it if it is calls, ``forced`` always."""

    mode: str  # "auto" or "forced"
    names: frozenset[str]


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


def choose(value: Any, specs: list[ToolSpec]) -> tuple[str, list[ToolSpec]]:
    """``tool_choice`` -> ("none" | "auto" | "forced", the tools a forced call may use)."""
    if value is None:
        return ("auto" if specs else "none"), specs
    if value in ("none", "auto", "required"):
        if value != "none" and not specs:
            raise InvalidRequest(f"tool_choice: {value!r} needs tools")
        return ("forced" if value == "required" else value), specs
    if isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("function"), dict):
        name = value["function"].get("name")
        chosen = [s for s in specs if s.name == name]
        if not chosen:
            known = ", ".join(s.name for s in specs) or "no tools were given"
            raise InvalidRequest(f"tool_choice.function.name: {name!r} is not one of the tools ({known})")
        return "forced", chosen
    raise InvalidRequest(
        "tool_choice: must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}"
    )


def calls_schema(specs: list[ToolSpec], one: bool) -> dict[str, Any]:
    """The JSON schema of a list of calls of ``specs`` (exactly one call when ``one``)."""
    call = [
        {
            "type": "object",
            "properties": {"name": {"const": s.name}, "arguments": s.parameters},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for s in specs
    ]
    schema: dict[str, Any] = {"type": "array", "items": call[0] if len(call) == 1 else {"anyOf": call}, "minItems": 1}
    if one:
        schema["maxItems"] = 1
    return schema


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def json(self, index: int | None = None) -> dict[str, Any]:
        call: dict[str, Any] = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        return call if index is None else {"index": index, **call}


def _call(item: Any, names: frozenset[str]) -> ToolCall | None:
    if not isinstance(item, dict) or item.get("name") not in names:
        return None
    arguments = item.get("arguments", item.get("parameters", {}))
    if not isinstance(arguments, dict):
        return None
    return ToolCall(item["name"], json.dumps(arguments, ensure_ascii=False))


def parse_calls(text: str, names: frozenset[str]) -> list[ToolCall] | None:
    """The calls ``text`` holds, or None when it is not (only) a list of calls of known tools."""
    body = text.strip().removeprefix(CALLS_PREFIX).strip()
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = [_call(item, names) for item in items]
    if not calls or any(c is None for c in calls):
        return None
    return [c for c in calls if c is not None]


class CallStream:
    """One sample's streamed output, split into content deltas and tool calls.

    Forced: the output is a list of calls; each call is sent as soon as its object is complete.
    Auto: text that starts like a list of calls is held back until the end, then sent as calls
    if it is one and as content if not; other text streams as content right away.
    """

    def __init__(self, choice: ToolChoice) -> None:
        self.choice = choice
        self.buffer = ""
        self.decided: str | None = "calls" if choice.mode == "forced" else None  # "calls" / "candidate" / "text"
        self.position = 0  # forced: where the next call's object may start in buffer

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        if self.decided == "text":
            return text, []
        self.buffer += text
        if self.decided is None:
            head = self.buffer.lstrip()
            if not head or CALLS_PREFIX.startswith(head):
                return "", []
            if head.startswith(("[", "{", CALLS_PREFIX)):
                self.decided = "candidate"
                return "", []
            self.decided = "text"
            held, self.buffer = self.buffer, ""
            return held, []
        if self.decided == "calls":
            return "", self._complete_calls()
        return "", []

    def _complete_calls(self) -> list[ToolCall]:
        calls: list[ToolCall] = []
        decoder = json.JSONDecoder()
        while True:
            start = self.position
            while start < len(self.buffer) and self.buffer[start] in " \n\t\r,[":
                start += 1
            if start >= len(self.buffer) or self.buffer[start] != "{":
                return calls
            try:
                item, end = decoder.raw_decode(self.buffer, start)
            except json.JSONDecodeError:
                return calls
            call = _call(item, self.choice.names)
            if call is not None:
                calls.append(call)
            self.position = end

    def finish(self) -> tuple[str, list[ToolCall]]:
        """At the sample's end: what is still held back."""
        if self.decided == "calls":
            return "", self._complete_calls()
        if self.decided == "candidate":
            calls = parse_calls(self.buffer, self.choice.names)
            if calls is not None:
                return "", calls
        held, self.buffer = self.buffer, ""
        return held, []
