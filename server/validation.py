"""From a request message to what the engine takes, or a message naming the bad field.

Every ``InvalidRequest`` becomes INVALID_ARGUMENT; its text starts with the field's path
in the request (``sampling.top_p``, ``stopping.max_tokens``, ``messages[1].role``) and
says what is allowed.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from mistralserve.v1 import generation_pb2 as pb

from scheduler.request import Constraint, ConstraintKind, SamplingParams
from scheduler.structured import check_constraint
from server.chat_messages import chat_characters, chat_ids, chat_output
from server.chat_output import ChatOutputSpec
from server.invalid import InvalidRequest
from server.reasoning import ReasoningMarkers
from server.tokenizer import Tokenizer

INPUT_FIELD_NUMBERS = {1: "prompt", 2: "messages", 3: "prompt_token_ids"}
CONSTRAINT_FIELD_NUMBERS = {11: "json_schema", 12: "json_object", 13: "regex", 14: "choice", 15: "grammar"}
SAMPLING_FIELDS = (
    "temperature", "top_p", "top_k", "min_p", "seed", "repetition_penalty", "presence_penalty", "frequency_penalty",
)  # fmt: skip
MAX_REQUEST_ID = 256
TEXT_SLACK = 2
# SamplingParams field -> where it lives in the request
FIELD_PATHS = {
    **{name: f"sampling.{name}" for name in SAMPLING_FIELDS},
    **{name: f"stopping.{name}" for name in ("max_tokens", "min_tokens", "stop", "stop_token_ids")},
    "n": "n",
    "logprobs": "top_logprobs",
}  # fmt: skip

GenerationRequest = pb.GenerateRequest | pb.GenerateStreamRequest


@dataclass(frozen=True)
class Parsed:
    """A deserialized request, or why it could not be; with how many input and constraint fields
    the bytes held."""

    message: Any
    input_fields: int = 1
    error: str | None = None
    constraint_fields: int = 0


def count_oneof_fields(raw: bytes) -> tuple[int, int]:
    """Distinct oneof ``input`` and oneof ``constraint`` fields present on the wire (protobuf
    keeps only the last of each)."""
    seen: set[int] = set()
    pos = 0

    def varint() -> int:
        nonlocal pos
        shift = value = 0
        while True:
            byte = raw[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value

    try:
        while pos < len(raw):
            key = varint()
            number, wire = key >> 3, key & 7
            if number in INPUT_FIELD_NUMBERS or number in CONSTRAINT_FIELD_NUMBERS:
                seen.add(number)
            if wire == 0:
                varint()
            elif wire == 1:
                pos += 8
            elif wire == 2:
                length = varint()  # read first: `pos += varint()` would add to the old position
                pos += length
            elif wire == 5:
                pos += 4
            else:
                break
    except IndexError:
        pass
    return len(seen & INPUT_FIELD_NUMBERS.keys()), len(seen & CONSTRAINT_FIELD_NUMBERS.keys())


def deserializer(message_type: type[Any]) -> Any:
    """A request deserializer that never raises: garbage becomes ``Parsed(error=...)``."""

    def parse(raw: bytes) -> Parsed:
        message = message_type()
        try:
            message.ParseFromString(raw)
        except Exception:  # google.protobuf.message.DecodeError and friends
            return Parsed(None, 0, f"the request is not a valid {message_type.DESCRIPTOR.name} message")
        if not hasattr(message, "prompt"):
            return Parsed(message)
        inputs, constraints = count_oneof_fields(raw)
        return Parsed(message, inputs, constraint_fields=constraints)

    return parse


@dataclass(frozen=True)
class Prepared:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    priority: int
    chat: ChatOutputSpec | None = None  # chat with tools or on a reasoning model: how to read the output


def check_text_size(which: str, characters: int, tokenizer: Tokenizer, context: int) -> None:
    """Refuse, before tokenizing it, text that cannot fit: each token spells at most
    ``max_token_bytes`` bytes, so the tokens a text needs are at least its bytes over that (and
    its bytes at least its characters); TEXT_SLACK covers normalizers that shorten text."""
    limit = TEXT_SLACK * (context - 1) * tokenizer.max_token_bytes
    if characters > limit:
        raise InvalidRequest(
            f"{which}: {characters} characters cannot fit the context of {context - 1} tokens "
            f"(at most {limit} for this tokenizer)"
        )


def prompt_ids(request: Any, input_fields: int, tokenizer: Tokenizer, vocab_size: int, context: int) -> list[int]:
    which = request.WhichOneof("input")
    if input_fields > 1 or which is None:
        got = "several" if input_fields > 1 else "none"
        raise InvalidRequest(f"input: give exactly one of prompt, messages, prompt_token_ids (got {got})")
    if which == "prompt":
        if not request.prompt:
            raise InvalidRequest("prompt: must not be empty")
        check_text_size("prompt", len(request.prompt), tokenizer, context)
        ids = tokenizer.encode(request.prompt)
    elif which == "messages":
        check_text_size("messages", chat_characters(request.messages), tokenizer, context)
        ids = chat_ids(request.messages, tokenizer)
    else:
        ids = list(request.prompt_token_ids.ids)
        if not ids:
            raise InvalidRequest("prompt_token_ids: must not be empty")
        bad = next((i for i in ids if i >= vocab_size), None)
        if bad is not None:
            raise InvalidRequest(f"prompt_token_ids: {bad} is outside the vocabulary [0, {vocab_size})")
    if not ids:
        raise InvalidRequest(f"{which}: encodes to no tokens")
    if len(ids) >= context:
        raise InvalidRequest(f"{which}: {len(ids)} tokens; the context allows at most {context - 1}")
    return ids


def constraint(request: Any, constraint_fields: int) -> Constraint | None:
    """The request's structured-output constraint, checked by the grammar library."""
    if constraint_fields > 1:
        names = ", ".join(CONSTRAINT_FIELD_NUMBERS.values())
        raise InvalidRequest(f"constraint: give at most one of {names} (got {constraint_fields})")
    which = request.WhichOneof("constraint")
    if which is None:
        return None
    kind = ConstraintKind(which)
    try:
        if kind == ConstraintKind.CHOICE:
            result = Constraint(kind, choices=tuple(request.choice.values))
        elif kind == ConstraintKind.JSON_OBJECT:
            result = Constraint(kind)
        else:
            result = Constraint(kind, text=getattr(request, which))
    except ValueError as exc:  # "choice must be ..." -> "choice: must be ..."
        name, _, rest = str(exc).partition(" ")
        raise InvalidRequest(f"{name}: {rest}") from None
    try:
        check_constraint(result)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    return result


