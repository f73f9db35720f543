"""Structured output through a real server on the default model: 50 JSON-schema requests over 10
schemas, regex, choice and grammar outputs, all in one batch with unconstrained requests that
must not change; the openai SDK's response_format and tool calls; bad constraints; metrics."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import jsonschema
import openai
import pytest
from mistralserve.v1 import generation_pb2 as pb
from openai.types.chat import (
    ChatCompletionMessageFunctionToolCall,
    ChatCompletionMessageParam,
    ChatCompletionToolParam,
)

from tests.http_client import request
from tests.prometheus_text import scrape
from tests.server_process import ServerProcess
from tests.test_server_validation import raw_call

pytestmark = pytest.mark.slow

WORD = {"type": "string", "pattern": "^[a-z]{2,8}$"}
SCHEMAS: dict[str, dict[str, Any]] = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "pattern": "^[A-Z][a-z]{1,9}$"},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "address": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 20},
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            "geo": {
                "type": "object",
                "properties": {
                    "lat": {"type": "integer", "minimum": -90, "maximum": 90},
                    "lon": {"type": "integer", "minimum": -180, "maximum": 180},
                },
                "required": ["lat", "lon"],
                "additionalProperties": False,
            },
        },
        "required": ["city", "zip", "geo"],
        "additionalProperties": False,
    },
    "product": {
        "type": "object",
        "properties": {
            "category": {"enum": ["book", "food", "tool"]},
            "price": {"type": "integer", "minimum": 1, "maximum": 999},
            "in_stock": {"type": "boolean"},
        },
        "required": ["category", "price", "in_stock"],
        "additionalProperties": False,
    },
    "colors": {"type": "array", "items": {"enum": ["red", "green", "blue", "yellow"]}, "minItems": 2, "maxItems": 4},
    "order": {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
                        "qty": {"type": "integer", "minimum": 1, "maximum": 9},
                    },
                    "required": ["sku", "qty"],
                    "additionalProperties": False,
                },
                "minItems": 1,
                "maxItems": 3,
            }
        },
        "required": ["items"],
        "additionalProperties": False,
    },
    "event": {
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 30},
            "day": {"enum": ["mon", "tue", "wed", "thu", "fri"]},
            "attendees": {"type": "array", "items": WORD, "maxItems": 3},
        },
        "required": ["title", "day", "attendees"],
        "additionalProperties": False,
    },
    "rating": {
        "type": "object",
        "properties": {
            "score": {"type": "integer", "minimum": 1, "maximum": 5},
            "comment": {"type": "string", "maxLength": 40},
            "recommend": {"type": "boolean"},
        },
        "required": ["score", "comment", "recommend"],
        "additionalProperties": False,
    },
    "matrix": {
        "type": "array",
        "items": {
            "type": "array",
            "items": {"type": "integer", "minimum": 0, "maximum": 9},
            "minItems": 2,
            "maxItems": 3,
        },
        "minItems": 2,
        "maxItems": 3,
    },
    "user": {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 1, "maximum": 1000},
            "role": {"enum": ["admin", "guest"]},
            "email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"},
        },
        "required": ["id", "role"],
        "additionalProperties": False,
    },
    "config": {
        "type": "object",
        "properties": {
            "debug": {"type": "boolean"},
            "level": {"enum": ["low", "mid", "high"]},
            "retries": {"type": "integer", "minimum": 0, "maximum": 5},
            "tags": {"type": "array", "items": WORD, "maxItems": 4},
        },
        "required": ["debug", "level", "retries", "tags"],
        "additionalProperties": False,
    },
}
REGEX = r"[A-Z][a-z]{2,8} [0-9]{1,3}"
CHOICES = ["positive", "negative", "neutral"]
ARITHMETIC = """start: expr
expr: term (("+" | "-") term){0,3}
term: NUMBER | "(" NUMBER ("*" NUMBER)? ")"
NUMBER: /[1-9][0-9]?/
"""
FREE_PROMPTS = ["Once upon a time", "The capital of France is", "def fibonacci(n):", "Mistral AI is a company"]


def evaluate(text: str) -> int:
    """The test's own parser of ARITHMETIC's language; ValueError if ``text`` is not in it."""
    tokens: list[str] = re.findall(r"[0-9]+|[-+*()]|\S", text)
    if "".join(tokens) != text:
        raise ValueError(f"whitespace or junk in {text!r}")
    position = 0

    def take(expected: str | None = None) -> str:
        nonlocal position
        if position >= len(tokens) or (expected is not None and tokens[position] != expected):
            raise ValueError(f"expected {expected or 'a token'} at {position} in {text!r}")
        position += 1
        return tokens[position - 1]

    def number() -> int:
        token = take()
        if not re.fullmatch(r"[1-9][0-9]?", token):
            raise ValueError(f"{token!r} is not a NUMBER")
        return int(token)

    def term() -> int:
        if position < len(tokens) and tokens[position] == "(":
            take("(")
            value = number()
            if tokens[position] == "*":
                take("*")
                value *= number()
            take(")")
            return value
        return number()

    value = term()
    operations = 0
    while position < len(tokens):
        operator = take()
        if operator not in "+-" or operations == 3:
            raise ValueError(f"unexpected {operator!r} in {text!r}")
        value = value + term() if operator == "+" else value - term()
        operations += 1
    return value


def chat(content: str) -> pb.ChatMessages:
    return pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=content)])


def constrained_requests() -> list[tuple[str, pb.GenerateRequest]]:
    requests = []
    for name, schema in SCHEMAS.items():
        for seed in range(5):
            requests.append((f"schema:{name}", pb.GenerateRequest(
                messages=chat(f"Give an example {name} as JSON."), json_schema=json.dumps(schema),
                sampling=pb.SamplingOptions(temperature=0.8, seed=seed), stopping=pb.StoppingOptions(max_tokens=200),
            )))  # fmt: skip
    for seed in range(5):
        sampling = pb.SamplingOptions(temperature=0.8, seed=seed)
        stopping = pb.StoppingOptions(max_tokens=40)
        requests.append(
            (
                "regex",
                pb.GenerateRequest(
                    messages=chat("Name a city and a number."), regex=REGEX, sampling=sampling, stopping=stopping
                ),
            )
        )
        requests.append(
            (
                "choice",
                pb.GenerateRequest(
                    messages=chat("Is 'I love it' positive, negative or neutral?"),
                    choice=pb.Choices(values=CHOICES),
                    sampling=sampling,
                    stopping=stopping,
                ),
            )
        )
        requests.append(("grammar", pb.GenerateRequest(
            messages=chat("Write an arithmetic expression."), grammar=ARITHMETIC, sampling=sampling,
            stopping=stopping)))  # fmt: skip
    return requests


def free_requests() -> list[pb.GenerateRequest]:
    return [
        pb.GenerateRequest(prompt=f"{FREE_PROMPTS[i % 4]} ({i})", sampling=pb.SamplingOptions(temperature=0.0),
                           stopping=pb.StoppingOptions(max_tokens=16 + i % 8))
        for i in range(32)
    ]  # fmt: skip


def run_all(server: ServerProcess, requests: list[pb.GenerateRequest]) -> list[pb.GenerateResponse]:
    """Every request at once (each on its own thread), answers in order."""
    with server.channel() as channel:
        stub = server.stub(channel)
        with ThreadPoolExecutor(len(requests)) as pool:
            return list(pool.map(lambda r: stub.Generate(r, timeout=600), requests))


def check(kind: str, text: str) -> None:
    if kind.startswith("schema:"):
        jsonschema.validate(json.loads(text), SCHEMAS[kind.removeprefix("schema:")])
    elif kind == "regex":
        assert re.fullmatch(REGEX, text), text
    elif kind == "choice":
        assert text in CHOICES, text
    else:
        evaluate(text)


def test_constrained_outputs_are_valid_and_leave_unconstrained_ones_unchanged(default_server: ServerProcess) -> None:
    alone = run_all(default_server, free_requests())
    constrained = constrained_requests()
    mixed = run_all(default_server, free_requests() + [r for _, r in constrained])
    for i, (before, after) in enumerate(zip(alone, mixed[:32], strict=True)):
        assert list(after.completions[0].token_ids) == list(before.completions[0].token_ids), i
    kinds: dict[str, int] = {}
    for (kind, _), response in zip(constrained, mixed[32:], strict=True):
        [completion] = response.completions
        assert completion.finish_reason == pb.FINISH_REASON_STOP, (kind, completion.text)
        check(kind, completion.text)
        kinds[kind] = kinds.get(kind, 0) + 1
    assert sum(v for k, v in kinds.items() if k.startswith("schema:")) == 50 and len(kinds) == 13
    schema_texts = {r.completions[0].text for (k, _), r in zip(constrained, mixed[32:], strict=True) if "schema" in k}
    assert len(schema_texts) >= 30  # seeded sampling at 0.8 really varies within each schema
    metrics = scrape(default_server.metrics_url())
    assert metrics.value("mistralserve_structured_output_requests_total", kind="json_schema") >= 50
    assert metrics.value("mistralserve_structured_output_requests_total", kind="choice") >= 5
    misses = metrics.value("mistralserve_grammar_compile_seconds_count")
    hits = metrics.value("mistralserve_grammar_cache_hits_total")
    assert misses >= 13 and hits >= 1 and misses + hits >= 65


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"json_schema": '{"type": "strin"}'}, "json_schema: Invalid type: strin"),
        ({"json_schema": '{"type": "object"'}, "json_schema: not valid JSON"),
        ({"regex": "a(b"}, "regex: "),
        ({"choice": pb.Choices(values=[])}, "choice: must be a non-empty list of strings, got []"),
        ({"grammar": "start: nothing_here"}, "grammar: "),
        (
            {"json_schema": json.dumps({"type": "object", "description": "x" * (1 << 20)})},
            "json_schema: must be at most 131072 bytes, got 1048",
        ),
    ],
    ids=["schema", "not_json", "regex", "empty_choice", "grammar", "one_megabyte"],
)
def test_bad_constraints_are_invalid_argument_over_grpc_and_400_over_http(
    default_server: ServerProcess, fields: dict[str, Any], message: str
) -> None:
    grpc_request = pb.GenerateRequest(prompt="hi", **fields)
    with default_server.channel() as channel, pytest.raises(grpc.RpcError) as error:
        default_server.stub(channel).Generate(grpc_request, timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = error.value.details() or ""
    assert details.startswith(message), details
    if "regex" in fields:
        assert "unclosed group" in details
    if "grammar" in fields:
        assert 'unknown name: "nothing_here"' in details
    (key, value), = fields.items()  # fmt: skip
    if key == "choice":
        value = list(value.values)
    elif key == "json_schema":
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return  # structured_outputs.json as text is the same check; the gRPC case covers it
    outputs = {"json_schema": "json"}.get(key, key)
    reply = request(default_server.http_url, "/v1/completions",
                    {"prompt": "hi", "structured_outputs": {outputs: value}})  # fmt: skip
    assert reply.status == 400, reply.body
    error_body = reply.json()["error"]
    assert error_body["message"] == details
    assert error_body["param"] == f"structured_outputs.{outputs}"


def test_two_constraints_at_once_are_refused(default_server: ServerProcess) -> None:
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "response_format": {"type": "json_object"},
        "structured_outputs": {"regex": "a+"},
    }
    reply = request(default_server.http_url, "/v1/chat/completions", body)
    assert reply.status == 400
    expected = ("constraint: give at most one of json_schema, json_object, regex, choice, grammar "
                "(got response_format, structured_outputs.regex)")  # fmt: skip
    assert reply.json()["error"]["message"] == expected
    assert reply.json()["error"]["param"] == "constraint"
    two = pb.GenerateRequest(prompt="hi", regex="a+").SerializeToString()
    two += pb.GenerateRequest(choice=pb.Choices(values=["a"])).SerializeToString()
    refused = raw_call(default_server, "Generate", two, streaming=False)
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (refused.details() or "").startswith("constraint: give at most one of")


# -- the openai SDK ----------------------------------------------------------------------------

WEATHER: ChatCompletionToolParam = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ADD: ChatCompletionToolParam = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers.",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer", "minimum": -99, "maximum": 99},
                           "b": {"type": "integer", "minimum": -99, "maximum": 99}},
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}  # fmt: skip
TOOL_SCHEMAS = {"get_weather": WEATHER["function"]["parameters"], "add": ADD["function"]["parameters"]}
ASK: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is the weather in Paris? And 2 + 3?"}]


def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.http_url + "/v1", api_key="not-needed", max_retries=0, timeout=300)


def model_name(server: ServerProcess) -> str:
    return str(client(server).models.list().data[0].id)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_openai_response_format_json_schema(default_server: ServerProcess, stream: bool) -> None:
    schema = SCHEMAS["order"]
    response_format: Any = {"type": "json_schema", "json_schema": {"name": "order", "schema": schema, "strict": True}}
    sdk = client(default_server)
    for seed in range(3):
        kwargs: dict[str, Any] = dict(model=model_name(default_server), messages=[{"role": "user", "content":
                                      "An order as JSON."}], response_format=response_format, temperature=0.8,
                                      seed=seed, max_tokens=200)  # fmt: skip
        if stream:
            chunks = list(sdk.chat.completions.create(stream=True, **kwargs))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            assert reasons == ["stop"]
        else:
            answer = sdk.chat.completions.create(**kwargs)
            text = answer.choices[0].message.content or ""
            assert answer.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(text), schema)


def collect_stream_calls(chunks: list[Any]) -> tuple[list[dict[str, Any]], str | None, str]:
    """Tool calls accumulated from streamed deltas the way the SDK's users do, by index."""
    calls: dict[int, dict[str, Any]] = {}
    reason, content = None, ""
    for chunk in chunks:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for delta in choice.delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = delta.id or call["id"]
            call["name"] += delta.function.name or ""
            call["arguments"] += delta.function.arguments or ""
        reason = choice.finish_reason or reason
    return [calls[i] for i in sorted(calls)], reason, content


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("tool_choice", ["required", "named"])
def test_openai_tool_calls(default_server: ServerProcess, stream: bool, tool_choice: str) -> None:
    sdk = client(default_server)
    choice: Any = "required" if tool_choice == "required" else {"type": "function", "function": {"name": "add"}}
    for seed in range(3):
        kwargs: dict[str, Any] = dict(model=model_name(default_server), messages=ASK, tools=[WEATHER, ADD],
                                      tool_choice=choice, temperature=0.7, seed=seed, max_tokens=200)  # fmt: skip
        if stream:
            calls, reason, content = collect_stream_calls(list(sdk.chat.completions.create(stream=True, **kwargs)))
            assert content == ""
        else:
            message = sdk.chat.completions.create(**kwargs).choices[0]
            reason = message.finish_reason
            assert message.message.content is None
            function_calls = [c for c in message.message.tool_calls or []
                              if isinstance(c, ChatCompletionMessageFunctionToolCall)]  # fmt: skip
            calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments} for c in function_calls]
        assert reason == "tool_calls"
        assert calls, "no tool call"
        if tool_choice == "named":
            assert [c["name"] for c in calls] == ["add"]
        for call in calls:
            assert re.fullmatch("[a-zA-Z0-9]{9}", call["id"]), call["id"]  # the ids Mistral's validator takes
            jsonschema.validate(json.loads(call["arguments"]), TOOL_SCHEMAS[call["name"]])


