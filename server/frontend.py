"""What both front-ends (``server.grpc``, ``server.http``) do with a generation request.

Admission (loaded? draining? engine alive?), validation into an engine request
(``server.validation``), the ``request received`` / ``request finished`` log lines, the count
of calls in flight that a drain waits for, submission, and the abort that frees a request's
blocks when its caller goes away. A refusal is a ``Rejected`` carrying a reason that each
front-end maps to its own status (gRPC code, HTTP status).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import structlog

from scheduler.request import EngineDeadError, FinishReason, QueueFullError, RequestOutput, TokenLogprobs
from server import malloc
from server.chat_messages import chat_characters
from server.engine_client import EngineClient
from server.engine_protocol import RequestSpec
from server.invalid import InvalidRequest
from server.metrics import ServerMetrics
from server.reasoning import ReasoningMarkers
from server.tokenizer import Tokenizer
from server.validation import Parsed, Prepared, prepare

log = structlog.get_logger(__name__)

# Why a request was refused or failed; each front-end maps these to its statuses.
INVALID_ARGUMENT = "invalid_argument"
UNAVAILABLE = "unavailable"
QUEUE_FULL = "queue_full"
INTERNAL = "internal"


class Rejected(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Serving:
    """The engine core's client and the tokenizer: what answers calls once the model is loaded."""

    engine: EngineClient
    tokenizer: Tokenizer


@dataclass
class ServerState:
    """What the front-ends need to know of the process: loaded yet, draining, calls in flight."""

    serving: Serving | None = None
    metrics: ServerMetrics | None = None
    model_name: str = ""
    aliases: tuple[str, ...] = ()  # further names clients may use (--served-model-name)
    log_prompts: bool = False
    default_max_tokens: int = 256  # where a request sets no max_tokens
    reasoning: ReasoningMarkers | None = None  # what --reasoning-parser reads chat outputs by
    draining: bool = False
    inflight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()

    @property
    def model_names(self) -> tuple[str, ...]:
        return (self.model_name, *self.aliases)


@dataclass
class RequestLog:
    """What the ``request finished`` line reports, as the client saw it."""

    prompt_tokens: int
    peer: str
    start: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    completion_tokens: int = 0
    cached_tokens: int = 0
    finish_reasons: dict[int, str] = field(default_factory=dict)

    def saw(self, output: RequestOutput) -> None:
        if output.token_ids and self.first_token is None:
            self.first_token = time.monotonic()
        self.completion_tokens += len(output.token_ids)
        if output.finished:
            assert output.finish_reason is not None
            self.finish_reasons[output.index] = output.finish_reason.value
            if output.usage is not None:
                self.cached_tokens = output.usage.cached_tokens

    def finished(self, num_samples: int) -> None:
        reasons = [self.finish_reasons.get(i, FinishReason.ABORT.value) for i in range(num_samples)]
        fields: dict[str, Any] = {"finish_reasons": reasons} if num_samples > 1 else {}
        log.info(
            "request finished",
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            cached_tokens=self.cached_tokens,
            time_to_first_token=None if self.first_token is None else round(self.first_token - self.start, 6),
            total_time=round(time.monotonic() - self.start, 6),
            finish_reason=reasons[0],
            peer=self.peer,
            **fields,
        )


