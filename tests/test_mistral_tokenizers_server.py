"""Every feature on every vocabulary kind, through a real server and the real openai SDK: a tiny
random checkpoint per kind of ``tests.vocabularies`` (mistral-common's v1/v3/v7 and Tekken files,
GGUF and ``tokenizer.json`` vocabularies written from them, the default model's byte-level BPE).

Per kind, 3 seeds at temperature 0.8 of: a JSON schema, any JSON object, a regex, a choice, a
grammar (chat), a JSON schema on ``/v1/completions``, tools with ``required``, a named function and
``auto``. No answer is a 500; every finished output validates (jsonschema, ``re.fullmatch``, one of
the choices, the grammar's own parser); every forced call names a given function with valid
arguments and a 9-character id. Also per kind: a stream equals the whole answer of the same seed
(incremental detokenization), a stop string cuts the text where it first appears, and, where
mistral-common builds the prompts, a two-turn tool loop's second prompt is exactly its
``encode_chat_completion``. The refused-token counter stays 0 throughout.

The schemas bound every string and number (``maxLength``, ``maximum``): a random model would
otherwise ramble inside a JSON string until ``max_tokens``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from tests.prometheus_text import scrape
from tests.server_process import ServerProcess
from tests.test_structured_server import ARITHMETIC
from tests.test_vocabulary_constraints import CHOICES, REGEX, SCHEMA, TOOLS, check
from tests.vocabularies import KINDS, write_checkpoint

SEEDS = (0, 1, 2)
MISTRAL_COMMON = ("mistral-v3", "mistral-v7", "tekken-v7", "tekken-v11", "tekken-v13")
TOOL_PARAMS: Any = [
    {"type": "function", "function": {"name": s.name, "description": f"The {s.name[4:]}.", "parameters": s.parameters}}
    for s in TOOLS.values()
]
ASK: Any = [{"role": "user", "content": "Quel temps fait-il à Paris? Réponds en JSON 🙂"}]


@pytest.fixture(scope="module", params=KINDS)
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, default_model_path: Path
) -> Iterator[tuple[str, ServerProcess, Path]]:
    kind = str(request.param)
    model = write_checkpoint(kind, tmp_path_factory.mktemp(kind), default_model_path)
    server = ServerProcess(model, "--max-num-seqs", "32", "--served-model-name", "tiny")
    try:
        server.wait_serving()
        yield kind, server, model
    finally:
        server.close()


def sdk(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="none", max_retries=0, timeout=300)


def chat_request(kind: str, seed: int) -> dict[str, Any]:
    common: dict[str, Any] = {"model": "tiny", "messages": ASK, "temperature": 0.8, "seed": seed, "max_tokens": 96}
    if kind == "json_schema":
        return {**common, "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA}}}
    if kind == "json_object":
        return {**common, "response_format": {"type": "json_object"}}
    if kind in ("regex", "choice", "grammar"):
        value: Any = {"regex": REGEX, "choice": list(CHOICES), "grammar": ARITHMETIC}[kind]
        return {**common, "extra_body": {"structured_outputs": {kind: value}}}
    choice: Any = {"tools_required": "required", "tools_auto": "auto",
                   "tools_named": {"type": "function", "function": {"name": "get_time"}}}[kind]  # fmt: skip
    # parallel calls: after each, the model picks another or the end, so a few may come
    return {**common, "tools": TOOL_PARAMS, "tool_choice": choice, "max_tokens": 256}


def check_calls(kind: str, calls: list[Any]) -> None:
    for call in calls:
        assert re.fullmatch("[a-zA-Z0-9]{9}", call.id), call.id
        jsonschema.validate(json.loads(call.function.arguments), TOOLS[call.function.name].parameters)
    if kind == "tools_named":
        assert [c.function.name for c in calls] == ["get_time"]


def run_chat(client: openai.OpenAI, kind: str, seed: int) -> tuple[str, str, bool]:
    """(constraint kind, finish reason, whether the finished answer was checked)."""
    choice = client.chat.completions.create(**chat_request(kind, seed)).choices[0]
    reason = choice.finish_reason
    if reason == "length":
        return kind, reason, False
    calls = choice.message.tool_calls or []
    if kind in ("tools_required", "tools_named"):
        assert reason == "tool_calls" and calls and not choice.message.content, choice
        check_calls(kind, calls)
    elif kind == "tools_auto":
        check_calls(kind, calls)
        assert reason == ("tool_calls" if calls else "stop")
    else:
        assert reason == "stop" and not calls, choice
        check(kind, choice.message.content or "")
    return kind, reason, True


def run_completion(client: openai.OpenAI, seed: int) -> tuple[str, str, bool]:
    schema = {"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA}}
    choice = client.completions.create(
        model="tiny", prompt="The weather in Paris, as JSON:", temperature=0.8, seed=seed, max_tokens=96,
        extra_body={"response_format": schema},
    ).choices[0]  # fmt: skip
    if choice.finish_reason == "stop":
        jsonschema.validate(json.loads(choice.text), SCHEMA)
    return "completions_json_schema", str(choice.finish_reason), choice.finish_reason == "stop"


def test_every_constraint_kind_is_valid_and_never_a_500(served: tuple[str, ServerProcess, Path]) -> None:
    kind, server, _ = served
    client = sdk(server)
    kinds = ("json_schema", "json_object", "regex", "choice", "grammar", "tools_required", "tools_named", "tools_auto")
    jobs: list[Callable[[], tuple[str, str, bool]]] = [partial(run_chat, client, k, s) for k in kinds for s in SEEDS]
    jobs += [partial(run_completion, client, s) for s in SEEDS]
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda job: job(), jobs))
    checked = {name for name, _, done in results if done}
    # bounded shapes complete within max_tokens (a reasoning model may think past it instead)
    bounded = {"json_schema", "regex", "choice", "grammar", "tools_required", "tools_named", "completions_json_schema"}
    if kind != "tekken-v13":
        assert bounded <= checked, (kind, sorted(bounded - checked))
    assert refused_tokens(server) == 0


def test_streams_equal_whole_answers_and_stop_strings_cut(served: tuple[str, ServerProcess, Path]) -> None:
    kind, server, _ = served
    client = sdk(server)
    request = chat_request("json_schema", 5)
    whole = client.chat.completions.create(**request).choices[0].message.content or ""
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        **request, stream=True) if chunk.choices)  # fmt: skip
    assert streamed == whole and whole
    free: Any = {"model": "tiny", "messages": ASK, "temperature": 0.8, "seed": 3, "max_tokens": 24}
    text = client.chat.completions.create(**free).choices[0].message.content or ""
    stop = text[len(text) // 2 : len(text) // 2 + 2] if len(text) >= 4 else None
    if stop is None or not stop.strip():
        pytest.skip(f"{kind}: the free answer {text!r} has no usable stop string")
    cut = client.chat.completions.create(**free, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.message.content == text[: text.index(stop)]


def test_a_two_turn_tool_loop_renders_as_mistral_common_does(served: tuple[str, ServerProcess, Path]) -> None:
    """The first turn's forced call comes back through the SDK as the assistant's tool call, the
    tool answers, and the second prompt (``return_token_ids``) is mistral-common's own encoding."""
    kind, server, model = served
    if kind not in MISTRAL_COMMON:
        pytest.skip("the prompts of this kind come from a chat template, not mistral-common")
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    client = sdk(server)
    first = client.chat.completions.create(**chat_request("tools_named", 0)).choices[0]
    [call] = first.message.tool_calls or []
    history: list[Any] = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function", "function": {"name": call.function.name,
                                                             "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "name": call.function.name, "content": '{"time": "12:00"}'},
    ]  # fmt: skip
    second = client.chat.completions.create(model="tiny", messages=history, tools=TOOL_PARAMS, max_tokens=4,
                                            temperature=0, extra_body={"return_token_ids": True})  # fmt: skip
    [tokenizer_file] = [p for p in model.iterdir() if p.name.startswith(("tokenizer.model", "tekken"))]
    reference = MistralTokenizer.from_file(str(tokenizer_file))
    expected = reference.encode_chat_completion(ChatCompletionRequest.model_validate(
        {"messages": history, "tools": TOOL_PARAMS})).tokens  # fmt: skip
    assert (second.model_extra or {})["prompt_token_ids"] == expected


