"""Tool calls in the model's own format: which format a model writes, the constraint that forces
calls (``tool_choice`` required or a named function), and the parser that reads calls back out of
the answer as it streams. Shared by the HTTP and gRPC front-ends.

Formats (mistral-common's encoding of an assistant tool-call message is the reference):

- ``json``: a JSON list ``[{"name": ..., "arguments": {...}}]``, no marker token: what
  ``server.chat_template.TOOL_PROMPT`` and most templates teach (the default model).
- ``mistral_json`` (tokenizers v2 to v7: Mistral 7B v0.3, Mixtral, Nemo, Small 2409, Ministral):
  ``[TOOL_CALLS][{"name": "f", "arguments": {...}}, ...]``, an ``"id"`` key where the model writes one.
- ``mistral_args`` (v11 and later: Small 3.2, Magistral, Devstral):
  ``[TOOL_CALLS]f[ARGS]{...}[TOOL_CALLS]g[ARGS]{...}``: each call repeats the marker, text may
  follow a call, nothing closes the last one; v11 may write ``[CALL_ID]abc123XYZ`` before ``[ARGS]``
  (mistral-common's v11 does where the call has an id; v13 never does).

The markers are special tokens: the engine keeps their text in the output (``marker_ids``) so
the parser can find them. A block that a marker announced but that does not parse (bad JSON, an
unknown function, no ``[ARGS]``) is never dropped: its text comes back as content, and
``on_failure`` logs and counts it.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from scheduler.request import Constraint, ConstraintKind
from scheduler.structured import JSON_OPTIONS, marker
from server.detokenizer import held_back
from server.tokenizer import Tokenizer

TOOL_CALLS, ARGS, CALL_ID = "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"
ID_ALPHABET = string.ascii_letters + string.digits
CALL_ID_PATTERN = re.compile(r"[a-zA-Z0-9]{9}")  # Mistral's validator takes no other on the next turn


def new_call_id() -> str:
    """9 alphanumeric characters, the only tool-call ids mistral-common accepts back."""
    return "".join(secrets.choice(ID_ALPHABET) for _ in range(9))


class CallFormat(StrEnum):
    JSON = "json"
    MISTRAL_JSON = "mistral_json"
    MISTRAL_ARGS = "mistral_args"


@dataclass(frozen=True)
class CallStyle:
    """How a model writes calls: the format and the ids of its marker tokens."""

    format: CallFormat
    calls_id: int | None = None  # [TOOL_CALLS]
    args_id: int | None = None  # [ARGS]
    call_id_id: int | None = None  # [CALL_ID], where the format writes call ids (v11)

    @property
    def marker_ids(self) -> tuple[int, ...]:
        """The special tokens whose text the output must keep for the parser."""
        return tuple(i for i in (self.calls_id, self.args_id, self.call_id_id) if i is not None)


def call_style(tokenizer: Tokenizer) -> CallStyle:
    """The format by the tokenizer's instruct version (mistral-common files), else by what its chat
    template writes; ``json`` for a vocabulary without ``[TOOL_CALLS]``."""
    calls = tokenizer.special_id(TOOL_CALLS)
    if calls is None:
        return CallStyle(CallFormat.JSON)
    version = tokenizer.instruct_version
    if version is not None:
        number = int(re.sub(r"\D.*", "", version.removeprefix("v")) or 0)
        args_format, writes_ids = number >= 11, number == 11
    else:
        source = tokenizer.chat_template.source if tokenizer.chat_template is not None else ""
        args_format, writes_ids = ARGS in source, CALL_ID in source
    args = tokenizer.special_id(ARGS)
    if not args_format or args is None:
        return CallStyle(CallFormat.MISTRAL_JSON, calls)
    return CallStyle(CallFormat.MISTRAL_ARGS, calls, args, tokenizer.special_id(CALL_ID) if writes_ids else None)


@dataclass(frozen=True)
class ToolSpec:
    name: str
    parameters: dict[str, Any]


def calls_schema(specs: Sequence[ToolSpec], one: bool) -> dict[str, Any]:
    """The JSON schema of a list of calls of ``specs`` (exactly one call when ``one``)."""
    call = [
        {
            "type": "object",
            "properties": {"name": {"const": s.name}, "arguments": s.parameters},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for s in specs
    ]
    schema: dict[str, Any] = {"type": "array", "items": call[0] if len(call) == 1 else {"anyOf": call}, "minItems": 1}
    if one:
        schema["maxItems"] = 1
    return schema


def _json(schema: dict[str, Any]) -> str:
    """A Lark ``%json`` item generating compact JSON, as the other constraints do."""
    return "%json " + json.dumps({**schema, "x-guidance": JSON_OPTIONS})


def forced_calls(style: CallStyle, specs: Sequence[ToolSpec], one: bool) -> Constraint:
    """Calls of ``specs`` in the model's format: one or more, or exactly one when ``one``."""
    if style.format == CallFormat.JSON:
        lark = f"start: {_json(calls_schema(specs, one))}"
    elif style.format == CallFormat.MISTRAL_JSON:
        assert style.calls_id is not None
        lark = f"start: {marker(style.calls_id)} {_json(calls_schema(specs, one))}"
    else:
        assert style.calls_id is not None and style.args_id is not None
        call_id = "" if style.call_id_id is None else f" ({marker(style.call_id_id)} /[a-zA-Z0-9]{{9}}/)?"
        rules = [f"start: call{'' if one else '+'}", "call: " + " | ".join(f"f{i}" for i in range(len(specs)))]
        rules += [
            f"f{i}: {marker(style.calls_id)} {json.dumps(spec.name)}{call_id} {marker(style.args_id)} "
            f"{_json(spec.parameters)}"
            for i, spec in enumerate(specs)
        ]
        lark = "\n".join(rules)
    return Constraint(ConstraintKind.TOOL_CALLS, text=lark)


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text
    id: str = field(default_factory=new_call_id)


