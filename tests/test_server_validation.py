"""Bad input against a real server: INVALID_ARGUMENT naming the field, RESOURCE_EXHAUSTED
for an oversized message, and garbage bytes that leave the server SERVING."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from mistralserve.v1 import generation_pb2 as pb

from tests.server_process import ServerProcess

S, T = pb.SamplingOptions, pb.StoppingOptions
USER = pb.ChatMessage(role="user", content="hi")
CASES: dict[str, tuple[dict[str, Any], str]] = {
    "empty_prompt": ({"prompt": ""}, "prompt: must not be empty"),
    "no_input": ({}, "input: give exactly one of prompt, messages, prompt_token_ids (got none)"),
    "prompt_longer_than_context": ({"prompt": "x" * 600}, "prompt: 600 tokens; the context allows at most 511"),
    "max_tokens_zero": ({"prompt": "hi", "stopping": T(max_tokens=0)}, "stopping.max_tokens: must be >= 1, got 0"),
    "max_tokens_beyond_context": (
        {"prompt": "hi", "stopping": T(max_tokens=600)},
        "stopping.max_tokens: must be <= 510 (the context left after the prompt), got 600",
    ),
    "temperature_negative": (
        {"prompt": "hi", "sampling": S(temperature=-0.5)},
        "sampling.temperature: must be a finite number >= 0, got -0.5",
    ),
    "temperature_nan": (
        {"prompt": "hi", "sampling": S(temperature=float("nan"))},
        "sampling.temperature: must be a finite number >= 0, got nan",
    ),
    "temperature_inf": (
        {"prompt": "hi", "sampling": S(temperature=float("inf"))},
        "sampling.temperature: must be a finite number >= 0, got inf",
    ),
    "top_p_zero": ({"prompt": "hi", "sampling": S(top_p=0.0)}, "sampling.top_p: must be in (0, 1], got 0.0"),
    "top_p_above_one": ({"prompt": "hi", "sampling": S(top_p=1.5)}, "sampling.top_p: must be in (0, 1], got 1.5"),
    "top_k_below_minus_one": (
        {"prompt": "hi", "sampling": S(top_k=-2)},
        "sampling.top_k: must be -1 (disabled), 0 (disabled) or a positive integer, got -2",
    ),
    "min_p_negative": ({"prompt": "hi", "sampling": S(min_p=-0.25)}, "sampling.min_p: must be in [0, 1], got -0.25"),
    "min_p_above_one": ({"prompt": "hi", "sampling": S(min_p=1.25)}, "sampling.min_p: must be in [0, 1], got 1.25"),
    "empty_stop_string": (
        {"prompt": "hi", "stopping": T(stop=["ok", ""])},
        "stopping.stop: must be non-empty strings, got ['ok', '']",
    ),
    "too_many_stop_strings": (
        {"prompt": "hi", "stopping": T(stop=[f"s{i}" for i in range(17)])},
        "stopping.stop: must be at most 16 strings, got 17",
    ),
    "n_zero": ({"prompt": "hi", "n": 0}, "n: must be in [1, 16], got 0"),
    "n_seventeen": ({"prompt": "hi", "n": 17}, "n: must be in [1, 16], got 17"),
    "unknown_chat_role": (
        {"messages": pb.ChatMessages(messages=[USER, pb.ChatMessage(role="robot", content="beep")])},
        "messages[1].role: 'robot' is not one of system, user, assistant, tool",
    ),
    "token_id_outside_vocabulary": (
        {"prompt_token_ids": pb.TokenIds(ids=[5, 128])},
        "prompt_token_ids: 128 is outside the vocabulary [0, 128)",
    ),
    "empty_token_ids": ({"prompt_token_ids": pb.TokenIds(ids=[])}, "prompt_token_ids: must not be empty"),
    "top_logprobs_above_20": (
        {"prompt": "hi", "logprobs": True, "top_logprobs": 21},
        "top_logprobs: must be in [0, 20], got 21",
    ),
    "request_id_too_long": ({"prompt": "hi", "request_id": "r" * 300}, "request_id: at most 256 characters, got 300"),
    "min_tokens_above_max": (
        {"prompt": "hi", "stopping": T(max_tokens=2, min_tokens=3)},
        "stopping.min_tokens: must be <= max_tokens (2), got 3",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("method", ["GenerateStream", "Generate"])
def test_bad_input_is_invalid_argument_naming_the_field(server: ServerProcess, name: str, method: str) -> None:
    fields, message = CASES[name]
    with server.channel() as channel, pytest.raises(grpc.RpcError) as error:
        stub = server.stub(channel)
        if method == "GenerateStream":
            list(stub.GenerateStream(pb.GenerateStreamRequest(**fields), timeout=30))
        else:
            stub.Generate(pb.GenerateRequest(**fields), timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details() == message


def raw_call(server: ServerProcess, method: str, payload: bytes, streaming: bool) -> grpc.RpcError:
    with server.channel() as channel:
        path = f"/mistralserve.v1.GenerationService/{method}"
        with pytest.raises(grpc.RpcError) as error:
            identity: Any = None  # bytes go out as they are
            if streaming:
                list(channel.unary_stream(path, identity, identity)(payload, timeout=30))
            else:
                channel.unary_unary(path, identity, identity)(payload, timeout=30)
    return error.value


def test_two_inputs_on_the_wire_are_refused(server: ServerProcess) -> None:
    """Protobuf keeps the last member of a oneof; the server reads the bytes and refuses both."""
    payload = (
        pb.GenerateRequest(prompt="hi").SerializeToString()
        + pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[5])).SerializeToString()
    )
    error = raw_call(server, "Generate", payload, streaming=False)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "input: give exactly one of prompt, messages, prompt_token_ids (got several)"


@pytest.mark.parametrize("method", ["GenerateStream", "Generate", "Tokenize", "GetModelInfo"])
def test_garbage_bytes_get_an_error_and_the_server_stays_serving(server: ServerProcess, method: str) -> None:
    error = raw_call(server, method, b"\xff\xfe\xfd garbage \x00\x01" * 5, streaming=method == "GenerateStream")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "is not a valid" in (error.details() or "")
    assert server.health() == "SERVING"


def test_oversized_message_is_resource_exhausted(server: ServerProcess) -> None:
    with server.channel() as channel, pytest.raises(grpc.RpcError) as error:
        server.stub(channel).Generate(pb.GenerateRequest(prompt="x" * (5 << 20)), timeout=30)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert server.health() == "SERVING"


@pytest.mark.parametrize(
    ("stopping", "room", "default", "expected"),
    [
        (T(), 1000, 256, 256),  # unset: the server's default
        (T(), 100, 256, 100),  # capped by the context left, not an error
        (T(), 1000, 7, 7),  # --default-max-tokens 7
        (T(min_tokens=300), 1000, 256, 300),  # never below min_tokens
        (T(max_tokens=500), 1000, 256, 500),  # a set value is the request's
    ],
)
def test_max_tokens_default(stopping: pb.StoppingOptions, room: int, default: int, expected: int) -> None:
    from server.validation import sampling_params

    assert sampling_params(pb.GenerateRequest(prompt="hi", stopping=stopping), room, default).max_tokens == expected
