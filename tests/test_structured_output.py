"""Structured output below the server: constraint checks, the sampler's bitmask, the engine's
matchers (parallel samples, preemption, compile off the engine thread), tool-call parsing."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
from mistralserve.v1 import generation_pb2 as pb

from model.sampler import Sampler, SamplingRow
from scheduler.request import MAX_CONSTRAINT_BYTES, Constraint, ConstraintKind, RequestOutput, SamplingParams
from scheduler.structured import Compiled, GrammarCompiler, check_constraint
from server.invalid import InvalidRequest
from server.runtime import RuntimeOptions, build_runtime
from server.tool_calls import CallFormat, CallParser, CallStyle
from server.validation import Parsed, constraint, deserializer
from tests.engine_harness import run

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Z][a-z]{1,9}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


# -- constraints: form and compilation ------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": ConstraintKind.CHOICE, "choices": ()}, "choice must be a non-empty list of strings, got []"),
        ({"kind": ConstraintKind.CHOICE, "choices": ("a", "")}, "choice must hold non-empty strings"),
        ({"kind": ConstraintKind.REGEX, "text": "  "}, "regex must be a non-empty string"),
        ({"kind": ConstraintKind.GRAMMAR, "text": ""}, "grammar must be a non-empty string"),
        (
            {"kind": ConstraintKind.JSON_SCHEMA, "text": "x" * (MAX_CONSTRAINT_BYTES + 1)},
            f"json_schema must be at most {MAX_CONSTRAINT_BYTES} bytes, got {MAX_CONSTRAINT_BYTES + 1}",
        ),
    ],
    ids=["empty_choice", "empty_string_choice", "blank_regex", "empty_grammar", "too_big"],
)
def test_constraint_form_is_checked(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as error:
        Constraint(**kwargs)
    assert str(error.value).startswith(message)


@pytest.mark.parametrize(
    ("constraint_", "reason"),
    [
        (Constraint(ConstraintKind.JSON_SCHEMA, '{"type": "strin"}'), "json_schema: Invalid type: strin"),
        (Constraint(ConstraintKind.JSON_SCHEMA, "{not json"), "json_schema: not valid JSON"),
        (Constraint(ConstraintKind.JSON_SCHEMA, "[1, 2]"), "json_schema: must be a JSON object or boolean, got list"),
        (
            Constraint(ConstraintKind.JSON_SCHEMA, '{"properties": {"a": {"$ref": "#/nope"}}}'),
            "json_schema: Pointer '/nope' does not exist",
        ),
        (Constraint(ConstraintKind.REGEX, "a(b"), "regex: "),
        (Constraint(ConstraintKind.GRAMMAR, "start: missing_rule"), "grammar: "),
        (Constraint(ConstraintKind.GRAMMAR, "root ::= [0-9"), "grammar: "),
    ],
    ids=["bad_type", "not_json", "not_object", "bad_ref", "regex", "lark", "gbnf"],
)
def test_bad_constraints_name_the_field_and_the_library_reason(constraint_: Constraint, reason: str) -> None:
    with pytest.raises(ValueError) as error:
        check_constraint(constraint_)
    assert str(error.value).startswith(reason)
    if constraint_.kind == ConstraintKind.REGEX:
        assert "unclosed group" in str(error.value)
    if constraint_.text == "start: missing_rule":
        assert 'unknown name: "missing_rule"' in str(error.value)


@pytest.mark.parametrize(
    "constraint_",
    [
        Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(PERSON)),
        Constraint(ConstraintKind.JSON_OBJECT),
        Constraint(ConstraintKind.REGEX, r"\d{3}-[a-z]+"),
        Constraint(ConstraintKind.CHOICE, choices=('say "hi"', "back\\slash", "new\nline", "émoji 🎉")),
        Constraint(ConstraintKind.GRAMMAR, 'start: NUM ("+" NUM)*\nNUM: /[0-9]+/'),
        Constraint(ConstraintKind.GRAMMAR, 'root ::= num ("+" num)*\nnum ::= [0-9]+'),
    ],
    ids=["schema", "object", "regex", "choice", "lark", "gbnf"],
)
def test_good_constraints_pass(constraint_: Constraint) -> None:
    check_constraint(constraint_)


def request_bytes(**fields: Any) -> bytes:
    return pb.GenerateRequest(prompt="x", **fields).SerializeToString()


def test_two_constraints_on_the_wire_are_refused() -> None:
    raw = request_bytes(regex="a+") + request_bytes(choice=pb.Choices(values=["a"]))
    parsed = deserializer(pb.GenerateRequest)(raw)
    assert parsed.constraint_fields == 2
    assert parsed.message.WhichOneof("constraint") == "choice"  # protobuf keeps the last one silently
    with pytest.raises(InvalidRequest) as error:
        constraint(parsed.message, parsed.constraint_fields)
    assert (
        str(error.value) == "constraint: give at most one of json_schema, json_object, regex, choice, grammar (got 2)"
    )


def test_one_constraint_becomes_the_engines() -> None:
    parsed = deserializer(pb.GenerateRequest)(request_bytes(choice=pb.Choices(values=["yes", "no"])))
    assert isinstance(parsed, Parsed) and parsed.constraint_fields == 1
    assert constraint(parsed.message, 1) == Constraint(ConstraintKind.CHOICE, choices=("yes", "no"))
    plain = deserializer(pb.GenerateRequest)(request_bytes())
    assert constraint(plain.message, plain.constraint_fields) is None


# -- the sampler's bitmask ---------------------------------------------------------------------


def bitmask_of(allowed: list[set[int]], vocab: int) -> torch.Tensor:
    words = (vocab + 31) // 32
    mask = torch.zeros(len(allowed), words, dtype=torch.int64)
    for row, tokens in enumerate(allowed):
        for t in tokens:
            mask[row, t // 32] |= 1 << (t % 32)
    return mask.to(torch.int32)  # wraps bit 31 to the sign bit, as llguidance writes it


def test_bitmask_masks_only_the_constrained_rows() -> None:
    vocab = 100
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(0))
    sampler = Sampler(torch.Generator().manual_seed(1))
    greedy = [SamplingRow(temperature=0.0)] * 4
    free = sampler.sample(logits, greedy)
    allowed = [{3, 31, 63, 99}, {0, 32, 95}]
    masked = sampler.sample(logits, greedy, constrained=[1, 3], bitmask=bitmask_of(allowed, vocab))
    assert masked[0].token_id == free[0].token_id and masked[2].token_id == free[2].token_id
    for row, tokens in zip((1, 3), allowed, strict=True):
        best = max(tokens, key=lambda t: logits[row, t].item())
        assert masked[row].token_id == best
    sampled = [SamplingRow(temperature=1.5)] * 4
    seen: set[int] = set()
    for _ in range(200):
        choice = sampler.sample(logits, sampled, constrained=[1], bitmask=bitmask_of([allowed[0]], vocab))[1]
        seen.add(choice.token_id)
    assert seen == allowed[0]  # every allowed token drawn at temperature 1.5, nothing else


# -- the engine -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runtime(default_model_path: Path) -> Any:
    """The default model with a 48-block pool: n = 4 samples of a long prompt must preempt."""
    return build_runtime(RuntimeOptions(default_model_path, kv_cache_memory=48 * 368640, max_num_seqs=16))


def test_parallel_samples_and_preemption_keep_every_sample_valid(runtime: Any) -> None:
    tokenizer = runtime.tokenizer
    schema = json.dumps(PERSON)
    requests = []
    for i in range(4):
        prompt = tokenizer.encode_chat(
            [{"role": "user", "content": f"Request {i}: " + "describe a person as JSON. " * 20}]
        )
        params = SamplingParams(
            temperature=0.9, seed=100 + i, n=4, max_tokens=120,
            constraint=Constraint(ConstraintKind.JSON_SCHEMA, schema),
        )  # fmt: skip
        requests.append(runtime.request(f"r{i}", prompt, params))
    preempted_before = runtime.engine.scheduler.num_preemptions
    results = run(runtime.engine, requests)
    assert runtime.engine.scheduler.num_preemptions > preempted_before
    for request_id, result in results.items():
        for index in range(4):
            text = result.text(index)
            assert result.final(index).finish_reason == "stop", (request_id, index, text)
            jsonschema.validate(json.loads(text), PERSON)
    texts = {results[r].text(i) for r in results for i in range(4)}
    assert len(texts) > 4  # the samples differ: each advanced its own matcher
    assert runtime.blocks.num_free_blocks == runtime.blocks.num_blocks


class Collect:
    def __init__(self) -> None:
        self.outputs: list[RequestOutput] = []

    def put(self, output: RequestOutput) -> None:
        self.outputs.append(output)

    @property
    def finished(self) -> bool:
        return bool(self.outputs) and self.outputs[-1].finished


def test_a_slow_grammar_does_not_stall_other_requests(runtime: Any) -> None:
    """While one request's grammar compiles (held here), another request runs to its end."""
    release = threading.Event()
    compiler: GrammarCompiler = runtime.engine.grammars
    build = compiler._build

    def slow_build(c: Constraint) -> Compiled:
        release.wait(30)
        return build(c)

    compiler._build = slow_build  # type: ignore[method-assign,assignment]
    engine = runtime.engine
    tokenizer = runtime.tokenizer
    try:
        held = runtime.request(
            "held", tokenizer.encode("Pick:"),
            SamplingParams(temperature=0.0, max_tokens=8, constraint=Constraint(ConstraintKind.REGEX, "[a-z]{1,6}!")),
        )  # fmt: skip
        free = runtime.request(
            "free", tokenizer.encode("Once upon a time"), SamplingParams(temperature=0, max_tokens=6)
        )
        held_out, free_out = Collect(), Collect()
        engine.submit(held, held_out)
        engine.submit(free, free_out)
        deadline = time.monotonic() + 60
        while not free_out.finished and time.monotonic() < deadline:
            engine.step()
        assert free_out.finished and not held_out.finished and not held_out.outputs
        assert sum(len(o.token_ids) for o in free_out.outputs) == 6
        release.set()
        while not held_out.finished and time.monotonic() < deadline:
            engine.step()
        text = "".join(o.text for o in held_out.outputs)
        assert held_out.outputs[-1].finish_reason == "stop"
        assert re.fullmatch("[a-z]{1,6}!", text), text
    finally:
        release.set()
        compiler._build = build  # type: ignore[method-assign]


