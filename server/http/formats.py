"""Answers in OpenAI's and Workers AI's shapes: whole responses, server-sent-event chunks, errors."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from scheduler.request import FinishReason, RequestOutput, TokenLogprobs
from server.frontend import Collected, Completion
from server.http.requests import HttpRequest
from server.http.tools import CallStream, ToolCall
from server.tokenizer import Tokenizer

FINISH = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length", FinishReason.ABORT: "abort"}
DONE = b"data: [DONE]\n\n"


def event(payload: Any) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


# HTTP status -> OpenAI's error type and code
ERROR_KINDS = {
    400: ("invalid_request_error", "invalid_value"),
    401: ("authentication_error", "invalid_api_key"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "unsupported_media_type"),
    429: ("rate_limit_error", "queue_full"),
    500: ("server_error", "internal_error"),
    503: ("service_unavailable", "unavailable"),
}


def openai_error(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    kind, default_code = ERROR_KINDS.get(status, ("server_error", "error"))
    return {"error": {"message": message, "type": kind, "param": param, "code": code or default_code}}


def workers_ai_error(status: int, message: str) -> dict[str, Any]:
    return {"result": None, "success": False, "errors": [{"code": status, "message": message}], "messages": []}


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def add(self, output: RequestOutput) -> None:
        if output.usage is not None:
            self.prompt_tokens = output.usage.prompt_tokens
            self.cached_tokens = output.usage.cached_tokens
            self.completion_tokens += output.usage.completion_tokens

    def json(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


class Format:
    """How one route writes a generation: stream chunks, the stream's end, a whole response, errors."""

    media_type = "application/json"

    def __init__(self, request: HttpRequest, request_id: str, model: str, tokenizer: Tokenizer) -> None:
        self.request = request
        self.request_id = request_id
        self.model = model
        self.tokenizer = tokenizer
        self.created = int(time.time())
        self.usage = Usage()

    def chunks(self, output: RequestOutput) -> list[bytes]:
        raise NotImplementedError

    def end(self) -> list[bytes]:
        return [DONE]

    def whole(self, collected: Collected) -> dict[str, Any]:
        raise NotImplementedError

    def error(self, status: int, message: str, param: str | None = None) -> dict[str, Any]:
        return openai_error(status, message, param)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


def finish(reason: FinishReason | None) -> str | None:
    return None if reason is None else FINISH.get(reason, "error")