def test_tool_results_go_back_through_the_template(default_server: ServerProcess) -> None:
    """A second turn with the assistant's call and the tool's answer renders and generates."""
    sdk = client(default_server)
    first = sdk.chat.completions.create(model=model_name(default_server), messages=ASK, tools=[ADD],
                                        tool_choice={"type": "function", "function": {"name": "add"}},
                                        temperature=0, max_tokens=100)  # fmt: skip
    [call] = first.choices[0].message.tool_calls or []
    assert isinstance(call, ChatCompletionMessageFunctionToolCall)
    history: list[ChatCompletionMessageParam] = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function", "function": {"name": call.function.name,
                                                               "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "5"},
    ]  # fmt: skip
    second = sdk.chat.completions.create(model=model_name(default_server), messages=history, tools=[ADD],
                                         tool_choice="none", temperature=0, max_tokens=8)  # fmt: skip
    assert second.choices[0].message.tool_calls is None
    assert second.choices[0].message.content
    tokens = request(default_server.http_url, "/v1/chat/completions", {
        "messages": history, "tools": [ADD], "max_tokens": 1, "temperature": 0})  # fmt: skip
    assert tokens.status == 200
    assert tokens.json()["usage"]["prompt_tokens"] > second.usage.prompt_tokens  # type: ignore[union-attr]


def test_workers_ai_json_mode_answers_the_object(default_server: ServerProcess) -> None:
    schema = SCHEMAS["product"]
    body = {"prompt": "A product as JSON.", "response_format": {"type": "json_schema", "json_schema": schema},
            "seed": 1, "temperature": 0.8, "max_tokens": 100}  # fmt: skip
    reply = request(default_server.http_url, f"/ai/run/{model_name(default_server)}", body)
    assert reply.status == 200, reply.body
    result = reply.json()
    assert result["success"] is True
    jsonschema.validate(result["result"]["response"], schema)
