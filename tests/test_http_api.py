"""The HTTP front-end against a real server process: the pinned ``openai`` SDK (sync and async,
streamed and not) gets the text gRPC gets; Workers AI's request shape with ``curl -N``; errors."""

from __future__ import annotations

import asyncio
import json
import subprocess
from typing import Any

import openai
import pytest
from mistralserve.v1 import generation_pb2 as pb
from openai.types.chat import ChatCompletionMessageParam

from tests.http_client import request, sse
from tests.server_process import ServerProcess

PROMPT = "The quick brown fox"
CHAT: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Tell me a story."},
]


def grpc_generate(server: ServerProcess, **fields: Any) -> pb.GenerateResponse:
    with server.channel() as channel:
        response: pb.GenerateResponse = server.stub(channel).Generate(pb.GenerateRequest(**fields), timeout=60)
    return response


def grpc_chat(server: ServerProcess, messages: Any, **fields: Any) -> pb.GenerateResponse:
    chat = pb.ChatMessages(messages=[pb.ChatMessage(**m) for m in messages])
    return grpc_generate(server, messages=chat, **fields)


GREEDY = {"sampling": pb.SamplingOptions(temperature=0.0), "stopping": pb.StoppingOptions(max_tokens=24)}
FINISH = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length"}


@pytest.fixture(scope="module")
def model_name(server: ServerProcess) -> str:
    with server.channel() as channel:
        return str(server.stub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=10).model_name)


def sync_client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.http_url + "/v1", api_key="not-needed", max_retries=0)


