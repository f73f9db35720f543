"""Answers in OpenAI's and Workers AI's shapes: whole responses, server-sent-event chunks, errors."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from scheduler.request import FinishReason, RequestOutput, TokenLogprobs
from server.chat_output import ChatOutputs
from server.frontend import Collected, Completion
from server.http.requests import HttpRequest
from server.tokenizer import Tokenizer
from server.tool_calls import ToolCall
from server.validation import Prepared

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
    408: ("invalid_request_error", "request_timeout"),
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


def tool_call_json(call: ToolCall, index: int | None = None) -> dict[str, Any]:
    """An OpenAI ``tool_calls`` entry (with ``index`` in stream deltas)."""
    entry: dict[str, Any] = {"id": call.id, "type": "function",
                             "function": {"name": call.name, "arguments": call.arguments}}  # fmt: skip
    return entry if index is None else {"index": index, **entry}


class Format:
    """How one route writes a generation: stream chunks, the stream's end, a whole response, errors.

    Chat outputs are read per sample by ``server.chat_output`` where the request has tools or the
    model reasons (``prepared.chat``)."""

    media_type = "application/json"

    def __init__(
        self,
        request: HttpRequest,
        prepared: Prepared,
        model: str,
        tokenizer: Tokenizer,
        on_unparsed: Callable[[str, str], None] = lambda why, text: None,
    ) -> None:
        self.request = request
        self.prepared = prepared
        self.request_id = prepared.request_id
        self.model = model
        self.tokenizer = tokenizer
        self.created = int(time.time())
        self.usage = Usage()
        self.parts = ChatOutputs(prepared.chat, on_unparsed).parts

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
    sent_prompt_ids = False

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
        choice = self.choice(output)
        chunk = self._envelope(self.chunk_object, [choice])
        if self.request.include_usage:
            chunk["usage"] = None
        if self.request.return_token_ids:
            choice["token_ids"] = list(output.token_ids)
            if not self.sent_prompt_ids:
                chunk["prompt_token_ids"], self.sent_prompt_ids = list(self.prepared.prompt_ids), True
        return [event(chunk)]

    def end(self) -> list[bytes]:
        if not self.request.include_usage:
            return [DONE]
        return [event({**self._envelope(self.chunk_object, []), "usage": self.usage.json()}), DONE]

    def whole(self, collected: Collected) -> dict[str, Any]:
        usage = Usage(collected.prompt_tokens, collected.completion_tokens, collected.cached_tokens)
        choices = [self.whole_choice(c) for c in collected.completions]
        answer = {**self._envelope(self.whole_object, choices), "usage": usage.json()}
        if self.request.return_token_ids:
            answer["prompt_token_ids"] = list(self.prepared.prompt_ids)
            for choice, completion in zip(choices, collected.completions, strict=True):
                choice["token_ids"] = list(completion.token_ids)
        return answer


class CompletionFormat(OpenAIFormat):
    """``/v1/completions``."""

    id_prefix, whole_object, chunk_object = "cmpl-", "text_completion", "text_completion"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
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
    """``/v1/chat/completions``: reasoning as ``reasoning_content`` (vLLM's name), calls as ``tool_calls``."""

    id_prefix, whole_object, chunk_object = "chatcmpl-", "chat.completion", "chat.completion.chunk"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.started: set[int] = set()
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

    def choice(self, output: RequestOutput) -> dict[str, Any]:
        index = output.index
        parts = self.parts(index, output.text, output.finished)
        delta: dict[str, Any] = {"content": parts.content}
        if parts.reasoning:
            delta["reasoning_content"] = parts.reasoning
        if parts.calls:
            sent = self.num_calls.get(index, 0)
            delta["tool_calls"] = [tool_call_json(call, sent + i) for i, call in enumerate(parts.calls)]
            self.num_calls[index] = sent + len(parts.calls)
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
        parts = self.parts(completion.index, completion.text, last=True)
        message: dict[str, Any] = {
            "role": "assistant",
            "content": parts.content or None if parts.calls else parts.content,
        }
        if self.prepared.chat is not None and self.prepared.chat.reasoning is not None:
            message["reasoning_content"] = parts.reasoning or None
        reason = finish(completion.finish_reason)
        if parts.calls:
            message["tool_calls"] = [tool_call_json(call) for call in parts.calls]
            reason = "tool_calls" if reason == "stop" else reason
        return {
            "index": completion.index,
            "message": message,
            "logprobs": self._logprobs(completion.logprobs),
            "finish_reason": reason,
            "stop_reason": completion.stop_reason,
        }


class WorkersAIFormat(Format):
    """``/ai/run/{model}``: ``data: {"response": ...}`` events, or the ``result`` envelope; a
    reasoning model's thinking as ``reasoning`` beside the answer."""

    def chunks(self, output: RequestOutput) -> list[bytes]:
        parts = self.parts(output.index, output.text, output.finished)
        if parts.reasoning:
            return [event({"response": parts.content, "reasoning": parts.reasoning})]
        return [event({"response": parts.content})] if parts.content else []

    def whole(self, collected: Collected) -> dict[str, Any]:
        completion = collected.completions[0] if collected.completions else Completion(0)
        parts = self.parts(0, completion.text, last=True)
        response: Any = parts.content
        if self.request.json_response:  # JSON mode answers the object itself (text if it was cut short)
            with contextlib.suppress(json.JSONDecodeError):
                response = json.loads(parts.content)
        result: dict[str, Any] = {"response": response}
        if self.prepared.chat is not None and self.prepared.chat.reasoning is not None:
            result["reasoning"] = parts.reasoning
        return {"result": result, "success": True, "errors": [], "messages": []}

    def error(self, status: int, message: str, param: str | None = None) -> dict[str, Any]:
        return workers_ai_error(status, message)