# -- tool calls read back from the output ----------------------------------------------------

NAMES = frozenset({"get_weather", "add"})
JSON_STYLE = CallStyle(CallFormat.JSON)


def unparsed(failures: list[str]) -> Callable[[str, str], None]:
    return lambda why, text: failures.append(text)


def test_forced_calls_stream_one_call_per_complete_object() -> None:
    stream = CallParser(JSON_STYLE, NAMES, forced=True, on_failure=unparsed([]))
    pieces = [
        '[{"name": "get_weather", "argu',
        'ments": {"city": "Par',
        'is"}}, {"name": "add", ',
        '"arguments": {"a": 1}}]',
    ]
    got = [stream.feed(p) for p in pieces]
    assert [len(calls) for _, calls in got] == [0, 0, 1, 1]
    assert all(content == "" for content, _ in got)
    assert got[2][1][0].name == "get_weather" and json.loads(got[2][1][0].arguments) == {"city": "Paris"}
    assert got[3][1][0].name == "add" and json.loads(got[3][1][0].arguments) == {"a": 1}
    assert stream.finish() == ("", [])


def test_auto_streams_text_at_once_and_holds_a_json_list_to_the_end() -> None:
    failures: list[str] = []
    text = CallParser(JSON_STYLE, NAMES, forced=False, on_failure=unparsed(failures))
    assert text.feed("  ") == ("", [])
    assert text.feed("Hello") == ("  Hello", [])
    assert text.feed(" there") == (" there", [])
    calls = CallParser(JSON_STYLE, NAMES, forced=False, on_failure=unparsed(failures))
    assert calls.feed(' [{"name": "add", ') == ("", [])
    assert calls.feed('"arguments": {"a": 2}}]') == ("", [])
    content, found = calls.finish()
    assert content == "" and [(c.name, json.loads(c.arguments)) for c in found] == [("add", {"a": 2})]
    unknown = CallParser(JSON_STYLE, NAMES, forced=False, on_failure=unparsed(failures))
    assert unknown.feed('[{"name": "delete_all", "arguments": {}}]') == ("", [])
    assert unknown.finish() == ('[{"name": "delete_all", "arguments": {}}]', [])
    assert failures == []  # without a marker, JSON that is no call is content, not a failed call


