"""HTTP request bodies (OpenAI's and Workers AI's JSON) into the gRPC ``GenerateRequest``.

The bodies are checked for shape here (types, which fields a route takes); the rules on values
(ranges, context room, roles, token ids) are ``server.validation``'s, reached through the same
``GenerateRequest`` message the gRPC front-end validates, so both give the same messages.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mistralserve.v1 import generation_pb2 as pb

from server.http.tools import add_tools, choose, parse_tools
from server.invalid import InvalidRequest
from server.validation import CONSTRAINT_FIELD_NUMBERS

UINT32 = (1 << 32) - 1
INT32 = 1 << 31
INT64 = 1 << 63


def kind_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(f"{name}: must be a number, got {kind_name(value)}")
    return float(value)


def whole_number(name: str, value: Any) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{name}: must be an integer, got {kind_name(value)}")
    return int(value)


def integer(name: str, value: Any, low: int, high: int) -> int:
    number = whole_number(name, value)
    if not low <= number <= high:
        raise InvalidRequest(f"{name}: must be in [{low}, {high}], got {number}")
    return number


def unsigned(name: str, value: Any, minimum: int) -> int:
    """An unsigned field whose smallest allowed value (``minimum``) ``server.validation`` checks."""
    number = whole_number(name, value)
    if number < 0:
        raise InvalidRequest(f"{name}: must be >= {minimum}, got {number}")
    if number > UINT32:
        raise InvalidRequest(f"{name}: must be <= {UINT32}, got {number}")
    return number


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidRequest(f"{name}: must be true or false, got {kind_name(value)}")
    return value


def string(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidRequest(f"{name}: must be a string, got {kind_name(value)}")
    return value


def strings(name: str, value: Any) -> list[str]:
    """A string or an array of strings (OpenAI's ``stop``)."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise InvalidRequest(f"{name}: must be a string or an array of strings, got {kind_name(value)}")
    return value


def token_ids(name: str, value: Any) -> list[int]:
    if not isinstance(value, list):
        raise InvalidRequest(f"{name}: must be an array of token ids, got {kind_name(value)}")
    return [unsigned(f"{name}[{i}]", item, 0) for i, item in enumerate(value)]


# Sampling and stopping fields every generation route takes: name -> (where in the request, parser).
Setter = Callable[[pb.GenerateRequest, str, Any], None]


def _sampling(name: str, parse: Callable[[str, Any], Any]) -> Setter:
    def set_(request: pb.GenerateRequest, given: str, value: Any) -> None:
        setattr(request.sampling, name, parse(given, value))

    return set_


def _stopping(name: str, parse: Callable[[str, Any], Any]) -> Setter:
    def set_(request: pb.GenerateRequest, given: str, value: Any) -> None:
        parsed = parse(given, value)
        if isinstance(parsed, list):
            getattr(request.stopping, name).extend(parsed)
        else:
            setattr(request.stopping, name, parsed)

    return set_


def _n(request: pb.GenerateRequest, given: str, value: Any) -> None:
    request.n = integer(given, value, 1, 16)


SAMPLING: dict[str, Setter] = {
    "temperature": _sampling("temperature", number),
    "top_p": _sampling("top_p", number),
    "top_k": _sampling("top_k", lambda n, v: integer(n, v, -INT32, INT32 - 1)),
    "min_p": _sampling("min_p", number),
    "seed": _sampling("seed", lambda n, v: integer(n, v, -INT64, INT64 - 1)),
    "repetition_penalty": _sampling("repetition_penalty", number),
    "presence_penalty": _sampling("presence_penalty", number),
    "frequency_penalty": _sampling("frequency_penalty", number),
    "max_tokens": _stopping("max_tokens", lambda n, v: unsigned(n, v, 1)),
    "min_tokens": _stopping("min_tokens", lambda n, v: unsigned(n, v, 0)),
    "stop": _stopping("stop", strings),
    "stop_token_ids": _stopping("stop_token_ids", token_ids),
    "ignore_eos": _stopping("ignore_eos", boolean),
    "include_stop_str_in_output": _stopping("include_stop_str_in_output", boolean),
    "n": _n,
}
# Accepted and ignored: OpenAI fields that say nothing about generation here.
IGNORED = frozenset({"user", "store", "metadata", "service_tier", "parallel_tool_calls", "skip_special_tokens"})


@dataclass
class HttpRequest:
    """A route's body as a ``GenerateRequest``, with what the HTTP answer needs besides."""

    request: pb.GenerateRequest
    model: str | None = None
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False  # chat: logprobs in the answer
    param_names: dict[str, str] = field(default_factory=dict)  # validation's field path -> the body's name
    json_response: bool = False  # Workers AI JSON mode: the whole answer's response is the parsed object
    return_token_ids: bool = False  # vLLM's: prompt_token_ids and each choice's token_ids in the answer


def check_fields(body: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed - IGNORED)
    if unknown:
        raise InvalidRequest(
            f"{unknown[0]}: unknown field (this route takes {', '.join(sorted(allowed - {'model'}))}, and model)"
        )


def apply_sampling(request: pb.GenerateRequest, body: Mapping[str, Any], renames: Mapping[str, str]) -> None:
    """Set the sampling and stopping fields present (and not null) in ``body``; ``renames``
    maps a body name to the field it sets (``max_completion_tokens`` -> ``max_tokens``)."""
    for given, value in body.items():
        name = renames.get(given, given)
        if value is None or name not in SAMPLING:
            continue
        SAMPLING[name](request, given, value)


def must_be_null_or(body: Mapping[str, Any], name: str, allowed: Any, what: str) -> None:
    value = body.get(name)
    if value is not None and value != allowed:
        raise InvalidRequest(f"{name}: {what}")


def stream_fields(body: Mapping[str, Any]) -> tuple[bool, bool]:
    stream = boolean("stream", body["stream"]) if body.get("stream") is not None else False
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise InvalidRequest(f"stream_options: must be an object, got {kind_name(options)}")
        if not stream:
            raise InvalidRequest("stream_options: only allowed with stream: true")
        for key, value in options.items():
            if key == "include_usage":
                include_usage = boolean("stream_options.include_usage", value)
            elif key != "continuous_usage_stats":
                raise InvalidRequest(f"stream_options.{key}: unknown field (allowed: include_usage)")
    return stream, include_usage


def model_field(body: Mapping[str, Any]) -> str | None:
    value = body.get("model")
    return None if value is None else string("model", value)


def message_list(value: Any, name: str = "messages") -> pb.ChatMessages:
    """OpenAI chat messages: ``content`` a string or text parts; ``developer`` is ``system``."""
    if not isinstance(value, list):
        raise InvalidRequest(f"{name}: must be an array of messages, got {kind_name(value)}")
    messages = pb.ChatMessages()
    for i, message in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(message, dict):
            raise InvalidRequest(f"{where}: must be an object with role and content, got {kind_name(message)}")
        role = string(f"{where}.role", message.get("role"))
        content = message.get("content")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise InvalidRequest(f"{where}.content[{j}].type: {kind!r} is not supported (allowed: text)")
                texts.append(string(f"{where}.content[{j}].text", part.get("text")))
            content = "".join(texts)
        elif content is None:
            content = ""
        else:
            content = string(f"{where}.content", content)
        turn = messages.messages.add(role="system" if role == "developer" else role, content=content)
        calls = message.get("tool_calls")
        if calls is not None:
            if not isinstance(calls, list):
                raise InvalidRequest(f"{where}.tool_calls: must be an array, got {kind_name(calls)}")
            for j, call in enumerate(calls):
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(function, dict):
                    raise InvalidRequest(f"{where}.tool_calls[{j}].function: must be an object with name and arguments")
                turn.tool_calls.add(
                    id=string(f"{where}.tool_calls[{j}].id", call.get("id", "")),
                    name=string(f"{where}.tool_calls[{j}].function.name", function.get("name")),
                    arguments=string(f"{where}.tool_calls[{j}].function.arguments", function.get("arguments", "{}")),
                )
        if message.get("tool_call_id") is not None:
            turn.tool_call_id = string(f"{where}.tool_call_id", message["tool_call_id"])
        if message.get("name") is not None:
            turn.name = string(f"{where}.name", message["name"])
    return messages


# A constraint found in a body: (the body's field, the request's constraint field, its value)
Source = tuple[str, str, Any]
STRUCTURED_OUTPUTS = ("json", "json_object", "regex", "choice", "grammar")


def openai_response_format(value: Any) -> list[Source]:
    """``{"type": "text" | "json_object"}`` or ``{"type": "json_schema", "json_schema": {name, schema, strict}}``."""
    if value is None:
        return []
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return []
    if kind == "json_object":
        return [("response_format", "json_object", None)]
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict | bool):
            raise InvalidRequest("response_format.json_schema.schema: required (a JSON schema object)")
        return [("response_format", "json_schema", json.dumps(spec["schema"]))]
    raise InvalidRequest(f"response_format.type: {kind!r} is not supported (allowed: text, json_object, json_schema)")


