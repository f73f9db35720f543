"""A seeded fuzz of every route and both protocols on a real server: valid requests mutated field by
field (wrong types, huge numbers, huge strings, lone surrogates, control characters, wrong enum
values, deep nesting, extra fields), random bytes, truncated JSON, wrong methods and content
types; protobuf messages filled with random values of every field and random bytes. No answer is a
500 or an error that is not JSON (HTTP) / INTERNAL or UNKNOWN (gRPC), the KV pool is full after
it, and the server's memory (both processes) is within 5% of before.

``MISTRALSERVE_FUZZ_SEED`` replays a run; a failure prints the seed and the request.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor
from mistralserve.v1 import generation_pb2 as pb

from tests.http_client import request
from tests.server_process import ServerProcess

SEED = int(os.environ.get("MISTRALSERVE_FUZZ_SEED", "20261204"))
HTTP_REQUESTS = 2400
GRPC_REQUESTS = 1200
WARM_UP = 300
ROUTES = ["/v1/completions", "/v1/chat/completions", "/ai/run/tiny", "/ai/run/@cf/other", "/v1/models", "/health",
          "/v1/completions/x", "/nope"]  # fmt: skip
ENUMS = {"role": ["user", "assistant", "system", "tool", "developer", "narrator", ""], "type": ["text",
         "json_object", "json_schema", "function", "image_url", "x"], "tool_choice": ["auto", "none", "required",
         "any", ""]}  # fmt: skip
ENUM_VALUES = [value for values in ENUMS.values() for value in values]


@pytest.fixture(scope="module")
def fuzzed(tiny_checkpoint: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(tiny_checkpoint, "--served-model-name", "tiny", "--default-max-tokens", "8",
                           "--max-queued-requests", "4096", "--max-message-bytes", "1MiB")  # fmt: skip
    try:
        server.wait_serving()
        yield server
    finally:
        server.close()


def weird_string(rng: random.Random) -> str:
    kind = rng.randrange(8)
    if kind == 0:
        return "".join(chr(rng.choice([rng.randrange(0xD800, 0xE000), rng.randrange(32, 127)])) for _ in range(4))
    if kind == 1:
        return "x" * rng.choice([10_000, 100_000, 300_000])
    if kind == 2:
        return "".join(chr(rng.randrange(0, 32)) for _ in range(8))
    if kind == 3:
        return "".join(chr(rng.randrange(0x80, 0x10FFFF)) for _ in range(6))
    if kind == 4:
        return rng.choice(["[INST]", "<s>", "</s>", "[TOOL_CALLS]", "{{ raise_exception('x') }}", "\\u0000", "%s%n"])
    if kind == 5:
        return rng.choice(["(a|aa){1000}", "((((", "[a-", "start: x", "root ::= [", '{"type": "strin"}'])
    return "".join(rng.choice('ab {}[]":,éü日😀\n') for _ in range(rng.randrange(0, 20)))


def weird_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(12)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 1, 2, 7, 17, 2**31, -(2**31) - 1, 2**63, 2**64, 10**30, -(10**30)])
    if kind == 3:
        return rng.choice([0.0, -0.5, 1e-300, 1e308, float("inf"), float("-inf"), float("nan"), 2.5])
    if kind in (4, 5):
        return weird_string(rng)
    if kind == 6 and depth < 3:
        return [weird_value(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    if kind == 7 and depth < 3:
        return {weird_string(rng)[:8]: weird_value(rng, depth + 1) for _ in range(rng.randrange(0, 4))}
    if kind == 8:
        nested: Any = 1
        for _ in range(rng.choice([10, 63, 64, 65, 200, 900])):  # json.dumps itself stops near 1,000
            nested = [nested]
        return nested
    if kind == 9:
        return rng.choice(ENUM_VALUES)
    return rng.choice(["", "hi", 3, [], {}, [1, 2]])


def base_body(route: str, rng: random.Random) -> dict[str, Any]:
    messages = [{"role": "user", "content": "hello"}]
    if route.endswith("chat/completions"):
        body: dict[str, Any] = {"messages": messages, "max_tokens": 4}
        if rng.random() < 0.3:
            body["tools"] = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
            body["tool_choice"] = rng.choice(["auto", "required", "none"])
    elif route.startswith("/ai/run"):
        body = {"prompt": "hello", "max_tokens": 4} if rng.random() < 0.5 else {"messages": messages}
    else:
        body = {"prompt": "hello", "max_tokens": 4}
    if rng.random() < 0.3:
        body["stream"] = True
    if rng.random() < 0.2:
        body["response_format"] = rng.choice([{"type": "json_object"}, {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}}])  # fmt: skip
    return body


def mutate(value: Any, rng: random.Random) -> Any:
    """One field somewhere in ``value`` replaced, removed or added."""
    if isinstance(value, dict) and value and rng.random() < 0.7:
        key = rng.choice(list(value))
        choice = rng.randrange(4)
        if choice == 0:
            del value[key]
        elif choice == 1:
            value[key] = weird_value(rng)
        elif choice == 2:
            value[key] = mutate(value[key], rng)
        else:
            value[rng.choice(["n", "seed", "stop", "top_p", "logprobs", "stream_options", "best_of", "x", key])] = (
                weird_value(rng)
            )
        return value
    if isinstance(value, list) and value and rng.random() < 0.7:
        i = rng.randrange(len(value))
        value[i] = mutate(value[i], rng)
        return value
    return weird_value(rng)


def http_case(rng: random.Random) -> tuple[str, str, bytes, dict[str, str]]:
    route = rng.choice(ROUTES)
    method = "GET" if route in ("/v1/models", "/health") and rng.random() < 0.8 else "POST"
    if rng.random() < 0.05:
        method = rng.choice(["PUT", "DELETE", "GET", "PATCH"])
    headers = {"Content-Type": rng.choice(["application/json"] * 9 + ["text/plain", "application/json; charset=x"])}
    kind = rng.random()
    if kind < 0.08:
        raw = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 64)))
    elif kind < 0.14:
        raw = json.dumps(base_body(route, rng)).encode()[: rng.randrange(1, 40)]  # truncated
    else:
        body: Any = base_body(route, rng)
        for _ in range(rng.randrange(1, 4)):
            body = mutate(body, rng)
        raw = json.dumps(body, allow_nan=True).encode()  # ensure_ascii: surrogates go as \\udXXX escapes
        if rng.random() < 0.05:
            raw = raw.replace(b"\\ud8", b"\xed\xa0\x80", 1)  # raw CESU bytes instead of the escape
    return route, method, raw, headers


def check_http(server: ServerProcess, case: tuple[str, str, bytes, dict[str, str]], index: int) -> int:
    route, method, raw, headers = case
    reply = request(server.http_url, route, method=method, raw=raw if method != "GET" else None, headers=headers,
                    timeout=300)  # fmt: skip
    where = f"seed {SEED}, request {index}: {method} {route} {raw[:300]!r} -> {reply.status} {reply.body[:300]!r}"
    assert reply.status in (200, 400, 404, 405, 408, 413, 415, 429), where
    media = reply.headers.get("content-type", "")
    if reply.status != 200 or not media.startswith("text/event-stream"):
        assert media.startswith("application/json"), where
        json.loads(reply.body)
    else:
        for block in reply.body.decode().split("\n\n"):
            if block:
                assert block.startswith("data: "), where
                if block != "data: [DONE]":
                    payload = json.loads(block[len("data: ") :])
                    assert "error" not in payload or payload["error"]["type"] != "server_error", where
    return reply.status


def process_tree_mb(server: ServerProcess) -> float:
    pids = [server.process.pid, *(int(c) for c in Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children")
                                  .read_text().split())]  # fmt: skip
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


def pool_full(server: ServerProcess) -> bool:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with server.channel() as channel:
            info = server.stub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
        if info.kv_cache_free_blocks == info.kv_cache_blocks:
            return True
        time.sleep(0.2)
    return False


def test_fuzzed_http_requests_are_never_a_500(fuzzed: ServerProcess) -> None:
    rng = random.Random(SEED)
    cases = [http_case(rng) for _ in range(WARM_UP + HTTP_REQUESTS)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: check_http(fuzzed, cases[i], i), range(WARM_UP)))
        assert pool_full(fuzzed)
        before = process_tree_mb(fuzzed)
        statuses = list(pool.map(lambda i: check_http(fuzzed, cases[i], i), range(WARM_UP, len(cases))))
    assert pool_full(fuzzed)
    after = process_tree_mb(fuzzed)
    assert statuses.count(200) > 200 and statuses.count(400) > 500, {s: statuses.count(s) for s in set(statuses)}
    assert after < before * 1.05, (before, after)


def random_message(message: Any, rng: random.Random, depth: int = 0) -> None:
    """Every field of ``message`` maybe set to a random value of its type (oneofs: the last set wins)."""
    for field in message.DESCRIPTOR.fields:
        if rng.random() < 0.5:
            continue
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if depth > 3:
                continue
            if field.is_repeated:
                for _ in range(rng.randrange(0, 3)):
                    random_message(getattr(message, field.name).add(), rng, depth + 1)
            else:
                random_message(getattr(message, field.name), rng, depth + 1)
                getattr(message, field.name).SetInParent()
            continue
        values = [scalar(field, rng) for _ in range(rng.randrange(0, 4))]
        if field.is_repeated:
            getattr(message, field.name).extend(values)
        elif values:
            setattr(message, field.name, values[0])


def scalar(field: FieldDescriptor, rng: random.Random) -> Any:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        text = weird_string(rng)
        return text.encode("utf-8", "replace").decode() if not text.isascii() else text  # proto strings are UTF-8
    if kind == FieldDescriptor.TYPE_BOOL:
        return rng.random() < 0.5
    if kind in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return rng.choice([0.0, -1.0, 0.5, 2.0, 1e30, float("inf"), float("nan"), 1e-30])
    if kind == FieldDescriptor.TYPE_ENUM:
        assert field.enum_type is not None
        return rng.choice([v.number for v in field.enum_type.values])
    unsigned = kind in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64)
    bits = 64 if kind in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64) else 32
    top = (1 << bits) - 1 if unsigned else (1 << (bits - 1)) - 1
    low = 0 if unsigned else -(1 << (bits - 1))
    return rng.choice([low, top, 0, 1, 2, 3, 16, 17, 64, 100000, rng.randrange(low, top)])


def test_fuzzed_grpc_requests_are_never_internal(fuzzed: ServerProcess) -> None:
    rng = random.Random(SEED + 1)
    identity: Any = None
    ok = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}

    def case() -> tuple[bool, bytes]:
        streaming = rng.random() < 0.5
        message: Any = (pb.GenerateStreamRequest if streaming else pb.GenerateRequest)()
        random_message(message, rng)
        if message.HasField("stopping") and message.stopping.HasField("max_tokens"):
            message.stopping.max_tokens = min(message.stopping.max_tokens, 600)  # bounded generations
        garbage = rng.random() < 0.1
        payload = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 40))) if garbage else (
            message.SerializeToString())  # fmt: skip
        return streaming, payload

    def one(index: int, streaming: bool, payload: bytes) -> grpc.StatusCode:
        method = f"/mistralserve.v1.GenerationService/{'GenerateStream' if streaming else 'Generate'}"
        with fuzzed.channel() as channel:
            try:
                if streaming:
                    list(channel.unary_stream(method, identity, identity)(payload, timeout=300))
                else:
                    channel.unary_unary(method, identity, identity)(payload, timeout=300)
                return grpc.StatusCode.OK
            except grpc.RpcError as error:
                code = error.code()
                assert code in ok, f"seed {SEED + 1}, request {index}: {payload[:300]!r} -> {code} {error.details()}"
                return code

    cases = [case() for _ in range(GRPC_REQUESTS)]
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda i: one(i, *cases[i]), range(len(cases))))
    assert codes.count(grpc.StatusCode.OK) > 15 and codes.count(grpc.StatusCode.INVALID_ARGUMENT) > 300
    assert pool_full(fuzzed)