def test_json_list_calls_are_only_calls_of_known_tools_with_object_arguments() -> None:
    def parse(text: str) -> list[tuple[str, dict[str, object]]] | str:
        parser = CallParser(JSON_STYLE, NAMES, forced=False, on_failure=unparsed([]))
        content, calls = parser.feed(text)
        more, late = parser.finish()
        return content + more if not calls + late else [(c.name, json.loads(c.arguments)) for c in calls + late]

    assert parse('{"name": "add", "arguments": {"a": 1}}') == [("add", {"a": 1})]
    assert parse('[{"name": "add", "arguments": "1"}]') == '[{"name": "add", "arguments": "1"}]'
    assert parse("[1, 2]") == "[1, 2]"
    assert parse("The weather is fine.") == "The weather is fine."
    parser = CallParser(JSON_STYLE, NAMES, forced=False, on_failure=unparsed([]))
    parser.feed('[{"name": "add", "arguments": {"a": 1}}]')
    [call] = parser.finish()[1]
    assert call.arguments == '{"a": 1}'
    assert re.fullmatch("[a-zA-Z0-9]{9}", call.id)  # Mistral's validator takes no other id back


# -- vocabularies as llguidance sees them ------------------------------------------------------


def test_every_tokenizer_kind_gives_llguidance_its_bytes(default_model_path: Path, tiny_checkpoint: Path) -> None:
    """GGUF byte-level BPE (read by llguidance itself), a character vocabulary with a Fuse decoder
    (spelled out), SentencePiece v3 (spelled out): the ids llguidance tokenizes text into spell
    exactly that text in its vocabulary's bytes (SentencePiece's dummy-prefix space is not added:
    ``{`` is the piece ``{``, not ``▁{``), and the vocabulary is padded to the model's size."""
    from server.grammar_vocab import grammar_tokenizer
    from server.tokenizer_loader import load_tokenizer
    from server.tokenizer_spm import SentencePieceTokenizer
    from tests.test_tokenizers import V3

    text = 'Hello world, été 🎉 {"a": [1, 2]}'
    for tokenizer, vocab_size in (
        (load_tokenizer(default_model_path), 49152),
        (load_tokenizer(tiny_checkpoint), 160),
        (SentencePieceTokenizer.from_file(str(V3)), 32768),
    ):
        ll = grammar_tokenizer(tokenizer, vocab_size)
        assert ll.vocab_size == vocab_size
        sample = text if tokenizer.vocab_size > 200 else "hello world"
        ids = ll.tokenize_str(sample)
        assert ids == tokenizer.encode_exact(sample)
        assert ll.decode_bytes(ids) == sample.encode()
        assert tokenizer.decode(ids) == sample
        first = ll.tokenize_str("{")
        assert ll.decode_bytes(first) == b"{" and tokenizer.decode(first) == "{"
        assert list(ll.eos_tokens) == list(tokenizer.special.eos_ids)


