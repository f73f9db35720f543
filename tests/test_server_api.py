"""A real server process: its streamed and unary results equal the in-process engine's;
grpcurl lists the service through reflection and streams; tokenizer and model info RPCs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from mistralserve.v1 import generation_pb2 as pb

from scheduler.output_stream import SyncOutputStream
from scheduler.request import SamplingParams
from server.runtime import Runtime, RuntimeOptions, build_runtime, pick_dtype
from tests.server_process import ServerProcess
from tests.tiny_checkpoint import CHARACTERS

GRPCURL = Path(sys.executable).parent / "grpcurl"
PROMPTS = ["Hello there", "The quick brown fox", "a", "日本語 and 😀 too", "x" * 200]


@pytest.fixture(scope="module")
def in_process(tiny_checkpoint: Path) -> Runtime:
    return build_runtime(RuntimeOptions(tiny_checkpoint, kv_cache_memory=32 << 20))


def engine_result(runtime: Runtime, prompt: str, params: SamplingParams) -> tuple[str, list[int], str]:
    stream = SyncOutputStream(1)
    runtime.engine.submit(runtime.request("ref", runtime.tokenizer.encode(prompt), params), stream)
    runtime.engine.run_until_idle()
    outputs = list(stream)
    return "".join(o.text for o in outputs), [t for o in outputs for t in o.token_ids], str(outputs[-1].finish_reason)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_stream_and_unary_equal_the_in_process_engine(server: ServerProcess, in_process: Runtime, prompt: str) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=24, stop=("q",))
    text, tokens, reason = engine_result(in_process, prompt, params)
    request: dict[str, Any] = dict(
        prompt=prompt,
        sampling=pb.SamplingOptions(temperature=0.0),
        stopping=pb.StoppingOptions(max_tokens=24, stop=["q"]),
    )
    with server.channel() as channel:
        stub = server.stub(channel)
        streamed = list(stub.GenerateStream(pb.GenerateStreamRequest(**request), timeout=60))
        unary = stub.Generate(pb.GenerateRequest(**request), timeout=60)
    assert "".join(r.text for r in streamed) == text == unary.completions[0].text
    assert [t for r in streamed for t in r.token_ids] == tokens == list(unary.completions[0].token_ids)
    expected_reason = pb.FINISH_REASON_STOP if reason == "stop" else pb.FINISH_REASON_LENGTH
    assert streamed[-1].finish_reason == unary.completions[0].finish_reason == expected_reason
    assert all(r.finish_reason == pb.FINISH_REASON_UNSPECIFIED for r in streamed[:-1])
    assert streamed[-1].usage.completion_tokens == len(tokens) == unary.usage.completion_tokens
    assert streamed[-1].usage.prompt_tokens == len(in_process.tokenizer.encode(prompt))


def test_request_id_is_echoed_or_made(server: ServerProcess) -> None:
    with server.channel() as channel:
        stub = server.stub(channel)
        named = list(
            stub.GenerateStream(
                pb.GenerateStreamRequest(prompt="hi", request_id="abc-1", stopping=pb.StoppingOptions(max_tokens=2)),
                timeout=30,
            )
        )
        made = stub.Generate(pb.GenerateRequest(prompt="hi", stopping=pb.StoppingOptions(max_tokens=2)), timeout=30)
    assert {r.request_id for r in named} == {"abc-1"}
    assert len(made.request_id) == 32


def test_parallel_samples_and_logprobs(server: ServerProcess) -> None:
    sampling = pb.SamplingOptions(temperature=1.0, seed=5)
    stopping = pb.StoppingOptions(max_tokens=6, ignore_eos=True)
    request = pb.GenerateRequest(
        prompt="Sample me", n=3, logprobs=True, top_logprobs=2, sampling=sampling, stopping=stopping
    )
    with server.channel() as channel:
        response = server.stub(channel).Generate(request, timeout=60)
    assert [c.index for c in response.completions] == [0, 1, 2]
    assert response.usage.completion_tokens == 18 and response.usage.prompt_tokens == len("Sample me")
    for completion in response.completions:
        assert len(completion.token_ids) == len(completion.logprobs) == 6
        for token, entry in zip(completion.token_ids, completion.logprobs, strict=True):
            assert entry.chosen.token_id == token and len(entry.top) == 2 and entry.top[0].rank == 1
            assert entry.chosen.logprob <= 0 and entry.top[0].logprob >= entry.top[1].logprob


def test_tokenize_detokenize_and_model_info(server: ServerProcess) -> None:
    with server.channel() as channel:
        stub = server.stub(channel)
        tokens = stub.Tokenize(pb.TokenizeRequest(text="Hi 😀"), timeout=10)
        text = stub.Detokenize(pb.DetokenizeRequest(token_ids=tokens.token_ids), timeout=10)
        chat = stub.Tokenize(
            pb.TokenizeRequest(messages=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="Yo")])),
            timeout=10,
        )
        info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert list(tokens.token_ids) == [3 + CHARACTERS.index(c) for c in "Hi 😀"]
    assert list(tokens.tokens) == list("Hi 😀")
    assert text.text == "Hi 😀"
    assert "".join(chat.tokens) == "<s>user: Yo\nassistant:"
    assert (info.architecture, info.vocab_size, info.num_attention_heads, info.num_key_value_heads) == (
        "mistral",
        128,
        4,
        2,
    )
    assert not info.HasField("sliding_window")
    assert info.kv_block_size == 16 and info.kv_cache_blocks > 0 and info.kv_cache_tokens == 16 * info.kv_cache_blocks
    auto_dtype = str(pick_dtype("auto", torch.device("cpu"))).removeprefix("torch.")  # bfloat16 where native
    assert (info.dtype, info.kv_cache_dtype, info.device, info.attention_backend, info.checkpoint_format) == (
        auto_dtype,
        auto_dtype,
        "cpu",
        "cpu",
        "hf",
    )
    assert info.context_length == 512


def test_grpcurl_lists_through_reflection_and_streams(server: ServerProcess) -> None:
    listed = subprocess.run(
        [str(GRPCURL), "-plaintext", server.target, "list"], capture_output=True, text=True, check=True
    )
    assert set(listed.stdout.split()) == {
        "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "mistralserve.v1.GenerationService",
    }  # fmt: skip
    described = subprocess.run(
        [str(GRPCURL), "-plaintext", server.target, "describe", "mistralserve.v1.GenerationService"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert (
        "rpc GenerateStream ( .mistralserve.v1.GenerateStreamRequest )"
        " returns ( stream .mistralserve.v1.GenerateStreamResponse )" in described.stdout
    )
    body = json.dumps(
        {"prompt": "Hello", "sampling": {"temperature": 0}, "stopping": {"maxTokens": 5, "ignoreEos": True}}
    )
    streamed = subprocess.run(
        [str(GRPCURL), "-plaintext", "-d", body, server.target, "mistralserve.v1.GenerationService/GenerateStream"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    messages = [json.loads(chunk) for chunk in streamed.stdout.replace("}\n{", "}\x00{").split("\x00")]
    assert len(messages) == 5
    assert messages[-1]["finish_reason"] == "FINISH_REASON_LENGTH"  # grpcurl prints proto field names


def test_health_reports_serving(server: ServerProcess) -> None:
    assert server.health() == "SERVING"
