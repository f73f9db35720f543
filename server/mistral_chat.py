"""Chat prompts of Mistral-layout tokenizers through mistral-common's ``encode_chat_completion``.

A Mistral checkpoint's tokenizer file names its instruct format: ``tekken.json``'s
``config.version``, or the suffix of ``tokenizer.model.v3`` / ``.v7`` (a bare ``tokenizer.model``
is v1). mistral-common implements each version's rules (where the system prompt goes, how tools,
tool calls and results are spelled, which control tokens exist), so prompts are its prompts rather
than a template's approximation of them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from model.config import CheckpointError


class MistralCommonChat:
    def __init__(self, path: Path) -> None:
        from mistral_common.exceptions import MistralCommonException
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

        try:
            self.mistral = MistralTokenizer.from_file(str(path))
        except (ValueError, KeyError, AssertionError, MistralCommonException) as exc:
            raise CheckpointError(f"{path}: not a tokenizer mistral-common can read ({exc})") from None
        self.tokenizer = self.mistral.instruct_tokenizer.tokenizer  # Tekkenizer or SentencePieceTokenizer
        self.version = str(self.tokenizer.version.value)  # "v3", "v7", "v11", "v13", ...

    def encode(
        self, messages: Sequence[Any], add_generation_prompt: bool = True, tools: Sequence[Any] | None = None
    ) -> list[int]:
        """OpenAI-shaped messages and tools -> prompt ids; mistral-common's validation errors
        (message order, roles, tool call ids) become ValueErrors."""
        from mistral_common.protocol.instruct.request import ChatCompletionRequest
        from pydantic import ValidationError

        turns = [_message(m) for m in messages]
        if not add_generation_prompt and turns and turns[-1].get("role") == "assistant":
            turns[-1]["prefix"] = True  # continue the final assistant message
        try:
            request = ChatCompletionRequest(messages=turns, tools=list(tools) if tools else None)
            return list(self.mistral.encode_chat_completion(request).tokens)
        except ValidationError as exc:
            raise ValueError(_first_error(exc)) from None
        except Exception as exc:  # mistral-common's own exceptions (InvalidMessageStructureException, ...)
            if type(exc).__module__.startswith("mistral_common"):
                raise ValueError(str(exc)) from None
            raise


def _message(message: Any) -> dict[str, Any]:
    """An OpenAI-shaped message as mistral-common takes it (tool call arguments as JSON text)."""
    out = dict(message)
    if out.get("tool_calls"):
        out["tool_calls"] = [
            {**call, "function": {**call["function"], "arguments": _arguments(call["function"].get("arguments"))}}
            for call in out["tool_calls"]
        ]
    if out.get("role") == "assistant" and not out.get("content"):
        out["content"] = None
    return out


def _arguments(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _first_error(exc: Any) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error.get("loc", ()))
    return f"{where}: {error.get('msg')}" if where else str(error.get("msg"))