def workers_ai_response_format(value: Any) -> list[Source]:
    """Workers AI's JSON mode: ``{"type": "json_object"}`` or ``{"type": "json_schema", "json_schema": {...}}``."""
    if value is None:
        return []
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "json_object":
        return [("response_format", "json_object", None)]
    if kind == "json_schema":
        schema = value.get("json_schema")
        if not isinstance(schema, dict | bool):
            raise InvalidRequest("response_format.json_schema: required (a JSON schema object)")
        return [("response_format", "json_schema", json.dumps(schema))]
    raise InvalidRequest(f"response_format.type: {kind!r} is not supported (allowed: json_object, json_schema)")


def structured_outputs(value: Any) -> list[Source]:
    """vLLM's ``structured_outputs``: one of json (a schema, or its text), json_object, regex, choice, grammar."""
    if value is None:
        return []
    if not isinstance(value, dict):
        raise InvalidRequest(f"structured_outputs: must be an object, got {kind_name(value)}")
    sources: list[Source] = []
    for key, item in value.items():
        name = f"structured_outputs.{key}"
        if key not in STRUCTURED_OUTPUTS:
            raise InvalidRequest(f"{name}: unknown field (allowed: {', '.join(STRUCTURED_OUTPUTS)})")
        if item is None or (key == "json_object" and item is False):
            continue
        if key == "json":
            text = item if isinstance(item, str) else json.dumps(item)
            if not isinstance(item, str | dict | bool):
                raise InvalidRequest(f"{name}: must be a JSON schema (an object or its text), got {kind_name(item)}")
            sources.append((name, "json_schema", text))
        elif key == "json_object":
            boolean(name, item)
            sources.append((name, "json_object", None))
        elif key == "choice":
            if not isinstance(item, list) or not all(isinstance(c, str) for c in item):
                raise InvalidRequest(f"{name}: must be an array of strings, got {kind_name(item)}")
            sources.append((name, "choice", item))
        else:
            sources.append((name, key, string(name, item)))
    return sources


