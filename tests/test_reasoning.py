"""Reasoning kept apart from the answer: the splitter, the markers each tokenizer gets, constraints
that apply after the thinking, and a served reasoning model.

The served model is a tiny Mistral-layout checkpoint with a v13 Tekken tokenizer ([THINK] and
[/THINK] are special tokens) whose weights are set so that greedy decoding writes exactly
``[THINK]<thinking>[/THINK]<answer></s>`` after the prompt: every layer's weights are zero, so each
position's output is its own embedding; the chain's tokens have one-hot embeddings and the LM head
maps each to the next. Real checkpoint format, real forward pass, nothing mocked.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
import torch
from llguidance import LLMatcher
from mistralserve.v1 import generation_pb2 as pb

from scheduler.request import Constraint, ConstraintKind, ReasoningSpan
from scheduler.structured import check_constraint, grammar_text
from server.grammar_vocab import grammar_tokenizer
from server.reasoning import ReasoningMarkers, ReasoningSplitter, reasoning_markers
from server.tokenizer import Tokenizer
from server.tokenizer_loader import load_tokenizer
from tests.checkpoint_writers import hf_state, write_mistral
from tests.hf_reference import TinySpec, build_hf_model
from tests.http_client import request as http_request
from tests.server_process import ServerProcess
from tests.test_vocabulary_constraints import CONSTRAINTS, constraint_of, walk
from tests.vocabularies import TEKKEN, write_tekken, write_vocabulary

THINKING = "Lyon est au sud-est. Donc: oui"
ANSWER_SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["oui", "non"]}}, "required": ["answer"],
                 "additionalProperties": False}  # fmt: skip
ANSWER = '{"answer": "non"}'
MESSAGES: Any = [{"role": "user", "content": "Lyon est-elle au nord?"}]


# -- the splitter ---------------------------------------------------------------------------------

MARKERS = ReasoningMarkers("[THINK]", "[/THINK]", 25, 26)
TEXT_MARKERS = ReasoningMarkers("<think>", "</think>")


@pytest.mark.parametrize("markers", [MARKERS, TEXT_MARKERS], ids=["tokens", "text"])
def test_every_split_of_the_stream_gives_the_same_parts(markers: ReasoningMarkers) -> None:
    output = f"{markers.start}a < b, [/x] </thin{markers.end}La réponse: 42 {markers.start}"
    whole = ("a < b, [/x] </thin", f"La réponse: 42 {markers.start}")
    for cut in range(len(output) + 1):
        for second in range(cut, len(output) + 1):
            splitter = ReasoningSplitter(markers, opened=False)
            parts = [splitter.feed(output[:cut]), splitter.feed(output[cut:second]), splitter.feed(output[second:])]
            parts.append(splitter.finish())
            assert ("".join(p[0] for p in parts), "".join(p[1] for p in parts)) == whole, (cut, second)


def test_the_thinking_is_only_what_the_output_opens_with() -> None:
    def split(text: str, opened: bool = False) -> tuple[str, str]:
        splitter = ReasoningSplitter(MARKERS, opened)
        reasoning, answer = splitter.feed(text)
        rest = splitter.finish()
        return reasoning + rest[0], answer + rest[1]

    assert split("Bonjour [THINK]x[/THINK]") == ("", "Bonjour [THINK]x[/THINK]")
    assert split("  [THINK]x[/THINK]y") == ("x", "y")
    assert split("still thinking[/THINK]done", opened=True) == ("still thinking", "done")
    assert split("[THINK]cut short by max_tokens") == ("cut short by max_tokens", "")
    assert split("[TH") == ("", "[TH")  # a marker that never came is the answer


# -- which markers a tokenizer gets ---------------------------------------------------------------


@pytest.fixture(scope="module")
def v13(tmp_path_factory: pytest.TempPathFactory, default_model_path: Path) -> Tokenizer:
    return load_tokenizer(write_vocabulary("tekken-v13", tmp_path_factory.mktemp("v13"), default_model_path))


def test_markers_follow_the_tokenizer(v13: Tokenizer, tmp_path: Path, default_model_path: Path) -> None:
    assert reasoning_markers(v13, "auto") == ReasoningMarkers("[THINK]", "[/THINK]", 25, 26)
    assert reasoning_markers(v13, "think") == reasoning_markers(v13, "auto")
    assert reasoning_markers(v13, "none") is None
    v11 = load_tokenizer(write_vocabulary("tekken-v11", tmp_path / "v11", default_model_path))
    assert reasoning_markers(v11, "auto") is None
    with pytest.raises(ValueError, match=r"^--reasoning-parser think: .*choose from none, auto$"):
        reasoning_markers(v11, "think")
    assert reasoning_markers(load_tokenizer(default_model_path), "auto") is None


def test_a_template_that_sets_up_think_tags_gets_text_markers(tiny_checkpoint: Path, tmp_path: Path) -> None:
    directory = tmp_path / "r1"
    directory.mkdir()
    for file in tiny_checkpoint.iterdir():
        (directory / file.name).write_bytes(file.read_bytes())
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["chat_template"] += "{% if add_generation_prompt %}<think>\n{% endif %}{# ends with </think> #}"
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = load_tokenizer(directory)
    markers = reasoning_markers(tokenizer, "auto")
    assert markers == TEXT_MARKERS
    prompt = tokenizer.encode_chat([{"role": "user", "content": "hi"}])
    assert markers.opened_by(tokenizer, prompt)  # the generation prompt opened it: the output starts inside
    assert markers.span(True) == ReasoningSpan(None, "</think>")


# -- constraints apply after the thinking ---------------------------------------------------------


@pytest.mark.parametrize("name", CONSTRAINTS)
@pytest.mark.parametrize("opened", [False, True], ids=["opens", "opened"])
def test_a_constraint_shapes_the_answer_after_the_thinking(v13: Tokenizer, name: str, opened: bool) -> None:
    """The thinking (free text, even text that looks like JSON or the end marker spelled as text)
    is taken, then the answer is held to the constraint: random walks under the mask complete it."""
    ll = grammar_tokenizer(v13, v13.vocab_size)
    shape = constraint_of(name, v13)
    constraint = Constraint(shape.kind, shape.text, shape.choices, reasoning=MARKERS.span(opened))
    check_constraint(constraint)
    thinking = [*v13.encode_exact('{"not": "the answer"} [/THINK] as text '), 26]
    prefix = thinking if opened else [25, *thinking]
    answer_only = Constraint(shape.kind, shape.text, shape.choices)
    direct = LLMatcher(ll, grammar_text(constraint), log_level=0)
    if not opened:  # thinking is optional when the output may open it: the answer alone is fine too
        tokens, _ = walk(ll, answer_only, 0)
        assert all(direct.consume_token(t) for t in tokens), direct.get_error()
    completed = [walk(ll, constraint, seed, prefix)[1] for seed in range(3)]
    assert any(completed) or name == "json_object"


def test_text_markers_end_at_the_first_end_marker(v13: Tokenizer) -> None:
    ll = grammar_tokenizer(v13, v13.vocab_size)
    constraint = Constraint(ConstraintKind.CHOICE, choices=("oui", "non"), reasoning=TEXT_MARKERS.span(False))
    for text, ok in [("<think>a</thinking> b</think>oui", True), ("<think>a</think></think>oui", False),
                     ("non", True), ("<think>a</think>peut-être", False)]:  # fmt: skip
        matcher = LLMatcher(ll, grammar_text(constraint), log_level=0)
        accepted = all(matcher.consume_token(t) for t in v13.encode_exact(text))
        assert (accepted and matcher.is_stopped()) == ok, text


# -- a served reasoning model ---------------------------------------------------------------------


def programmed_checkpoint(root: Path) -> tuple[Path, list[int]]:
    """A v13 Tekken checkpoint whose greedy output after the chat prompt is the chain
    ``[THINK] THINKING [/THINK] ANSWER </s>``; returns it and the chain's tokens."""
    directory = root / "magistral-tiny"
    spec = TinySpec("programmed", heads=4, kv_heads=2, vocab=131072)
    hf = build_hf_model(spec)
    from model.loader import load_model
    from tests.hf_reference import save_hf_model

    config = load_model(save_hf_model(hf, root / "hf")).config
    tokenizer_dir = root / "tokenizer"
    tokenizer_dir.mkdir()
    (tokenizer_dir / "params.json").write_text("{}")
    write_tekken(TEKKEN, "v13", tokenizer_dir / "tekken.json")
    tokenizer = load_tokenizer(tokenizer_dir)
    prompt = tokenizer.encode_chat(MESSAGES)
    think, end = tokenizer.special_id("[THINK]"), tokenizer.special_id("[/THINK]")
    assert think is not None and end is not None
    chain = [prompt[-1], think, *tokenizer.encode_exact(THINKING), end, *tokenizer.encode_exact(ANSWER)]
    eos = tokenizer.special.eos_ids[0]
    assert len(set(chain)) == len(chain) < spec.hidden and eos not in chain, "each token of the chain once"
    with torch.no_grad():
        for parameter in hf.parameters():
            parameter.zero_()
        for name, parameter in hf.named_parameters():
            if name.endswith("norm.weight"):
                parameter.fill_(1.0)
        embed, head = hf.model.embed_tokens.weight, hf.lm_head.weight
        for i, token in enumerate(chain):
            embed[token, i] = 1.0
            head[chain[i + 1] if i + 1 < len(chain) else eos, i] = 10.0
    write_mistral(hf_state(hf), config, directory)
    (directory / "tekken.json").write_bytes((tokenizer_dir / "tekken.json").read_bytes())
    return directory, chain[1:]


