"""Both Mistral tool-call formats read back exactly: the token sequences are mistral-common's own
encoding of assistant tool-call messages (v3 and v7 SentencePiece: ``[TOOL_CALLS][{...}]``; v11
and v13 Tekken: ``[TOOL_CALLS]name[ARGS]{...}``, v11 with ``[CALL_ID]``), detokenized as the engine
does it (markers kept), written by the HTTP chat format streamed token by token and whole: the
same OpenAI ``tool_calls`` both ways, ids kept where the model wrote them and 9 characters where
it did not, content before and after the calls kept, a block that does not parse returned as
content and reported."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage
from mistral_common.protocol.instruct.tool_calls import FunctionCall, ToolCall
from mistralserve.v1 import generation_pb2 as pb

from scheduler.request import FinishReason, RequestOutput, SamplingParams
from server.chat_output import ChatOutputParser, ChatOutputSpec
from server.detokenizer import IncrementalDetokenizer
from server.frontend import Collected, Completion
from server.http.formats import ChatFormat
from server.http.requests import HttpRequest
from server.tokenizer import Tokenizer
from server.tokenizer_loader import load_tokenizer
from server.tool_calls import CallFormat, call_style
from server.validation import Prepared
from tests.vocabularies import write_vocabulary

VERSIONS = {"v3": "mistral-v3", "v7": "mistral-v7", "v11": "tekken-v11", "v13": "tekken-v13"}
CALLS = [
    ToolCall(id="abc123XYZ", function=FunctionCall(name="get_weather", arguments='{"city": "Paris", "unit": "c"}')),
    ToolCall(id="Q9w8E7r6T", function=FunctionCall(name="get_time", arguments='{"tz": "Europe/Zürich"}')),
]
NAMES = frozenset({"get_weather", "get_time"})


@pytest.fixture(scope="module", params=list(VERSIONS))
def versioned(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, default_model_path: Path
) -> tuple[str, Tokenizer]:
    kind = VERSIONS[request.param]
    return str(request.param), load_tokenizer(write_vocabulary(kind, tmp_path_factory.mktemp(kind), default_model_path))


def assistant_tokens(tokenizer: Tokenizer, calls: list[ToolCall], content: str | None = None) -> list[int]:
    """mistral-common's encoding of an assistant message with these calls, without its EOS."""
    encoder = tokenizer.chat_encoder
    assert encoder is not None
    message = AssistantMessage(content=content, tool_calls=calls)
    tokens = list(encoder.mistral.instruct_tokenizer.encode_assistant_message(message, False))  # type: ignore[attr-defined]
    return tokens[:-1] if tokens[-1] in tokenizer.special.eos_ids else tokens


def chat_format(tokenizer: Tokenizer, stream: bool, unparsed: list[str]) -> ChatFormat:
    spec = ChatOutputSpec(calls=call_style(tokenizer), names=NAMES)
    prepared = Prepared("r", [1], SamplingParams(), 0, spec)
    request = HttpRequest(pb.GenerateRequest(), stream=stream)
    return ChatFormat(request, prepared, "m", tokenizer, lambda why, text: unparsed.append(text))


def texts(tokenizer: Tokenizer, tokens: list[int]) -> list[str]:
    """The engine's text deltas for these output tokens (the format's markers kept)."""
    stream = IncrementalDetokenizer(tokenizer, tokenizer.encode_chat([{"role": "user", "content": "Hi"}]),
                                    kept=call_style(tokenizer).marker_ids)  # fmt: skip
    deltas = [stream.append(token).text for token in tokens]
    deltas[-1] += stream.flush()
    return deltas


def read_back(tokenizer: Tokenizer, tokens: list[int]) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """(the streamed answer summed up, the whole answer's message, blocks reported unparsed)."""
    unparsed: list[str] = []
    deltas = texts(tokenizer, tokens)
    streaming = chat_format(tokenizer, True, unparsed)
    content, calls, reason = "", {}, None
    for i, (token, text) in enumerate(zip(tokens, deltas, strict=True)):
        last = i == len(tokens) - 1
        output = RequestOutput("r", 0, (token,), text, finish_reason=FinishReason.STOP if last else None)
        for chunk in streaming.chunks(output):
            choice = json.loads(chunk.removeprefix(b"data: "))["choices"][0]
            content += choice["delta"].get("content") or ""
            for call in choice["delta"].get("tool_calls", []):
                calls[call["index"]] = {"id": call["id"], **call["function"]}
            reason = choice["finish_reason"] or reason
    whole = chat_format(tokenizer, False, unparsed)
    completion = Completion(0, "".join(deltas), list(tokens), finish_reason=FinishReason.STOP)
    message = whole.whole(Collected([completion]))["choices"][0]
    streamed = {"content": content, "tool_calls": [calls[i] for i in sorted(calls)], "finish_reason": reason}
    return streamed, message, unparsed


