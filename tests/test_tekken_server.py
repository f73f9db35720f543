"""A Mistral-layout checkpoint with a Tekken tokenizer (as Nemo ships: params.json,
consolidated.safetensors, tekken.json) served by a real ``mistral-serve serve``: chat prompts are
mistral-common's ``encode_chat_completion`` (v7: ``[SYSTEM_PROMPT]``), text round-trips, and a
chat request generates with stop strings."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import mistral_common
import pytest
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from mistralserve.v1 import generation_pb2 as pb

from model.loader import load_model
from tests.checkpoint_writers import hf_state, write_mistral
from tests.hf_reference import TinySpec, build_hf_model, save_hf_model
from tests.server_process import ServerProcess
from tests.vocabularies import write_tekken

SPEC = TinySpec("nemo_like", heads=4, kv_heads=2, head_dim=32, theta=1e6, vocab=131072)
DATA = Path(mistral_common.__file__).parent / "data"
MESSAGES = [
    {"role": "system", "content": "Réponds en français."},
    {"role": "user", "content": "Bonjour 🤖, qu'est-ce qu'un tokenizer?"},
]


@pytest.fixture(scope="module")
def nemo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path]]:
    root = tmp_path_factory.mktemp("nemo")
    hf = build_hf_model(SPEC)
    config = load_model(save_hf_model(hf, root / "hf")).config
    directory = write_mistral(hf_state(hf), config, root / "nemo-tiny")
    write_tekken(DATA / "tekken_240911.json", "v7", directory / "tekken.json")
    server = ServerProcess(directory, "--dtype", "float32")
    try:
        server.wait_serving()
        yield server, directory / "tekken.json"
    finally:
        server.close()


def chat(messages: list[dict[str, str]]) -> pb.ChatMessages:
    return pb.ChatMessages(messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages])


def test_chat_prompt_is_mistral_commons_and_text_round_trips(nemo: tuple[ServerProcess, Path]) -> None:
    server, tekken = nemo
    reference = MistralTokenizer.from_file(str(tekken))
    expected = reference.encode_chat_completion(ChatCompletionRequest.model_validate({"messages": MESSAGES})).tokens
    text = "Grüße 👨‍👩‍👧 — 日本語 code: `x**2`"
    with server.channel() as channel:
        stub = server.stub(channel)
        prompt = stub.Tokenize(pb.TokenizeRequest(messages=chat(MESSAGES)), timeout=30)
        plain = stub.Tokenize(pb.TokenizeRequest(text=text), timeout=30)
        back = stub.Detokenize(pb.DetokenizeRequest(token_ids=plain.token_ids, skip_special_tokens=True), timeout=30)
        info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
    assert list(prompt.token_ids) == expected
    assert "".join(prompt.tokens).startswith("<s>[SYSTEM_PROMPT]Réponds en français.[/SYSTEM_PROMPT][INST]")
    tekkenizer = reference.instruct_tokenizer.tokenizer
    assert list(plain.token_ids) == tekkenizer.encode(text, bos=False, eos=False)  # no BOS unless asked
    assert back.text == text
    assert (info.vocab_size, info.head_dim, info.num_attention_heads) == (131072, 32, 4)


def test_chat_generation_streams_and_stops(nemo: tuple[ServerProcess, Path]) -> None:
    server, _ = nemo
    request = pb.GenerateStreamRequest(
        messages=chat(MESSAGES),
        sampling=pb.SamplingOptions(temperature=0.0),
        stopping=pb.StoppingOptions(max_tokens=24),
    )
    with server.channel() as channel:
        stub = server.stub(channel)
        streamed = list(stub.GenerateStream(request, timeout=60))
        text = "".join(r.text for r in streamed)
        assert streamed[-1].usage.completion_tokens == 24
        assert len(text) > 0
        stop = text[len(text) // 2 : len(text) // 2 + 2] or text[:1]
        request.stopping.CopyFrom(pb.StoppingOptions(max_tokens=24, stop=[stop]))
        stopped = list(stub.GenerateStream(request, timeout=60))
        narrator = pb.GenerateStreamRequest(messages=chat([{"role": "narrator", "content": "x"}]))
        with pytest.raises(grpc.RpcError) as bad:
            list(stub.GenerateStream(narrator, timeout=30))
    assert stopped[-1].finish_reason == pb.FINISH_REASON_STOP
    assert "".join(r.text for r in stopped) == text[: text.index(stop)]
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "role" in (bad.value.details() or "")
