"""Structured output on every vocabulary kind the loaders accept (``tests.vocabularies``): random
walks under each constraint's mask, taking any token the mask allows, never meet a token the
matcher refuses or a mask that allows nothing, and the text the server would stream for them (the
incremental detokenizer) is exactly what the matcher consumed, valid against the constraint.

Before the vocabulary fix, SentencePiece kinds (v1/v3/v7, GGUF ``llama``, ``tokenizer.model``)
failed here at the first forced byte: llguidance tokenized ``{`` with the dummy prefix (``▁{``).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
from llguidance import LLMatcher, LLTokenizer

from scheduler.request import Constraint, ConstraintKind
from scheduler.structured import grammar_text
from server.detokenizer import IncrementalDetokenizer
from server.grammar_vocab import grammar_tokenizer
from server.tokenizer import Tokenizer
from server.tokenizer_loader import load_tokenizer
from server.tool_calls import CallParser, ToolSpec, call_style, forced_calls
from tests.test_structured_server import ARITHMETIC, evaluate
from tests.vocabularies import KINDS, write_vocabulary

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"},
    },
    "required": ["city", "n", "ok"],
    "additionalProperties": False,
}
REGEX = r"[A-Z][a-z]{2,8} (is|was) [0-9]{1,3}"
CHOICES = ("Paris", "Lyon", "Marseille", "Zürich")
WEATHER = ToolSpec("get_weather", {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"], "additionalProperties": False,
})  # fmt: skip
TIME = ToolSpec("get_time", {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 16}},
                             "required": ["tz"], "additionalProperties": False})  # fmt: skip
TOOLS = {spec.name: spec for spec in (WEATHER, TIME)}
CONSTRAINTS = ("json_schema", "json_object", "regex", "choice", "grammar", "tools_required", "tools_named")
STEPS = 80


@pytest.fixture(scope="module", params=KINDS)
def vocabulary(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, default_model_path: Path
) -> tuple[str, Tokenizer, LLTokenizer]:
    kind = str(request.param)
    tokenizer = load_tokenizer(write_vocabulary(kind, tmp_path_factory.mktemp(kind), default_model_path))
    return kind, tokenizer, grammar_tokenizer(tokenizer, tokenizer.vocab_size)


def constraint_of(name: str, tokenizer: Tokenizer) -> Constraint:
    if name == "json_schema":
        return Constraint(ConstraintKind.JSON_SCHEMA, text=json.dumps(SCHEMA))
    if name == "json_object":
        return Constraint(ConstraintKind.JSON_OBJECT)
    if name == "regex":
        return Constraint(ConstraintKind.REGEX, text=REGEX)
    if name == "choice":
        return Constraint(ConstraintKind.CHOICE, choices=CHOICES)
    if name == "grammar":
        return Constraint(ConstraintKind.GRAMMAR, text=ARITHMETIC)
    return forced_calls(call_style(tokenizer), [WEATHER, TIME], one=name == "tools_named")


def walk(ll: LLTokenizer, constraint: Constraint, seed: int, prefix: Sequence[int] = ()) -> tuple[list[int], bool]:
    """After ``prefix`` (which must be accepted), tokens drawn uniformly from each mask;
    (the drawn tokens, whether the grammar completed)."""
    matcher = LLMatcher(ll, grammar_text(constraint), log_level=0)
    assert all(matcher.consume_token(t) for t in prefix), matcher.get_error()
    rng = random.Random(seed)
    tokens: list[int] = []
    for _ in range(STEPS):
        if matcher.is_stopped():
            return tokens, True
        bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        allowed = np.flatnonzero(bits[: ll.vocab_size])
        assert len(allowed) > 0, f"a mask that allows nothing after {tokens}: {matcher.get_error()}"
        token = int(rng.choice(allowed))
        assert matcher.consume_token(token), f"token {token} allowed, then refused: {matcher.get_error()}"
        tokens.append(token)
    return tokens, matcher.is_stopped()


def streamed_text(tokenizer: Tokenizer, prompt: list[int], tokens: list[int], kept: tuple[int, ...]) -> str:
    """The text the server streams for these output tokens (EOS is not text)."""
    stream = IncrementalDetokenizer(tokenizer, prompt, kept=kept)
    text = "".join(stream.append(t).text for t in tokens if t not in tokenizer.special.eos_ids)
    return text + stream.flush()


def check(name: str, text: str) -> None:
    """``text`` is in the language of constraint ``name`` (each checked by its own parser)."""
    if name == "json_schema":
        jsonschema.validate(json.loads(text), SCHEMA)
    elif name == "json_object":
        assert isinstance(json.loads(text), dict), text
    elif name == "regex":
        assert re.fullmatch(REGEX, text), text
    elif name == "choice":
        assert text in CHOICES, text
    else:
        evaluate(text)


@pytest.mark.parametrize("name", CONSTRAINTS)
def test_random_walks_under_the_mask_are_accepted_and_valid(
    vocabulary: tuple[str, Tokenizer, LLTokenizer], name: str
) -> None:
    kind, tokenizer, ll = vocabulary
    constraint = constraint_of(name, tokenizer)
    prompt = tokenizer.encode_chat([{"role": "user", "content": "Réponds en JSON, s'il te plaît."}])
    completed = 0
    for seed in range(3):
        tokens, done = walk(ll, constraint, seed)
        style = call_style(tokenizer)
        text = streamed_text(tokenizer, prompt, tokens, style.marker_ids if name.startswith("tools") else ())
        if not done:
            continue
        completed += 1
        if name.startswith("tools"):
            parser = CallParser(style, frozenset({"get_weather", "get_time"}), True, failed)
            content, calls = parser.feed(text)
            more, late = parser.finish()
            assert content + more == "" and calls + late, (kind, text)
            for call in calls + late:
                jsonschema.validate(
                    json.loads(call.arguments), {"get_weather": WEATHER, "get_time": TIME}[call.name].parameters
                )
            assert name == "tools_required" or len(calls + late) == 1
        else:
            assert text.encode() == ll.decode_bytes([t for t in tokens if t not in tokenizer.special.eos_ids])
            check(name, text)
    assert completed > 0 or name == "json_object", f"{kind}: no walk completed {name} in {STEPS} tokens"


def failed(why: str, text: str) -> Any:
    raise AssertionError(f"tool calls did not parse ({why}): {text!r}")