def apply_constraint(request: pb.GenerateRequest, sources: list[Source], names: dict[str, str]) -> None:
    """Set the one constraint the body gives (``names`` learns which body field it came from)."""
    if len(sources) > 1:
        fields = ", ".join(CONSTRAINT_FIELD_NUMBERS.values())
        given = ", ".join(name for name, _, _ in sources)
        raise InvalidRequest(f"constraint: give at most one of {fields} (got {given})")
    for name, kind, value in sources:
        names[kind] = name
        if kind == "json_object":
            request.json_object.SetInParent()
        elif kind == "choice":
            request.choice.values.extend(value)
        else:
            setattr(request, kind, value)


def completion_request(body: Mapping[str, Any]) -> HttpRequest:
    """``POST /v1/completions``."""
    allowed = {
        "model", "prompt", "stream", "stream_options", "logprobs", "echo", "suffix", "best_of", "logit_bias",
        "response_format", "structured_outputs", "return_token_ids",
    }  # fmt: skip
    check_fields(body, allowed | set(SAMPLING))
    request = pb.GenerateRequest()
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        request.prompt = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(item, str | list) for item in prompt):
        raise InvalidRequest(f"prompt: one prompt per request (got {len(prompt)}); send one request per prompt")
    elif isinstance(prompt, list):
        if not prompt:
            raise InvalidRequest("prompt_token_ids: must not be empty")  # the gRPC message for the same request
        request.prompt_token_ids.ids.extend(token_ids("prompt", prompt))
    elif prompt is None:
        raise InvalidRequest("prompt: required (a string or an array of token ids)")
    else:
        raise InvalidRequest(f"prompt: must be a string or an array of token ids, got {kind_name(prompt)}")
    apply_sampling(request, body, {})
    if body.get("logprobs") is not None:
        request.logprobs = True
        request.top_logprobs = integer("logprobs", body["logprobs"], 0, 20)
    must_be_null_or(body, "echo", False, "true is not supported (allowed: false)")
    must_be_null_or(body, "suffix", None, "not supported (allowed: null)")
    must_be_null_or(body, "logit_bias", {}, "not supported (allowed: null or {})")
    if body.get("best_of") is not None and body["best_of"] != body.get("n", 1):
        raise InvalidRequest(f"best_of: must equal n ({body.get('n', 1)}), got {body['best_of']!r}")
    stream, include_usage = stream_fields(body)
    names = {"top_logprobs": "logprobs"}
    sources = openai_response_format(body.get("response_format")) + structured_outputs(body.get("structured_outputs"))
    apply_constraint(request, sources, names)
    return HttpRequest(request, model_field(body), stream, include_usage, param_names=names,
                       return_token_ids=return_token_ids(body))  # fmt: skip


