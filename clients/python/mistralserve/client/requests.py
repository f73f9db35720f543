"""Building request messages from keyword arguments (only what is given is set)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from mistralserve.v1 import generation_pb2 as pb

SAMPLING = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
)
STOPPING = ("max_tokens", "min_tokens", "stop", "stop_token_ids", "ignore_eos", "include_stop_str_in_output")
TOP_LEVEL = ("n", "logprobs", "top_logprobs", "priority", "request_id")
CONSTRAINTS = ("json_schema", "json_object", "regex", "choice", "grammar")  # at most one

Request = TypeVar("Request", pb.GenerateRequest, pb.GenerateStreamRequest)


def build(
    message_type: type[Request],
    prompt: str | None = None,
    *,
    messages: Sequence[Mapping[str, str]] | None = None,
    prompt_token_ids: Sequence[int] | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    tool_choice: str | None = None,
    **options: Any,
) -> Request:
    """``build(pb.GenerateRequest, "Hi", temperature=0.0, max_tokens=8)``; one input only.

    A constraint: ``json_schema=`` (a dict or its JSON text), ``json_object=True``, ``regex=``,
    ``choice=[...]`` or ``grammar=`` (Lark or GBNF text). With ``messages``: ``tools`` as
    ``{"name", "description", "parameters"}`` dicts and ``tool_choice`` ("auto", "none",
    "required" or a function's name)."""
    unknown = set(options) - {*SAMPLING, *STOPPING, *TOP_LEVEL, *CONSTRAINTS}
    if unknown:
        raise TypeError(f"unknown options: {', '.join(sorted(unknown))}")
    given = [
        name
        for name, value in (("prompt", prompt), ("messages", messages), ("prompt_token_ids", prompt_token_ids))
        if value is not None
    ]
    if len(given) != 1:
        raise ValueError("give exactly one of prompt, messages, prompt_token_ids")
    if (tools or tool_choice is not None) and messages is None:
        raise ValueError("tools and tool_choice need messages")
    request = message_type()
    if prompt is not None:
        request.prompt = prompt
    elif messages is not None:
        request.messages.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages)
        for tool in tools or ():
            parameters = tool.get("parameters")
            request.messages.tools.add(name=tool["name"], description=tool.get("description", ""),
                                       parameters=json.dumps(parameters) if parameters is not None else "")  # fmt: skip
        if tool_choice in ("auto", "none", "required"):
            request.messages.tool_choice.mode = tool_choice
        elif tool_choice is not None:
            request.messages.tool_choice.function = tool_choice
    else:
        assert prompt_token_ids is not None
        request.prompt_token_ids.ids.extend(prompt_token_ids)
    for name in SAMPLING:
        if options.get(name) is not None:
            setattr(request.sampling, name, options[name])
    for name in STOPPING:
        value = options.get(name)
        if value is None:
            continue
        if name in ("stop", "stop_token_ids"):
            getattr(request.stopping, name).extend([value] if isinstance(value, str) else value)
        else:
            setattr(request.stopping, name, value)
    for name in TOP_LEVEL:
        if options.get(name) is not None:
            setattr(request, name, options[name])
    constraints = [name for name in CONSTRAINTS if options.get(name) not in (None, False)]
    if len(constraints) > 1:
        raise ValueError(f"give at most one of {', '.join(CONSTRAINTS)} (got {', '.join(constraints)})")
    for name in constraints:
        value = options[name]
        if name == "json_schema":
            request.json_schema = value if isinstance(value, str) else json.dumps(value)
        elif name == "json_object":
            request.json_object.SetInParent()
        elif name == "choice":
            request.choice.values.extend(value)
        else:
            setattr(request, name, value)
    return request