def test_one_build_per_text_however_many_requests_wait_for_it(default_model_path: Path) -> None:
    """Requests for a text being built share that build (counted once); later ones hit the cache."""
    from server.grammar_vocab import grammar_tokenizer
    from server.tokenizer_loader import load_tokenizer

    tokenizer = load_tokenizer(default_model_path)
    release = threading.Event()
    builds: list[Constraint] = []
    compiler = GrammarCompiler(lambda: grammar_tokenizer(tokenizer, 49152))
    build = compiler._build

    def counted_build(c: Constraint) -> Compiled:
        builds.append(c)
        release.wait(30)
        return build(c)

    compiler._build = counted_build  # type: ignore[method-assign,assignment]
    regex = Constraint(ConstraintKind.REGEX, "[a-z]+")
    futures = [compiler.submit(regex) for _ in range(5)]
    assert not any(f.done() for f in futures)
    release.set()
    results = [f.result(timeout=30) for f in futures]
    assert builds == [regex]
    assert [r.cached for r in results] == [False, True, True, True, True]
    assert results[0].seconds > 0 and all(r.seconds == 0.0 for r in results[1:])
    assert compiler.submit(regex).result(timeout=5).cached
    bad = Constraint(ConstraintKind.GRAMMAR, "start: nowhere")
    failing = [compiler.submit(bad) for _ in range(3)]
    for future in failing:
        with pytest.raises(ValueError, match="grammar: "):
            future.result(timeout=30)
    assert compiler._building == {}
    compiler.shutdown()