def as_calls(message: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"id": c["id"], **c["function"]} for c in message["message"].get("tool_calls") or []]


def expected_ids(version: str, calls: list[ToolCall]) -> list[str | None]:
    """The ids the model wrote (v3, v7 in the JSON; v11 after [CALL_ID]); v13 writes none."""
    return [None if version == "v13" else call.id for call in calls]


@pytest.mark.parametrize("case", ["single", "parallel", "then_text", "text_then"])
def test_calls_read_back_the_same_streamed_and_whole(versioned: tuple[str, Tokenizer], case: str) -> None:
    version, tokenizer = versioned
    calls = CALLS[:1] if case == "single" else CALLS
    tokens = assistant_tokens(tokenizer, calls)
    before, after = "", ""
    if case == "then_text":
        after = " Voilà, c'est tout."
        tokens += tokenizer.encode(after, add_special_tokens=False)
    elif case == "text_then":
        before = "Je regarde 🔍"
        tokens = (assistant_tokens(tokenizer, calls, before) if version != "v3"  # v3 takes calls or content
                  else tokenizer.encode(before, add_special_tokens=False) + tokens)  # fmt: skip
    style = call_style(tokenizer)
    assert style.format == (CallFormat.MISTRAL_JSON if version in ("v3", "v7") else CallFormat.MISTRAL_ARGS)
    streamed, whole, unparsed = read_back(tokenizer, tokens)
    assert unparsed == []
    want = [(c.function.name, json.loads(c.function.arguments)) for c in calls]
    for got in (streamed["tool_calls"], as_calls(whole)):
        assert [(c["name"], json.loads(c["arguments"])) for c in got] == want
        for call, wanted in zip(got, expected_ids(version, calls), strict=True):
            assert call["id"] == wanted if wanted is not None else re.fullmatch("[a-zA-Z0-9]{9}", call["id"])
    assert streamed["finish_reason"] == whole["finish_reason"] == "tool_calls"
    assert streamed["content"].strip() == (whole["message"]["content"] or "").strip() == (before + after).strip()


def test_a_call_block_that_does_not_parse_comes_back_as_content(versioned: tuple[str, Tokenizer]) -> None:
    _, tokenizer = versioned
    tokens = assistant_tokens(tokenizer, CALLS[:1])
    marker = tokenizer.special_id("[TOOL_CALLS]")
    cut = tokens[: len(tokens) - 3]  # the arguments' JSON never closes (max_tokens hit)
    streamed, whole, unparsed = read_back(tokenizer, cut)
    text = "".join(texts(tokenizer, cut))
    assert text.startswith("[TOOL_CALLS]") and cut[0] == marker
    assert streamed["tool_calls"] == [] and "tool_calls" not in whole["message"]
    assert streamed["content"] == whole["message"]["content"] == text
    assert unparsed == [text, text]  # once for the stream, once for the whole answer
    unknown = assistant_tokens(
        tokenizer, [ToolCall(id="abc123XYZ", function=FunctionCall(name="rm_rf", arguments="{}"))]
    )
    streamed, whole, unparsed = read_back(tokenizer, unknown)
    assert streamed["tool_calls"] == [] and whole["message"]["content"] == "".join(texts(tokenizer, unknown))
    assert len(unparsed) == 2


def test_content_streams_before_the_marker_arrives(versioned: tuple[str, Tokenizer]) -> None:
    """Text before a call is not held back until the end: each delta is content at once."""
    _, tokenizer = versioned
    parser = ChatOutputParser(ChatOutputSpec(calls=call_style(tokenizer), names=NAMES), lambda why, text: None)
    assert parser.feed("Bonjour").content == "Bonjour"
    assert parser.feed(" à vous").content == " à vous"
    assert parser.feed("[TOOL_").content == ""  # may be the start of a marker
    delta = parser.finish()
    assert delta.content == "[TOOL_" and delta.calls == []
