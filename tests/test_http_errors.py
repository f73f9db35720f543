"""Bad input over HTTP: the gRPC validation table gives 400 with the same messages; JSON, content
type, size, model and token problems get their statuses in OpenAI's shape; a fuzz never sees 500."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.http_client import Reply, request
from tests.server_process import ServerProcess
from tests.test_server_validation import CASES

CHAT_ROUTE, COMPLETIONS_ROUTE = "/v1/chat/completions", "/v1/completions"
HTTP_SHAPED = {"no_input", "request_id_too_long"}  # no such gRPC fields over HTTP: their own cases below


def http_case(fields: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The gRPC request of a table case as the OpenAI body that asks the same."""
    body: dict[str, Any] = {}
    route = COMPLETIONS_ROUTE
    for key, value in fields.items():
        if key == "prompt":
            body["prompt"] = value
        elif key == "prompt_token_ids":
            body["prompt"] = list(value.ids)
        elif key == "messages":
            route = CHAT_ROUTE
            body["messages"] = [{"role": m.role, "content": m.content} for m in value.messages]
        elif key in ("sampling", "stopping"):
            for descriptor, item in value.ListFields():
                body[descriptor.name] = item if isinstance(item, int | float | str | bool) else list(item)
        elif key in ("n", "top_logprobs"):
            body[key] = value
        elif key == "logprobs":
            body["logprobs"] = value
    if "top_logprobs" in body:  # chat's field of that name: the same meaning as gRPC's
        route = CHAT_ROUTE
        body["messages"] = [{"role": "user", "content": body.pop("prompt")}]
    return route, body


def expected_param(message: str) -> str:
    path = message.split(":", 1)[0].removeprefix("sampling.").removeprefix("stopping.")
    return "prompt" if path == "prompt_token_ids" else path


def assert_openai_error(reply: Reply, status: int, message: str | None = None) -> dict[str, Any]:
    assert reply.status == status, reply.body
    assert reply.headers["content-type"].startswith("application/json")
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if message is not None:
        assert error["message"] == message
    return dict(error)


@pytest.mark.parametrize("name", [name for name in CASES if name not in HTTP_SHAPED])
def test_grpc_table_gives_400_with_the_same_message(server: ServerProcess, name: str) -> None:
    fields, message = CASES[name]
    route, body = http_case(fields)
    for stream in (False, True):
        error = assert_openai_error(request(server.http_url, route, {**body, "stream": stream}), 400, message)
        assert error["type"] == "invalid_request_error"
        assert error["param"] == expected_param(message)