def test_openai_sdk_completions_equal_grpc(server: ServerProcess, model_name: str) -> None:
    expected = grpc_generate(server, prompt=PROMPT, **GREEDY)
    want = expected.completions[0]
    client = sync_client(server)
    [listed] = client.models.list().data
    assert listed.id == model_name
    whole = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=24, temperature=0)
    assert whole.model == model_name and whole.object == "text_completion"
    assert whole.choices[0].text == want.text
    assert whole.choices[0].finish_reason == FINISH[want.finish_reason]
    assert whole.usage is not None
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (
        expected.usage.prompt_tokens,
        len(want.token_ids),
    )
    assert whole.usage.total_tokens == expected.usage.prompt_tokens + len(want.token_ids)

    chunks = list(
        client.completions.create(
            model=model_name,
            prompt=PROMPT,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == FINISH[want.finish_reason] and set(finishes[:-1]) <= {None}
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)
    assert all(c.usage is None for c in chunks[:-1])


def test_openai_sdk_chat_equals_grpc(server: ServerProcess, model_name: str) -> None:
    expected = grpc_chat(server, CHAT, **GREEDY)
    want = expected.completions[0]
    client = sync_client(server)
    whole = client.chat.completions.create(
        model=model_name, messages=CHAT, max_completion_tokens=24, temperature=0, user="ignored"
    )
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == want.text
    assert whole.choices[0].finish_reason == FINISH[want.finish_reason]
    assert whole.usage is not None
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (
        expected.usage.prompt_tokens,
        len(want.token_ids),
    )

    stream = client.chat.completions.create(
        model=model_name,
        messages=CHAT,
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant" and all(d.role is None for d in deltas[1:])
    assert "".join(d.content or "" for d in deltas) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == FINISH[want.finish_reason]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(want.token_ids)


def test_openai_async_sdk_streams_and_samples(server: ServerProcess, model_name: str) -> None:
    expected = grpc_chat(server, CHAT, **GREEDY).completions[0].text

    async def run() -> tuple[str, str, list[str], list[str], str]:
        async with openai.AsyncOpenAI(base_url=server.http_url + "/v1", api_key="x", max_retries=0) as client:
            whole = await client.chat.completions.create(model=model_name, messages=CHAT, max_tokens=24, temperature=0)
            text = ""
            stream = await client.chat.completions.create(
                model=model_name, messages=CHAT, max_tokens=24, temperature=0, stream=True
            )
            async for chunk in stream:
                text += chunk.choices[0].delta.content or ""
            completion = ""
            async for piece in await client.completions.create(
                model=model_name, prompt=PROMPT, max_tokens=24, temperature=0, stream=True
            ):
                completion += piece.choices[0].text
            # n samples with seeds: reproducible, and each sample its own
            seeded = [
                await client.completions.create(
                    model=model_name, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=5, n=3
                )
                for _ in range(2)
            ]
            first = [c.text for c in sorted(seeded[0].choices, key=lambda c: c.index)]
            second = [c.text for c in sorted(seeded[1].choices, key=lambda c: c.index)]
            return whole.choices[0].message.content or "", text, first, second, completion

    whole, streamed, first, second, completion = asyncio.run(run())
    assert whole == expected and streamed == expected
    assert completion == grpc_generate(server, prompt=PROMPT, **GREEDY).completions[0].text
    assert first == second and len(first) == 3


def test_sampling_fields_reach_the_engine_like_grpc(server: ServerProcess, model_name: str) -> None:
    """Every OpenAI and vLLM sampling field, seeded: the same tokens as the same gRPC request."""
    sampling = pb.SamplingOptions(
        temperature=0.9, top_p=0.9, top_k=20, min_p=0.05, seed=11, repetition_penalty=1.1,
        presence_penalty=0.5, frequency_penalty=0.3,
    )  # fmt: skip
    expected = grpc_generate(
        server, prompt=PROMPT, sampling=sampling, stopping=pb.StoppingOptions(max_tokens=16, min_tokens=4), n=2
    )
    client = sync_client(server)
    got = client.completions.create(
        model=model_name,
        prompt=PROMPT,
        max_tokens=16,
        n=2,
        temperature=0.9,
        top_p=0.9,
        seed=11,
        presence_penalty=0.5,
        frequency_penalty=0.3,
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "min_tokens": 4},
    )
    assert [c.text for c in sorted(got.choices, key=lambda c: c.index)] == [c.text for c in expected.completions]


def test_stop_strings_and_logprobs(server: ServerProcess, model_name: str) -> None:
    base = grpc_generate(server, prompt=PROMPT, **GREEDY).completions[0].text
    assert len(base) > 4
    stop = base[2:4]
    client = sync_client(server)
    stopped = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop])
    assert stopped.choices[0].text == base[: base.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"

    with_logprobs = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    logprobs = with_logprobs.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens is not None and logprobs.top_logprobs is not None
    assert "".join(logprobs.tokens) == with_logprobs.choices[0].text
    assert all(len(top) <= 3 for top in logprobs.top_logprobs)
    chat = client.chat.completions.create(
        model=model_name, messages=CHAT, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2
    )
    assert chat.choices[0].logprobs is not None and chat.usage is not None
    content = chat.choices[0].logprobs.content
    assert content is not None and len(content) == chat.usage.completion_tokens
    assert all(len(item.top_logprobs) == 2 and item.logprob <= 0 for item in content)
    assert content[0].logprob == pytest.approx(content[0].top_logprobs[0].logprob)  # greedy: the top token


def workers_ai_events(output: str) -> list[str]:
    blocks = [block for block in output.split("\n\n") if block]
    assert all(block.startswith("data: ") for block in blocks), output
    return [block.removeprefix("data: ") for block in blocks]


@pytest.fixture(scope="module")
def aliased(tiny_checkpoint: Any) -> Any:
    process = ServerProcess(tiny_checkpoint, "--served-model-name", "tiny", "--served-model-name", ALIAS)
    try:
        process.wait_serving()
        yield process
    finally:
        process.close()


ALIAS = "@cf/mistral/mistral-7b-instruct-v0.1"


def curl(url: str, body: str, *extra: str) -> str:
    command = ["curl", "-sS", "-N", "-X", "POST", url, "-H", "Content-Type: application/json", "-d", body, *extra]
    return subprocess.run(command, capture_output=True, text=True, check=True, timeout=120).stdout


def test_workers_ai_exact_body_streams_then_done(aliased: ServerProcess) -> None:
    """The product's origin, byte for byte: the alias, the body, SSE events, then [DONE]."""
    url = f"{aliased.http_url}/ai/run/{ALIAS}"
    events = workers_ai_events(curl(url, '{ "prompt": "What is grouped query attention", "stream": true }'))
    assert events[-1] == "[DONE]" and len(events) >= 2
    payloads = [json.loads(e) for e in events[:-1]]
    assert all(list(p) == ["response"] and isinstance(p["response"], str) for p in payloads)
    # seeded, so comparable: the same text as gRPC for the prompt as a user message
    seeded = '{ "prompt": "What is grouped query attention", "stream": true, "seed": 3, "max_tokens": 40 }'
    streamed = "".join(json.loads(e)["response"] for e in workers_ai_events(curl(url, seeded))[:-1])
    expected = grpc_chat(
        aliased,
        [{"role": "user", "content": "What is grouped query attention"}],
        sampling=pb.SamplingOptions(seed=3),
        stopping=pb.StoppingOptions(max_tokens=40),
    )
    assert streamed == expected.completions[0].text and streamed
    whole = json.loads(curl(url, seeded.replace('"stream": true', '"stream": false')))
    assert whole == {"result": {"response": streamed}, "success": True, "errors": [], "messages": []}


def test_workers_ai_served_name_messages_raw_and_unknown_model(aliased: ServerProcess) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    expected = grpc_chat(aliased, messages, **GREEDY).completions[0].text
    for name in ("tiny", ALIAS):
        reply = request(aliased.http_url, f"/ai/run/{name}", {"messages": messages, "temperature": 0, "max_tokens": 24})
        assert reply.status == 200 and reply.json()["result"]["response"] == expected
    raw = request(aliased.http_url, "/ai/run/tiny", {"prompt": PROMPT, "raw": True, "temperature": 0, "max_tokens": 24})
    assert raw.json()["result"]["response"] == grpc_generate(aliased, prompt=PROMPT, **GREEDY).completions[0].text
    missing = request(aliased.http_url, "/ai/run/@cf/meta/llama-3-8b-instruct", {"prompt": "hi"})
    assert missing.status == 404
    assert missing.json() == {
        "result": None,
        "success": False,
        "errors": [
            {
                "code": 404,
                "message": "model: '@cf/meta/llama-3-8b-instruct' is not served here (served: 'tiny', "
                f"'{ALIAS}', 'model')",
            }
        ],
        "messages": [],
    }
    models = request(aliased.http_url, "/v1/models", method="GET").json()
    assert [m["id"] for m in models["data"]] == ["tiny", ALIAS, "model"]


def test_an_unset_max_tokens_is_the_default_over_http(long_server: ServerProcess) -> None:
    reply = request(long_server.http_url, "/v1/completions", {"prompt": "go", "ignore_eos": True})
    assert reply.status == 200
    assert reply.json()["usage"]["completion_tokens"] == 256
    assert reply.json()["choices"][0]["finish_reason"] == "length"


def test_sse_streams_carry_exact_counts_with_parallel_samples(server: ServerProcess) -> None:
    body = {"prompt": PROMPT, "max_tokens": 17, "ignore_eos": True, "n": 3, "stream": True}
    body["stream_options"] = {"include_usage": True}
    stream = asyncio.run(sse(server.http_port or 0, "/v1/completions", body))
    assert stream.status == 200 and stream.events[-1] == "[DONE]"
    payloads = stream.payloads()
    finished = [c["index"] for p in payloads for c in p["choices"] if c["finish_reason"] == "length"]
    assert sorted(finished) == [0, 1, 2]
    assert payloads[-1]["usage"]["completion_tokens"] == 51