class OpenAIFormat(Format):
    """What OpenAI's completions and chat answers share: the envelope, usage, the stream's end."""

    id_prefix = ""
    whole_object = ""
    chunk_object = ""

    def choice(self, output: RequestOutput) -> dict[str, Any]:
        raise NotImplementedError

    def whole_choice(self, completion: Completion) -> dict[str, Any]:
        raise NotImplementedError

    def _envelope(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": f"{self.id_prefix}{self.request_id}",
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def chunks(self, output: RequestOutput) -> list[bytes]:
        self.usage.add(output)
        chunk = self._envelope(self.chunk_object, [self.choice(output)])
        if self.request.include_usage:
            chunk["usage"] = None
        return [event(chunk)]

    def end(self) -> list[bytes]:
        if not self.request.include_usage:
            return [DONE]
        return [event({**self._envelope(self.chunk_object, []), "usage": self.usage.json()}), DONE]

    def whole(self, collected: Collected) -> dict[str, Any]:
        usage = Usage(collected.prompt_tokens, collected.completion_tokens, collected.cached_tokens)
        choices = [self.whole_choice(c) for c in collected.completions]
        return {**self._envelope(self.whole_object, choices), "usage": usage.json()}


class CompletionFormat(OpenAIFormat):
    """``/v1/completions``."""

    id_prefix, whole_object, chunk_object = "cmpl-", "text_completion", "text_completion"

    def __init__(self, request: HttpRequest, request_id: str, model: str, tokenizer: Tokenizer) -> None:
        super().__init__(request, request_id, model, tokenizer)
        self.offsets: dict[int, int] = {}  # logprobs' text_offset: where each sample's next token starts

    def _logprobs(self, index: int, entries: Sequence[TokenLogprobs]) -> Any:
        if not self.request.request.logprobs:
            return None
        tokens, chosen, tops, offsets = [], [], [], []
        offset = self.offsets.get(index, 0)
        for entry in entries:
            text = self.token_text(entry.chosen.token_id)
            tokens.append(text)
            chosen.append(entry.chosen.logprob)
            tops.append({self.token_text(t.token_id): t.logprob for t in entry.top} or None)
            offsets.append(offset)
            offset += len(text)
        self.offsets[index] = offset
        return {"tokens": tokens, "token_logprobs": chosen, "top_logprobs": tops, "text_offset": offsets}

    def _choice(
        self, index: int, text: str, entries: Sequence[TokenLogprobs], reason: FinishReason | None, stop: Any
    ) -> dict[str, Any]:
        logprobs = self._logprobs(index, entries)
        return {
            "index": index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": finish(reason),
            "stop_reason": stop,
        }

    def choice(self, output: RequestOutput) -> dict[str, Any]:
        return self._choice(output.index, output.text, output.logprobs, output.finish_reason, output.stop_reason)

    def whole_choice(self, c: Completion) -> dict[str, Any]:
        return self._choice(c.index, c.text, c.logprobs, c.finish_reason, c.stop_reason)


class ChatFormat(OpenAIFormat):
    """``/v1/chat/completions``."""

    id_prefix, whole_object, chunk_object = "chatcmpl-", "chat.completion", "chat.completion.chunk"

    def __init__(self, request: HttpRequest, request_id: str, model: str, tokenizer: Tokenizer) -> None:
        super().__init__(request, request_id, model, tokenizer)
        self.started: set[int] = set()
        self.calls: dict[int, CallStream] = {}  # with tools: each sample's output read as tool calls
        self.num_calls: dict[int, int] = {}  # tool calls sent per sample

    def _token(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    def _logprobs(self, entries: Sequence[TokenLogprobs]) -> Any:
        if not self.request.logprobs:
            return None
        content = []
        for entry in entries:
            item = self._token(entry.chosen.token_id, entry.chosen.logprob)
            item["top_logprobs"] = [self._token(t.token_id, t.logprob) for t in entry.top]
            content.append(item)
        return {"content": content}

    def _split(self, index: int, text: str, last: bool) -> tuple[str, list[ToolCall]]:
        """Content and tool calls of a sample's new text (all of it is content without tools)."""
        choice = self.request.tool_choice
        if choice is None:
            return text, []
        stream = self.calls.setdefault(index, CallStream(choice))
        content, calls = stream.feed(text)
        if last:
            more, late = stream.finish()
            content, calls = content + more, calls + late
        return content, calls

    def choice(self, output: RequestOutput) -> dict[str, Any]:
        index = output.index
        content, calls = self._split(index, output.text, output.finished)
        delta: dict[str, Any] = {"content": content}
        if calls:
            sent = self.num_calls.get(index, 0)
            delta["tool_calls"] = [call.json(sent + i) for i, call in enumerate(calls)]
            self.num_calls[index] = sent + len(calls)
        if index not in self.started:
            self.started.add(index)
            delta = {"role": "assistant", **delta}
        reason = finish(output.finish_reason)
        if reason == "stop" and self.num_calls.get(index):
            reason = "tool_calls"
        return {
            "index": index,
            "delta": delta,
            "logprobs": self._logprobs(output.logprobs),
            "finish_reason": reason,
            "stop_reason": output.stop_reason,
        }

    def whole_choice(self, completion: Completion) -> dict[str, Any]:
        content, calls = self._split(completion.index, completion.text, last=True)
        message: dict[str, Any] = {"role": "assistant", "content": content or None if calls else content}
        reason = finish(completion.finish_reason)
        if calls:
            message["tool_calls"] = [call.json() for call in calls]
            reason = "tool_calls" if reason == "stop" else reason
        return {
            "index": completion.index,
            "message": message,
            "logprobs": self._logprobs(completion.logprobs),
            "finish_reason": reason,
            "stop_reason": completion.stop_reason,
        }


class WorkersAIFormat(Format):
    """``/ai/run/{model}``: ``data: {"response": ...}`` events, or the ``result`` envelope."""

    def chunks(self, output: RequestOutput) -> list[bytes]:
        return [event({"response": output.text})] if output.text else []

    def whole(self, collected: Collected) -> dict[str, Any]:
        text = collected.completions[0].text if collected.completions else ""
        response: Any = text
        if self.request.json_response:  # JSON mode answers the object itself (text if it was cut short)
            with contextlib.suppress(json.JSONDecodeError):
                response = json.loads(text)
        return {"result": {"response": response}, "success": True, "errors": [], "messages": []}

    def error(self, status: int, message: str, param: str | None = None) -> dict[str, Any]:
        return workers_ai_error(status, message)