def sampling_params(
    request: Any,
    room: int,
    default_max_tokens: int,
    output_constraint: Constraint | None = None,
    kept_special_ids: tuple[int, ...] = (),
) -> SamplingParams:
    """The request's sampling and stopping; an unset max_tokens is ``default_max_tokens``, capped by
    ``room`` (the context left after the prompt), where a set one above ``room`` is an error."""
    sampling, stopping = request.sampling, request.stopping

    def opt(message: Any, name: str) -> Any:
        return getattr(message, name) if message.HasField(name) else None

    values: dict[str, Any] = {name: value for name in SAMPLING_FIELDS if (value := opt(sampling, name)) is not None}
    top_logprobs = opt(request, "top_logprobs")
    logprobs = (top_logprobs or 0) if request.logprobs or top_logprobs else None
    values.update(
        max_tokens=opt(stopping, "max_tokens"),
        min_tokens=stopping.min_tokens,
        stop=tuple(stopping.stop),
        stop_token_ids=tuple(stopping.stop_token_ids),
        ignore_eos=stopping.ignore_eos,
        include_stop_str_in_output=stopping.include_stop_str_in_output,
        n=opt(request, "n") if request.HasField("n") else 1,
        logprobs=logprobs,
        constraint=output_constraint,
        kept_special_ids=kept_special_ids,
    )
    if values["max_tokens"] is None:
        values["max_tokens"] = max(1, min(max(default_max_tokens, stopping.min_tokens), room))
    try:
        params = SamplingParams(**values)
    except ValueError as exc:
        name = str(exc).split(" ", 1)[0]
        raise InvalidRequest(f"{FIELD_PATHS.get(name, name)}: {str(exc).split(' ', 1)[1]}") from None
    if params.max_tokens is not None and params.max_tokens > room:
        raise InvalidRequest(
            f"stopping.max_tokens: must be <= {room} (the context left after the prompt), got {params.max_tokens}"
        )
    return params


def prepare(
    parsed: Parsed,
    tokenizer: Tokenizer,
    vocab_size: int,
    context: int,
    default_max_tokens: int,
    reasoning: ReasoningMarkers | None = None,
) -> Prepared:
    """``reasoning``: the markers of ``--reasoning-parser`` (chat requests only are split by them)."""
    if parsed.error is not None:
        raise InvalidRequest(parsed.error)
    request = parsed.message
    if len(request.request_id) > MAX_REQUEST_ID:
        raise InvalidRequest(f"request_id: at most {MAX_REQUEST_ID} characters, got {len(request.request_id)}")
    ids = prompt_ids(request, parsed.input_fields, tokenizer, vocab_size, context)
    output_constraint = constraint(request, parsed.constraint_fields)
    chat = None
    if request.WhichOneof("input") == "messages":
        chat, output_constraint = chat_output(request.messages, tokenizer, ids, output_constraint, reasoning)
    kept = chat.kept_ids if chat is not None else ()
    params = sampling_params(request, context - len(ids), default_max_tokens, output_constraint, kept)
    return Prepared(request.request_id or uuid.uuid4().hex, ids, params, request.priority, chat)