# -- a matcher that breaks its promise ---------------------------------------------------------


def break_matcher(matcher: Any) -> None:
    """Put a real matcher in its error state: feed it a token it does not allow (EOS-less: 0)."""
    assert not matcher.consume_token(0) and matcher.is_error()


@pytest.mark.parametrize("when", ["refused", "empty_mask"])
def test_a_broken_matcher_ends_only_its_own_sample(runtime: Any, when: str) -> None:
    """A matcher that refuses the token its own mask allowed (broken between the mask and the
    draw), or whose mask allows nothing (broken before the step): that sample alone ends with
    finish reason error, the refusal is counted and logged with the request id and the token; the
    request's other sample finishes valid and an unconstrained request is not disturbed."""
    from structlog.testing import capture_logs

    from scheduler.output_stream import SyncOutputStream

    engine = runtime.engine
    tokenizer = runtime.tokenizer
    prompt = tokenizer.encode_chat([{"role": "user", "content": "Describe a person as JSON."}])
    params = SamplingParams(temperature=0.9, seed=7, n=2, max_tokens=120,
                            constraint=Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(PERSON)))  # fmt: skip
    plain = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    streams = {"bad": SyncOutputStream(2), "plain": SyncOutputStream(1)}
    engine.submit(runtime.request("bad", prompt, params), streams["bad"])
    engine.submit(runtime.request("plain", tokenizer.encode("Once upon a time"), plain), streams["plain"])
    before = engine.counters.structured_refused_tokens
    sample = engine.outputs.sampler.sample
    broken: list[str] = []
    seen: list[int] = []  # sampling steps since sample 1 was forked

    def sample_then_break(*args: Any, **kwargs: Any) -> Any:
        choices = sample(*args, **kwargs)
        matcher = engine.outputs.matchers.get("bad#1")
        if matcher is not None:
            seen.append(1)
        if when == "refused" and matcher is not None and not broken and len(seen) == 3:
            break_matcher(matcher)  # after this step's masks, before its tokens are consumed
            broken.append("bad#1")
        return choices

    engine.outputs.sampler.sample = sample_then_break
    try:
        with capture_logs() as logs:
            for _ in range(5000):
                if not (engine.scheduler.has_work or engine.has_work or engine.compiling):
                    break
                matcher = engine.outputs.matchers.get("bad#1")
                if when == "empty_mask" and matcher is not None and not broken and len(seen) == 3:
                    break_matcher(matcher)  # between steps: the next mask allows nothing
                    broken.append("bad#1")
                engine.step()
                if engine.compiling:
                    time.sleep(0.001)
    finally:
        engine.outputs.sampler.sample = sample
    outputs = {name: list(stream) for name, stream in streams.items()}
    by_sample = {i: [o for o in outputs["bad"] if o.index == i] for i in (0, 1)}
    assert broken == ["bad#1"]
    assert by_sample[1][-1].finish_reason == "error"
    assert "structured output refused token" in (by_sample[1][-1].error or "")
    assert by_sample[0][-1].finish_reason == "stop"
    jsonschema.validate(json.loads("".join(o.text for o in by_sample[0])), PERSON)
    assert outputs["plain"][-1].finish_reason == "length" and sum(len(o.token_ids) for o in outputs["plain"]) == 12
    assert engine.counters.structured_refused_tokens == before + 1
    [line] = [entry for entry in logs if entry["event"] == "structured output refused a token"]
    assert line["request_id"] == "bad" and line["sample"] == 1 and isinstance(line["token_id"], int)
    assert runtime.blocks.num_free_blocks == runtime.blocks.num_blocks