@pytest.mark.parametrize(
    ("route", "body", "message"),
    [
        (COMPLETIONS_ROUTE, {}, "prompt: required (a string or an array of token ids)"),
        (CHAT_ROUTE, {"model": None}, "messages: required (an array of {role, content})"),
        (COMPLETIONS_ROUTE, {"prompt": "hi", "temperature": "hot"}, "temperature: must be a number, got a string"),
        (COMPLETIONS_ROUTE, {"prompt": "hi", "max_tokens": -3}, "max_tokens: must be >= 1, got -3"),
        (COMPLETIONS_ROUTE, {"prompt": "hi", "max_tokens": 2.5}, "max_tokens: must be an integer, got a number"),
        (COMPLETIONS_ROUTE, {"prompt": "hi", "n": True}, "n: must be an integer, got a boolean"),
        (
            COMPLETIONS_ROUTE,
            {"prompt": "hi", "stop": [1]},
            "stop: must be a string or an array of strings, got an array",
        ),
        (COMPLETIONS_ROUTE, {"prompt": "hi", "echo": True}, "echo: true is not supported (allowed: false)"),
        (
            COMPLETIONS_ROUTE,
            {"prompt": ["a", "b"]},
            "prompt: one prompt per request (got 2); send one request per prompt",
        ),
        (COMPLETIONS_ROUTE, {"prompt": "hi", "logprobs": 21}, "logprobs: must be in [0, 20], got 21"),
        (
            COMPLETIONS_ROUTE,
            {"prompt": "hi", "request_id": "r"},
            "request_id: unknown field (this route takes best_of, echo, frequency_penalty, ignore_eos, "
            "include_stop_str_in_output, logit_bias, logprobs, max_tokens, min_p, min_tokens, n, presence_penalty, "
            "prompt, repetition_penalty, response_format, return_token_ids, seed, stop, stop_token_ids, stream, "
            "stream_options, structured_outputs, suffix, temperature, top_k, top_p, and model)",
        ),
        (
            CHAT_ROUTE,
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages[0].content[0].type: 'image_url' is not supported (allowed: text)",
        ),
        (CHAT_ROUTE, {"messages": [], "max_tokens": 3}, "messages: must hold at least one message"),
        (CHAT_ROUTE, {"messages": "hi"}, "messages: must be an array of messages, got a string"),
        (
            CHAT_ROUTE,
            {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
            "tools[0]: must be {'type': 'function', 'function': {name, parameters}}",
        ),
        (
            CHAT_ROUTE,
            {"messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": True}},
            "stream_options: only allowed with stream: true",
        ),
        ("/ai/run/model", {"prompt": "hi", "messages": []}, "input: give exactly one of prompt, messages (got both)"),
        ("/ai/run/model", {}, "input: give exactly one of prompt, messages (got none)"),
    ],
)
def test_http_shaped_bad_input_names_the_field(
    server: ServerProcess, route: str, body: dict[str, Any], message: str
) -> None:
    reply = request(server.http_url, route, body)
    assert reply.status == 400, reply.body
    if route.startswith("/ai/run/"):
        assert reply.json() == {"result": None, "success": False, "errors": [{"code": 400, "message": message}],
                                "messages": []}  # fmt: skip
    else:
        assert_openai_error(reply, 400, message)


def test_malformed_json_content_type_size_model_and_route(server: ServerProcess) -> None:
    url = server.http_url
    error = assert_openai_error(request(url, CHAT_ROUTE, raw=b'{"messages": [}'), 400)
    assert error["message"].startswith("the request body is not valid JSON (")
    assert_openai_error(
        request(url, CHAT_ROUTE, raw=b"[1, 2]"), 400, "the request body must be a JSON object, got list"
    )
    assert_openai_error(request(url, CHAT_ROUTE, raw=b"\xff\xfe"), 400)
    assert_openai_error(
        request(url, CHAT_ROUTE, raw=b"messages=hi", headers={"Content-Type": "application/x-www-form-urlencoded"}),
        415,
        "content-type: must be application/json, got 'application/x-www-form-urlencoded'",
    )
    big = json.dumps({"prompt": "x" * (5 << 20)}).encode()
    assert_openai_error(
        request(url, COMPLETIONS_ROUTE, raw=big), 413, f"the request body is {len(big)} bytes; the limit is {4 << 20}"
    )
    error = assert_openai_error(request(url, COMPLETIONS_ROUTE, {"model": "gpt-4o", "prompt": "hi"}), 404)
    assert error["message"].startswith("model: 'gpt-4o' is not served here (served: ")
    assert (error["param"], error["code"]) == ("model", "model_not_found")
    assert_openai_error(request(url, "/v2/nothing", {}), 404, "no route POST /v2/nothing")
    assert_openai_error(request(url, CHAT_ROUTE, method="GET"), 405, "GET is not allowed on /v1/chat/completions")