def _call(item: Any, names: frozenset[str], given_id: str | None = None) -> ToolCall | None:
    """A parsed call, or None when it names no known function or its arguments are no object."""
    if not isinstance(item, dict) or item.get("name") not in names:
        return None
    arguments = item.get("arguments", item.get("parameters", {}))
    if not isinstance(arguments, dict):
        return None
    call_id = given_id if given_id is not None else item.get("id")
    if not isinstance(call_id, str) or not CALL_ID_PATTERN.fullmatch(call_id):
        call_id = new_call_id()
    return ToolCall(item["name"], json.dumps(arguments, ensure_ascii=False), call_id)


class CallParser:
    """One sample's answer, split into content and tool calls as it streams.

    Content before a marker streams at once; a call is returned as soon as its JSON is complete.
    Without a marker (the ``json`` format), text that starts like a list of calls is held back:
    forced, it is calls; auto, it becomes calls at the end if it is a list of known calls, and
    content otherwise.
    """

    def __init__(
        self, style: CallStyle, names: frozenset[str], forced: bool, on_failure: Callable[[str, str], None]
    ) -> None:
        self.style = style
        self.names = names
        self.on_failure = on_failure
        self.text = ""  # the whole answer so far
        self.pos = 0  # text before this is decided: sent as content or parsed into calls
        self.block = 0  # where the unparsed block of calls that ``pos`` is in started (for failures)
        self.state = "list" if forced and style.format == CallFormat.JSON else "text"
        self.decoder = json.JSONDecoder()
        self.opened = False  # the list's "[" was read
        self.plain = False  # json format: the answer did not start like a list of calls
        self.pending: tuple[str, str | None] = ("", None)  # mistral_args: the call's name and id before [ARGS]

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        self.text += text
        return self._advance(final=False)

    def finish(self) -> tuple[str, list[ToolCall]]:
        """At the sample's end: what is still held back, as calls or content."""
        content, calls = self._advance(final=True)
        if self.state == "candidate":  # json format, auto: calls only if the whole text is calls
            parsed = self._json_list(self.text[self.pos :])
            content += self.text[self.pos :] if parsed is None else ""
            calls += parsed or []
        elif self.state in ("list", "name", "args") and self.text[self.pos :].strip():
            content += self._fail("the calls do not parse")
        self.pos = len(self.text)
        return content, calls

    # -- states ----------------------------------------------------------------------------

    def _advance(self, final: bool) -> tuple[str, list[ToolCall]]:
        content: list[str] = []
        calls: list[ToolCall] = []
        while True:
            before = (self.state, self.pos)
            if self.state == "text":
                content.append(self._text(final))
            elif self.state == "list":
                calls.extend(self._list())
            elif self.state == "name":
                self._name()
            elif self.state == "args":
                calls.extend(self._args())
            elif self.state == "failed":
                content.append(self._fail("the calls do not parse"))
            elif self.state == "content":  # after a failed block: the rest is content
                content.append(self.text[self.pos :])
                self.pos = len(self.text)
            if (self.state, self.pos) == before:
                return "".join(content), calls

    def _text(self, final: bool) -> str:
        rest = self.text[self.pos :]
        if self.style.format == CallFormat.JSON:
            head = rest.lstrip()
            if self.pos == 0 and not self.plain:
                if not head and not final:
                    return ""  # only whitespace so far: undecided
                if head.startswith(("[", "{")):
                    self.state = "candidate"
                    return ""
                self.plain = True
            self.pos = len(self.text)
            return rest
        index = rest.find(TOOL_CALLS)
        if index < 0:
            keep = 0 if final else held_back(rest, TOOL_CALLS)
            self.pos += len(rest) - keep
            return rest[: len(rest) - keep]
        self.block = self.pos + index
        self.pos += index + len(TOOL_CALLS)
        self.state = "list" if self.style.format == CallFormat.MISTRAL_JSON else "name"
        return rest[:index]

    def _skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def _list(self) -> list[ToolCall]:
        """``[{call}, {call}]`` (a bare ``{call}`` too); back to text after the ``]``."""
        calls: list[ToolCall] = []
        while True:
            self._skip_space()
            if self.pos >= len(self.text):
                return calls
            char = self.text[self.pos]
            if char == "[" and not self.opened:
                self.opened = True
                self.pos += 1
            elif char in ",]" and self.opened:
                self.pos += 1
                if char == "]":
                    self.state, self.opened = "text", False
                    return calls
            elif char == "{":
                try:
                    item, end = self.decoder.raw_decode(self.text, self.pos)
                except json.JSONDecodeError:
                    return calls  # incomplete (or broken: decided at the end)
                call = _call(item, self.names)
                if call is None:
                    self.state = "failed"
                    return calls
                calls.append(call)
                self.pos = self.block = end
                if not self.opened:  # a bare object: one call
                    self.state = "text"
                    return calls
            else:
                self.state = "failed"
                return calls

    def _name(self) -> None:
        """``name[ARGS]`` or ``name[CALL_ID]id[ARGS]``, then the arguments object."""
        rest = self.text[self.pos :]
        index = rest.find(ARGS)
        if index < 0:
            return
        name, _, call_id = rest[:index].partition(CALL_ID)
        self.pending = (name.strip(), call_id.strip() or None)
        self.pos += index + len(ARGS)
        self.state = "args"

    def _args(self) -> list[ToolCall]:
        self._skip_space()
        if self.pos >= len(self.text):
            return []
        try:
            item, end = self.decoder.raw_decode(self.text, self.pos)
        except json.JSONDecodeError:
            if self.text[self.pos] != "{":
                self.state = "failed"
            return []
        name, call_id = self.pending
        call = _call({"name": name, "arguments": item}, self.names, call_id)
        if call is None:
            self.state = "failed"
            return []
        self.pos = self.block = end
        self.state = "text"
        return [call]

    def _fail(self, why: str) -> str:
        """The failed block's text, from its marker on, as content; logged and counted."""
        text = self.text[self.block :]
        self.on_failure(why, text)
        self.state, self.pos, self.block = "content", len(self.text), len(self.text)
        return text

    def _json_list(self, text: str) -> list[ToolCall] | None:
        """The calls ``text`` holds, or None when it is not (only) a list of calls of known tools."""
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return None
        items = value if isinstance(value, list) else [value]
        calls = [_call(item, self.names) for item in items]
        if not calls or any(c is None for c in calls):
            return None
        return [c for c in calls if c is not None]
