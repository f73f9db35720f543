"""Requests and what comes back: sampling parameters, sequences, outputs. No torch here.

A request holds a prompt and ``n`` samples. Its sequence 0 prefills the prompt; when the
prompt's logits are ready, samples 1..n-1 fork from it and share its blocks copy-on-write.
Every sequence tracks ``num_computed_tokens``: there is no prefill or decode phase, only
tokens whose KV is not computed yet (the whole prompt, a chunk of it, a resumed
sequence's prompt and outputs, or one new token).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import Protocol

MAX_N = 16
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_CONSTRAINT_BYTES = 128 * 1024  # a schema, regex or grammar; choices together
MAX_CHOICES = 1024


class ConstraintKind(StrEnum):
    JSON_SCHEMA = "json_schema"  # text: a JSON schema
    JSON_OBJECT = "json_object"  # any JSON object
    REGEX = "regex"  # text: the output fullmatches it
    CHOICE = "choice"  # choices: the output is one of them
    GRAMMAR = "grammar"  # text: a Lark or GBNF context-free grammar
    TOOL_CALLS = "tool_calls"  # text: the Lark grammar of forced tool calls in the model's format (server-built)


@dataclass(frozen=True)
class ReasoningSpan:
    """Free text a constraint lets come before the output it shapes (a reasoning model's thinking):
    from ``start`` to ``end``, each a special token's id (``[THINK]``) or a text (``<think>``);
    ``start`` None when the prompt already opened it."""

    start: int | str | None
    end: int | str


@dataclass(frozen=True)
class Constraint:
    """The shape the output must take. Invalid values raise ValueError naming the field.

    Only the form is checked here (sizes, empty values); whether the schema, regex or grammar
    compiles is ``scheduler.structured.check_constraint``'s job.
    """

    kind: ConstraintKind
    text: str = ""
    choices: tuple[str, ...] = ()
    reasoning: ReasoningSpan | None = None  # the shape applies after this span, when the model writes one

    def __post_init__(self) -> None:
        kind = self.kind.value
        if self.kind == ConstraintKind.CHOICE:
            if not self.choices:
                raise ValueError("choice must be a non-empty list of strings, got []")
            if len(self.choices) > MAX_CHOICES:
                raise ValueError(f"choice must hold at most {MAX_CHOICES} strings, got {len(self.choices)}")
            if any(c == "" for c in self.choices):
                raise ValueError("choice must hold non-empty strings, got an empty string")
        elif self.kind != ConstraintKind.JSON_OBJECT and not self.text.strip():
            raise ValueError(f"{kind} must be a non-empty string")
        size = len(self.text.encode()) + sum(len(c.encode()) for c in self.choices)
        if size > MAX_CONSTRAINT_BYTES:
            raise ValueError(f"{kind} must be at most {MAX_CONSTRAINT_BYTES} bytes, got {size}")

    @property
    def key(self) -> tuple[str, str, tuple[str, ...], ReasoningSpan | None]:
        """What identifies the compiled grammar (the cache key)."""
        return (self.kind.value, self.text, self.choices, self.reasoning)


class FinishReason(StrEnum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the model's context
    ABORT = "abort"  # cancelled by the client, or preempted out of the engine on shutdown
    ERROR = "error"  # the step that ran it failed, or its grammar matcher broke (that sample only)


class QueueFullError(Exception):
    """The waiting queue is at ``max_queued_requests``; the server answers RESOURCE_EXHAUSTED."""


class EngineDeadError(Exception):
    """The engine thread is not running; the server reports NOT_SERVING."""


@dataclass(frozen=True)
class SamplingParams:
    """What to sample and when to stop. Invalid values raise ValueError naming the field."""

    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    n: int = 1
    max_tokens: int | None = None  # None: the rest of the context
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # chosen token's logprob plus this many alternatives (0..20)
    prompt_logprobs: int | None = None
    constraint: Constraint | None = None  # structured output
    # special tokens whose text stays in the output (the markers the front-end reads tool calls
    # and reasoning by: [TOOL_CALLS], [ARGS], [THINK], ...); other special tokens are dropped
    kept_special_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, allowed: str, value: object) -> None:
            if not ok:
                raise ValueError(f"{name} must be {allowed}, got {value!r}")

        def finite(value: float) -> bool:
            return isinstance(value, int | float) and math.isfinite(value)

        check(
            finite(self.temperature) and self.temperature >= 0, "temperature", "a finite number >= 0", self.temperature
        )
        check(finite(self.top_p) and 0 < self.top_p <= 1, "top_p", "in (0, 1]", self.top_p)
        check(self.top_k >= -1, "top_k", "-1 (disabled), 0 (disabled) or a positive integer", self.top_k)
        check(finite(self.min_p) and 0 <= self.min_p <= 1, "min_p", "in [0, 1]", self.min_p)
        check(
            finite(self.repetition_penalty) and self.repetition_penalty > 0,
            "repetition_penalty",
            "a finite number > 0",
            self.repetition_penalty,
        )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            check(finite(value) and -2 <= value <= 2, name, "in [-2, 2]", value)
        check(self.seed is None or -(2**63) <= self.seed < 2**64, "seed", "a 64-bit integer", self.seed)
        check(1 <= self.n <= MAX_N, "n", f"in [1, {MAX_N}]", self.n)
        check(self.max_tokens is None or self.max_tokens >= 1, "max_tokens", ">= 1", self.max_tokens)
        check(self.min_tokens >= 0, "min_tokens", ">= 0", self.min_tokens)
        check(
            self.max_tokens is None or self.min_tokens <= self.max_tokens,
            "min_tokens",
            f"<= max_tokens ({self.max_tokens})",
            self.min_tokens,
        )
        check(len(self.stop) <= MAX_STOP_STRINGS, "stop", f"at most {MAX_STOP_STRINGS} strings", len(self.stop))
        check(all(s != "" for s in self.stop), "stop", "non-empty strings", list(self.stop))
        check(all(t >= 0 for t in self.stop_token_ids), "stop_token_ids", "token ids >= 0", list(self.stop_token_ids))
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            check(value is None or 0 <= value <= MAX_LOGPROBS, name, f"in [0, {MAX_LOGPROBS}]", value)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass(frozen=True)
class TextUpdate:
    text: str  # new text safe to show (complete characters, no possible stop-string prefix)
    stop: str | None = None  # the stop string that matched; the sequence ends here


class TextStream(Protocol):
    """Incremental detokenizer and stop-string matcher of one sequence (the server's)."""

    def append(self, token_id: int, allow_stop: bool = True) -> TextUpdate:
        """Add an output token; stop strings match only when ``allow_stop`` (min_tokens reached)."""
        ...

    def flush(self) -> str:
        """All text still held back, when the sequence ends for another reason."""
        ...

    def fork(self) -> TextStream:
        """An independent copy with the same history (for parallel samples)."""
        ...


@dataclass(frozen=True)
class Logprob:
    token_id: int
    logprob: float
    rank: int  # 1 = most likely


@dataclass(frozen=True)
class TokenLogprobs:
    chosen: Logprob
    top: tuple[Logprob, ...]  # the ``logprobs`` most likely tokens, most likely first


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens whose KV came from the prefix cache


@dataclass(frozen=True)
class RequestTimings:
    """Monotonic seconds, for the metrics issue."""

    arrival: float
    first_scheduled: float | None
    first_token: float | None
    finished: float
    token_times: tuple[float, ...]  # when each output token was produced


@dataclass(frozen=True)
class FinishedRequest:
    """A request whose every sample ended: what metrics and the request log need."""

    request_id: str
    finish_reasons: tuple[FinishReason, ...]  # per sample
    prompt_tokens: int
    generation_tokens: int  # all samples
    cached_tokens: int
    timings: RequestTimings  # of sample 0
    num_preemptions: int
    constraint: ConstraintKind | None = None
    grammar_compile_seconds: float | None = None  # None: no constraint, or its grammar came from the cache


@dataclass(frozen=True)
class RequestOutput:
    """One update of one sample of a request; the last one has ``finish_reason`` set."""

    request_id: str
    index: int
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[TokenLogprobs, ...] = ()
    prompt_logprobs: tuple[TokenLogprobs | None, ...] = ()  # sent once, with the first output of index 0
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the matched stop string or stop token id
    usage: Usage | None = None
    timings: RequestTimings | None = None
    error: str | None = None
    bad_input: bool = False  # the error is the request's own (its constraint would not compile): a 400

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class EngineRequest:
    """What a caller submits; ``text_stream`` detokenizes sample 0 (forked for the others)."""

    request_id: str
    prompt_token_ids: Sequence[int]
    params: SamplingParams
    text_stream: TextStream
    eos_token_ids: tuple[int, ...] = ()
    priority: int = 0  # lower is served first, as in vLLM
    arrival_time: float = 0.0


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class SequenceState:
    """One sample's progress. ``seq_id`` is ``request_id`` for sample 0, else ``request_id#i``."""

    seq_id: str
    request: EngineRequest
    index: int
    text_stream: TextStream
    all_token_ids: list[int] = field(default_factory=list)  # prompt, then outputs
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    num_cached_tokens: int = 0  # prefix-cache hit of the first admission
    first_scheduled: float | None = None
    token_times: list[float] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs | None] = field(default_factory=list)
    num_preemptions: int = 0
    ready: bool = True  # False while its constraint's grammar is being compiled: not admitted yet

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    def append_token(self, token_id: int, now: float) -> None:
        self.all_token_ids.append(token_id)
        self.output_token_ids.append(token_id)
        self.token_times.append(now)