@pytest.fixture(scope="module")
def reasoning_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    directory, _ = programmed_checkpoint(tmp_path_factory.mktemp("programmed"))
    server = ServerProcess(directory, "--served-model-name", "magistral-tiny")
    try:
        server.wait_serving()
        yield server
    finally:
        server.close()


def sdk(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="none", max_retries=0)


@pytest.mark.parametrize("shape", ["free", "json_schema"])
def test_reasoning_content_and_content_streamed_and_whole(reasoning_server: ServerProcess, shape: str) -> None:
    client = sdk(reasoning_server)
    kwargs: dict[str, Any] = {"model": "magistral-tiny", "messages": MESSAGES, "temperature": 0, "max_tokens": 64}
    if shape == "json_schema":
        kwargs["response_format"] = {"type": "json_schema", "json_schema": {"name": "a", "schema": ANSWER_SCHEMA}}
    whole = client.chat.completions.create(**kwargs).choices[0]
    assert (whole.message.model_extra or {})["reasoning_content"] == THINKING
    assert whole.message.content == ANSWER and whole.finish_reason == "stop"
    jsonschema.validate(json.loads(whole.message.content), ANSWER_SCHEMA)
    reasoning, content = "", ""
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            reasoning += (choice.delta.model_extra or {}).get("reasoning_content") or ""
            content += choice.delta.content or ""
    assert (reasoning, content) == (THINKING, ANSWER)


