"""A request's chat messages: turns and tools into the model's prompt, the tool choice, and how the
chat's output is read (tool calls in the model's format, reasoning) with the constraint it runs
under. Paths in messages are the request's (``messages[1].role``, ``messages.tool_choice``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from mistralserve.v1 import generation_pb2 as pb

from scheduler.request import Constraint, ConstraintKind
from scheduler.structured import check_constraint
from server.chat_output import ChatOutputSpec
from server.chat_template import ChatTemplateError
from server.invalid import InvalidRequest
from server.reasoning import ReasoningMarkers
from server.tokenizer import Tokenizer
from server.tool_calls import ToolSpec, call_style, forced_calls

ROLES = ("system", "user", "assistant", "tool")
TOOL_CHOICE_MODES = ("auto", "none", "required")


def chat_characters(messages: pb.ChatMessages) -> int:
    """The text a conversation brings to its prompt: contents, tool calls, tools."""
    turns = sum(len(m.content) + sum(len(c.name) + len(c.arguments) for c in m.tool_calls) for m in messages.messages)
    return turns + sum(len(t.name) + len(t.description) + len(t.parameters) for t in messages.tools)


def chat_ids(messages: pb.ChatMessages, tokenizer: Tokenizer) -> list[int]:
    if not messages.messages:
        raise InvalidRequest("messages: must hold at least one message")
    turns = [_chat_turn(i, message) for i, message in enumerate(messages.messages)]
    tools = [_tool(i, tool) for i, tool in enumerate(messages.tools)]
    mode, _ = tool_choice(messages, [ToolSpec(t["function"]["name"], {}) for t in tools])
    try:
        return tokenizer.encode_chat(turns, tools=tools if tools and mode != "none" else None)
    except (ChatTemplateError, ValueError) as exc:
        raise InvalidRequest(f"messages: {exc}") from None


def tool_choice(messages: pb.ChatMessages, specs: Sequence[ToolSpec]) -> tuple[str, list[ToolSpec]]:
    """``messages.tool_choice`` -> ("none" | "auto" | "required" | "function", the tools calls may use)."""
    which = messages.tool_choice.WhichOneof("choice") if messages.HasField("tool_choice") else None
    if which is None:
        return ("auto" if specs else "none"), list(specs)
    if which == "function":
        name = messages.tool_choice.function
        chosen = [s for s in specs if s.name == name]
        if not chosen:
            known = ", ".join(s.name for s in specs) or "no tools were given"
            raise InvalidRequest(f"messages.tool_choice.function: {name!r} is not one of the tools ({known})")
        return "function", chosen
    mode = messages.tool_choice.mode
    if mode not in TOOL_CHOICE_MODES:
        raise InvalidRequest(f"messages.tool_choice.mode: {mode!r} is not one of {', '.join(TOOL_CHOICE_MODES)}")
    if mode != "none" and not specs:
        raise InvalidRequest(f"messages.tool_choice: {mode!r} needs tools (messages.tools is empty)")
    return mode, list(specs)


def chat_output(
    messages: pb.ChatMessages,
    tokenizer: Tokenizer,
    ids: Sequence[int],
    shape: Constraint | None,
    reasoning: ReasoningMarkers | None,
) -> tuple[ChatOutputSpec | None, Constraint | None]:
    """How a chat request's output is read (tool calls, reasoning) and the constraint it runs with:
    a forced tool choice becomes the calls' grammar in the model's format; on a reasoning model a
    constraint applies to the answer, after the thinking."""
    functions = [_tool(i, tool)["function"] for i, tool in enumerate(messages.tools)]
    specs = [ToolSpec(f["name"], f["parameters"] or {"type": "object"}) for f in functions]
    mode, chosen = tool_choice(messages, specs)
    style = call_style(tokenizer) if mode != "none" else None
    if style is not None and mode in ("required", "function"):
        if shape is not None:
            raise InvalidRequest(f"messages.tool_choice: a forced tool call cannot be combined with {shape.kind.value}")
        shape = forced_calls(style, chosen, one=mode == "function")
    opened = reasoning is not None and reasoning.opened_by(tokenizer, ids)
    if reasoning is not None and shape is not None:
        shape = replace(shape, reasoning=reasoning.span(opened))
    if shape is not None and (shape.kind == ConstraintKind.TOOL_CALLS or shape.reasoning is not None):
        try:
            check_constraint(shape)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
    if style is None and reasoning is None:
        return None, shape
    names = frozenset(s.name for s in chosen)
    return ChatOutputSpec(reasoning, opened, style, names, forced=mode in ("required", "function")), shape


def _json_object(text: str, field: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"{field}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise InvalidRequest(f"{field}: must be a JSON object, got {type(value).__name__}")
    return value


def _chat_turn(i: int, message: pb.ChatMessage) -> dict[str, Any]:
    """A message as Hugging Face chat templates take it (OpenAI's shape, arguments as objects)."""
    if message.role not in ROLES:
        raise InvalidRequest(f"messages[{i}].role: {message.role!r} is not one of {', '.join(ROLES)}")
    turn: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        if message.role != "assistant":
            raise InvalidRequest(f"messages[{i}].tool_calls: only assistant messages carry tool calls")
        turn["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {
                    "name": call.name,
                    "arguments": _json_object(call.arguments or "{}", f"messages[{i}].tool_calls[{j}].arguments"),
                },
            }
            for j, call in enumerate(message.tool_calls)
        ]
    if message.role == "tool":
        turn["tool_call_id"] = message.tool_call_id
        if message.name:
            turn["name"] = message.name
    return turn


def _tool(i: int, tool: pb.Tool) -> dict[str, Any]:
    if not tool.name:
        raise InvalidRequest(f"messages.tools[{i}].name: must not be empty")
    parameters = _json_object(tool.parameters, f"messages.tools[{i}].parameters") if tool.parameters else {}
    function: dict[str, Any] = {"name": tool.name, "description": tool.description, "parameters": parameters}
    return {"type": "function", "function": function}