def refused_tokens(server: ServerProcess) -> float:
    return scrape(server.metrics_url()).value("mistralserve_structured_output_refused_tokens_total")


def test_grpc_chat_gets_the_same_tool_calls(served: tuple[str, ServerProcess, Path]) -> None:
    """gRPC chat with tools: a forced call in the model's format comes back in ``tool_calls``
    (streamed and whole alike), never as text; a tool choice naming no tool is INVALID_ARGUMENT."""
    import grpc
    from mistralserve.v1 import generation_pb2 as pb

    _, server, _ = served
    tools = [pb.Tool(name=t["function"]["name"], description=t["function"]["description"],
                     parameters=json.dumps(t["function"]["parameters"])) for t in TOOL_PARAMS]  # fmt: skip
    messages = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=ASK[0]["content"])], tools=tools,
                               tool_choice=pb.ToolChoice(function="get_time"))  # fmt: skip
    sampling = pb.SamplingOptions(temperature=0.8, seed=11)
    stopping = pb.StoppingOptions(max_tokens=96)
    with server.channel() as channel:
        stub = server.stub(channel)
        streamed = list(stub.GenerateStream(pb.GenerateStreamRequest(messages=messages, sampling=sampling,
                                                                     stopping=stopping), timeout=120))  # fmt: skip
        whole = stub.Generate(pb.GenerateRequest(messages=messages, sampling=sampling, stopping=stopping), timeout=120)
        messages.tool_choice.function = "launch_rocket"
        with pytest.raises(grpc.RpcError) as bad:
            stub.Generate(pb.GenerateRequest(messages=messages), timeout=60)
    calls = [call for response in streamed for call in response.tool_calls]
    assert streamed[-1].finish_reason == pb.FINISH_REASON_STOP
    assert "".join(r.text for r in streamed) == "" and len(calls) == 1 and calls[0].name == "get_time"
    jsonschema.validate(json.loads(calls[0].arguments), TOOLS["get_time"].parameters)
    [completion] = whole.completions
    assert completion.text == "" and [(c.name, c.arguments) for c in completion.tool_calls] == [
        (calls[0].name, calls[0].arguments)]  # fmt: skip
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (bad.value.details() or "").startswith("messages.tool_choice.function: 'launch_rocket' is not one of")