def test_bearer_token_over_http(tiny_checkpoint: Path, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    server = ServerProcess(tiny_checkpoint, "--auth-token-file", str(token_file))
    try:
        server.wait_serving()
        body = {"prompt": "hi", "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            error = assert_openai_error(
                request(server.http_url, COMPLETIONS_ROUTE, body, headers=headers),
                401,
                "missing or wrong bearer token (header 'Authorization: Bearer <token>')",
            )
            assert error["type"] == "authentication_error"
        assert request(server.http_url, "/v1/models", method="GET").status == 401
        workers = request(server.http_url, "/ai/run/model", {"prompt": "hi"})
        assert workers.status == 401 and workers.json()["success"] is False
        good = {"Authorization": "Bearer s3cret"}
        assert request(server.http_url, COMPLETIONS_ROUTE, body, headers=good).status == 200
        assert request(server.http_url, "/health", method="GET").status == 200  # probes carry no token
        assert request(server.http_url, "/", method="GET").status == 200  # the page; its calls need the token
    finally:
        server.close()


def test_queue_full_is_429(long_tiny_checkpoint: Path) -> None:
    import asyncio

    from tests.http_client import sse

    server = ServerProcess(long_tiny_checkpoint, "--max-num-seqs", "1", "--max-queued-requests", "2")
    try:
        server.wait_serving()
        port = server.http_port or 0
        long = {"prompt": "go", "max_tokens": 8000, "ignore_eos": True, "stream": True}  # seconds on any machine

        async def scenario() -> tuple[int, dict[str, Any]]:
            # one running, two waiting (the bound), then the fourth is refused at once
            streams = [asyncio.ensure_future(sse(port, COMPLETIONS_ROUTE, long))]
            await asyncio.sleep(1.0)
            streams += [asyncio.ensure_future(sse(port, COMPLETIONS_ROUTE, long)) for _ in range(2)]
            await asyncio.sleep(1.0)
            refused = await asyncio.to_thread(request, server.http_url, COMPLETIONS_ROUTE, long)
            for stream in streams:
                stream.cancel()
            await asyncio.gather(*streams, return_exceptions=True)
            return refused.status, refused.json()

        status, body = asyncio.run(scenario())
        assert status == 429
        assert body["error"]["type"] == "rate_limit_error" and body["error"]["code"] == "queue_full"
    finally:
        server.close()


# -- fuzz ----------------------------------------------------------------------------------

FIELDS = ["prompt", "messages", "model", "stream", "stream_options", "max_tokens", "max_completion_tokens", "n",
          "temperature", "top_p", "top_k", "min_p", "seed", "stop", "logprobs", "top_logprobs", "presence_penalty",
          "frequency_penalty", "repetition_penalty", "min_tokens", "ignore_eos", "echo", "raw", "tools", "user",
          "response_format", "best_of", "stop_token_ids", "role", "content", "structured_outputs", "tool_choice",
          "type", "json_schema", "schema", "json", "regex", "choice", "grammar", "function", "name"]  # fmt: skip
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(1 << 40), 1 << 40),
    st.integers(-3, 40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(-3, 3),
    st.text(max_size=12),
    st.sampled_from(["user", "assistant", "system", "developer", "tool", "text", "hi", "", "\x00"]),
)
JSON = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=12,
)
BODIES = st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=8)
ROUTES = st.sampled_from([COMPLETIONS_ROUTE, CHAT_ROUTE, "/ai/run/model", "/ai/run/other", "/v1/models"])


@pytest.mark.slow
@settings(max_examples=320, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(route=ROUTES, body=BODIES | JSON, raw=st.none() | st.binary(max_size=40))
def test_fuzzed_bodies_never_get_500(server: ServerProcess, route: str, body: Any, raw: bytes | None) -> None:
    if isinstance(body, dict) and isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 64:
        body["max_tokens"] = 64  # keep generations short; the range checks are the table's business
    payload = raw if raw is not None else json.dumps(body).encode()
    reply = request(server.http_url, route, raw=payload)
    assert reply.status in (200, 400, 404, 405, 413, 429), (reply.status, reply.body)
    if reply.status != 200 and route.startswith("/v1/"):
        assert_openai_error(reply, reply.status)
    elif reply.status != 200:
        assert reply.json()["success"] is False