@dataclass
class Completion:
    """One sample of a whole (unstreamed) generation."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None


@dataclass
class Collected:
    completions: list[Completion]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


class Frontend:
    """Admission, validation, logging and submission, shared by the gRPC and HTTP front-ends."""

    def __init__(self, state: ServerState) -> None:
        self.state = state

    def reject(self, reason: str, message: str, peer: str) -> Rejected:
        """Count and log a refusal; the caller raises what this returns."""
        if self.state.metrics is not None:
            self.state.metrics.reject(reason)
        log.info("request rejected", reason=reason, error=message, peer=peer)
        return Rejected(reason, message)

    def tool_calls_unparsed(self, why: str, text: str) -> None:
        """A block of tool calls that did not parse (its text went back as content): log and count."""
        if self.state.metrics is not None:
            self.state.metrics.tool_call_parse_failures.inc()
        log.warning("tool calls did not parse; returned as content", reason=why, text=text[:500])

    def serving(self, peer: str) -> Serving:
        if self.state.draining:
            raise self.reject(UNAVAILABLE, "the server is shutting down", peer)
        serving = self.state.serving
        if serving is None:
            raise self.reject(UNAVAILABLE, "the model is still loading", peer)
        if not serving.engine.alive:
            raise self.reject(UNAVAILABLE, "the engine is not running", peer)
        return serving

    async def prepare(
        self, parsed: Parsed, peer: str, log_fields: dict[str, Any] | None = None
    ) -> tuple[Serving, Prepared]:
        """Validate ``parsed`` (a GenerateRequest or GenerateStreamRequest) for the engine, on a
        worker thread: tokenizing a long prompt, rendering a template and checking a grammar never
        hold up the event loop (a 4 MB prompt used to stop every other answer for 3.4 s)."""
        serving = self.serving(peer)
        try:
            prepared = await asyncio.to_thread(
                prepare,
                parsed,
                serving.tokenizer,
                serving.engine.info.config.vocab_size,
                serving.engine.max_model_len,
                self.state.default_max_tokens,
                self.state.reasoning,
            )
        except InvalidRequest as exc:
            raise self.reject(INVALID_ARGUMENT, str(exc), peer) from None
        finally:
            if input_characters(parsed.message) > malloc.LARGE_INPUT:  # the tokenizer's garbage, back to the system
                await asyncio.to_thread(malloc.give_back)
        fields: dict[str, Any] = {"prompt": parsed.message.prompt} if self.state.log_prompts else {}
        log.info(
            "request received",
            request_id=prepared.request_id,
            prompt_tokens=len(prepared.prompt_ids),
            n=prepared.params.n,
            max_tokens=prepared.params.max_tokens,
            peer=peer,
            **fields,
            **(log_fields or {}),
        )
        return serving, prepared

    @asynccontextmanager
    async def generate(self, serving: Serving, prepared: Prepared, peer: str) -> AsyncIterator[Outputs]:
        """Submit; inside the block the request counts as in flight. Leaving it before every
        sample has finished (cancelled, client gone) aborts the request, freeing its blocks."""
        spec = RequestSpec(prepared.request_id, tuple(prepared.prompt_ids), prepared.params, prepared.priority)
        try:
            stream = serving.engine.add(spec)
        except QueueFullError as exc:
            raise self.reject(QUEUE_FULL, str(exc), peer) from None
        except EngineDeadError as exc:
            raise self.reject(UNAVAILABLE, str(exc), peer) from None
        except ValueError as exc:
            raise self.reject(INVALID_ARGUMENT, str(exc), peer) from None
        outputs = Outputs(stream, RequestLog(len(prepared.prompt_ids), peer), prepared.params.n)
        self.state.inflight += 1
        self.state.idle.clear()
        with structlog.contextvars.bound_contextvars(request_id=prepared.request_id):
            try:
                yield outputs
            finally:
                if outputs.finished < prepared.params.n:
                    serving.engine.abort(prepared.request_id)
                outputs.record.finished(prepared.params.n)
                self.state.inflight -= 1
                if self.state.inflight == 0:
                    self.state.idle.set()


def input_characters(message: Any) -> int:
    """The text a generation request brings (0 for token ids or an unparsable message)."""
    which = message.WhichOneof("input") if message is not None else None
    if which == "prompt":
        return len(message.prompt)
    return chat_characters(message.messages) if which == "messages" else 0


class Outputs:
    """A submitted request's outputs, in order. A sample that failed in the engine is yielded
    with finish reason ``error`` while the others go on; when every sample failed,
    ``Rejected(INTERNAL)`` is raised after the last. A dead engine raises ``Rejected(UNAVAILABLE)``."""

    def __init__(self, stream: AsyncIterator[RequestOutput], record: RequestLog, num_samples: int = 1) -> None:
        self._stream = stream
        self.record = record
        self.num_samples = num_samples
        self.finished = 0
        self.errors: list[str] = []
        self.bad_input = False

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self

    async def __anext__(self) -> RequestOutput:
        try:
            output = await self._stream.__anext__()
        except EngineDeadError as exc:
            raise Rejected(UNAVAILABLE, str(exc)) from None
        except StopAsyncIteration:
            if self.errors and len(self.errors) == self.num_samples:
                if self.bad_input:  # a constraint the engine could not compile: the request's fault
                    raise Rejected(INVALID_ARGUMENT, self.errors[0]) from None
                raise Rejected(INTERNAL, f"generation failed: {self.errors[0]}") from None
            raise
        self.record.saw(output)
        if output.finished:
            self.finished += 1
            if output.finish_reason == FinishReason.ERROR:
                report = log.info if output.bad_input else log.error
                report("generation failed", error=output.error, sample=output.index)
                self.errors.append(output.error or "unknown error")
                self.bad_input = self.bad_input or output.bad_input
        return output

    async def collect(self) -> Collected:
        """Every sample's whole text, tokens, logprobs and finish, and the usage."""
        completions: dict[int, Completion] = {}
        result = Collected([])
        async for output in self:
            completion = completions.setdefault(output.index, Completion(output.index))
            completion.text += output.text
            completion.token_ids.extend(output.token_ids)
            completion.logprobs.extend(output.logprobs)
            if output.finished:
                completion.finish_reason = output.finish_reason
                completion.stop_reason = output.stop_reason
                if output.usage is not None:
                    result.prompt_tokens = output.usage.prompt_tokens
                    result.cached_tokens = output.usage.cached_tokens
                    result.completion_tokens += output.usage.completion_tokens
        result.completions = [completions[i] for i in sorted(completions)]
        return result