def return_token_ids(body: Mapping[str, Any]) -> bool:
    value = body.get("return_token_ids")
    return False if value is None else boolean("return_token_ids", value)


def chat_request(body: Mapping[str, Any]) -> HttpRequest:
    """``POST /v1/chat/completions``."""
    allowed = {
        "model", "messages", "stream", "stream_options", "logprobs", "top_logprobs", "max_completion_tokens",
        "response_format", "structured_outputs", "tools", "tool_choice", "logit_bias", "return_token_ids",
    }  # fmt: skip
    check_fields(body, allowed | set(SAMPLING))
    if "messages" not in body:
        raise InvalidRequest("messages: required (an array of {role, content})")
    request = pb.GenerateRequest(messages=message_list(body["messages"]))
    if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        raise InvalidRequest("max_completion_tokens: give it or max_tokens, not both")
    apply_sampling(request, body, {"max_completion_tokens": "max_tokens"})
    logprobs = boolean("logprobs", body["logprobs"]) if body.get("logprobs") is not None else False
    top = body.get("top_logprobs")
    if top is not None:
        if not logprobs:
            raise InvalidRequest("top_logprobs: needs logprobs: true")
        request.top_logprobs = unsigned("top_logprobs", top, 0)
    request.logprobs = logprobs
    must_be_null_or(body, "logit_bias", {}, "not supported (allowed: null or {})")
    stream, include_usage = stream_fields(body)
    names = {"max_tokens": "max_completion_tokens"} if "max_completion_tokens" in body else {}
    sources = openai_response_format(body.get("response_format")) + structured_outputs(body.get("structured_outputs"))
    tools = body.get("tools") or []
    specs = parse_tools(tools)
    choice = choose(body.get("tool_choice"), specs)
    forced = choice is not None and (choice.WhichOneof("choice") == "function" or choice.mode == "required")
    if forced and sources:
        raise InvalidRequest(f"tool_choice: a forced tool call cannot be combined with {sources[0][0]}")
    add_tools(request.messages, tools, specs)
    if choice is not None:
        request.messages.tool_choice.CopyFrom(choice)
    names["messages.tool_choice"] = "tool_choice"
    apply_constraint(request, sources, names)
    return HttpRequest(request, model_field(body), stream, include_usage, logprobs, param_names=names,
                       return_token_ids=return_token_ids(body))  # fmt: skip


WORKERS_AI_SAMPLING = (
    "max_tokens", "temperature", "top_p", "top_k", "seed", "repetition_penalty", "frequency_penalty",
    "presence_penalty",
)  # fmt: skip


def workers_ai_request(body: Mapping[str, Any]) -> HttpRequest:
    """``POST /ai/run/{model}``: ``prompt`` (a user message, or as it is with ``raw``) or ``messages``."""
    allowed = {"prompt", "messages", "raw", "stream", "response_format", *WORKERS_AI_SAMPLING}
    check_fields(body, allowed)
    raw = boolean("raw", body["raw"]) if body.get("raw") is not None else False
    has_prompt, has_messages = body.get("prompt") is not None, body.get("messages") is not None
    if has_prompt == has_messages:
        raise InvalidRequest(f"input: give exactly one of prompt, messages (got {'both' if has_prompt else 'none'})")
    request = pb.GenerateRequest()
    if has_prompt:
        prompt = string("prompt", body["prompt"])
        if raw:
            request.prompt = prompt
        else:
            if not prompt:
                raise InvalidRequest("prompt: must not be empty")
            request.messages.messages.add(role="user", content=prompt)
    else:
        request.messages.CopyFrom(message_list(body["messages"]))
    apply_sampling(request, body, {})
    stream = boolean("stream", body["stream"]) if body.get("stream") is not None else False
    names: dict[str, str] = {}
    sources = workers_ai_response_format(body.get("response_format"))
    apply_constraint(request, sources, names)
    return HttpRequest(request, None, stream, param_names=names, json_response=bool(sources))


def param_of(message: str, names: Mapping[str, str]) -> str | None:
    """The body field a validation message is about: ``sampling.top_p: ...`` -> ``top_p``."""
    path = message.split(":", 1)[0] if ":" in message else ""
    if not path or " " in path:
        return None
    if path in names:
        return names[path]
    for prefix in ("sampling.", "stopping."):
        if path.startswith(prefix):
            short = path.removeprefix(prefix)
            return names.get(short, short)
    if path == "prompt_token_ids":
        return "prompt"
    return path