def test_reasoning_on_grpc_and_workers_ai(reasoning_server: ServerProcess) -> None:
    messages = pb.ChatMessages(messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in MESSAGES])
    request = pb.GenerateStreamRequest(messages=messages, sampling=pb.SamplingOptions(temperature=0))
    with reasoning_server.channel() as channel:
        stub = reasoning_server.stub(channel)
        streamed = list(stub.GenerateStream(request, timeout=60))
        whole = stub.Generate(pb.GenerateRequest(messages=messages, sampling=pb.SamplingOptions(temperature=0)),
                              timeout=60)  # fmt: skip
        plain = stub.Generate(pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[1, 5, 6]),
                                                 stopping=pb.StoppingOptions(max_tokens=4)), timeout=60)  # fmt: skip
    assert "".join(r.reasoning for r in streamed) == THINKING and "".join(r.text for r in streamed) == ANSWER
    assert (whole.completions[0].reasoning, whole.completions[0].text) == (THINKING, ANSWER)
    assert plain.completions[0].reasoning == ""  # prompts (not chat) are not split
    reply = http_request(reasoning_server.http_url, "/ai/run/magistral-tiny", {"messages": MESSAGES, "temperature": 0})
    assert reply.status == 200 and reply.json()["result"] == {"response": ANSWER, "reasoning": THINKING}


def test_reasoning_none_leaves_the_thinking_in_the_answer(tmp_path: Path) -> None:
    directory, _ = programmed_checkpoint(tmp_path)
    server = ServerProcess(directory, "--reasoning-parser", "none", "--served-model-name", "magistral-tiny")
    try:
        server.wait_serving()
        message = sdk(server).chat.completions.create(model="magistral-tiny", messages=MESSAGES, temperature=0,
                                                      max_tokens=64).choices[0].message  # fmt: skip
    finally:
        server.close()
    assert message.content == THINKING + ANSWER  # the markers are special tokens: dropped from the text
    assert "reasoning_content" not in (message.model_extra or {})


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("bogus", "argument --reasoning-parser: invalid choice: 'bogus' (choose from 'none', 'auto', 'think')"),
        ("think", "--reasoning-parser think: this model's tokenizer has no think markers"),
    ],
)
def test_bad_reasoning_parser_is_one_line_and_exit_2(value: str, fragment: str, tiny_checkpoint: Path) -> None:
    script = Path(sys.executable).parent / "mistral-serve"
    command = [str(script), "serve", "--model", str(tiny_checkpoint), "--port", "0", "--http-port", "0",
               "--metrics-port", "0", "--reasoning-parser", value]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    error_lines = [line for line in (result.stderr + result.stdout).splitlines() if "error" in line.lower()]
    assert len(error_lines) == 1 and fragment in error_lines[0], result.stderr + result.stdout
    assert "choose from" in error_lines[0] and "none" in error_lines[0] and "auto" in error_lines[0]
    assert "Traceback" not in result.stderr
