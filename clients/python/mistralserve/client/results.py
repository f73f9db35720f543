"""Plain results built from responses."""

from __future__ import annotations

from dataclasses import dataclass, field

from mistralserve.v1 import generation_pb2 as pb

FINISH_REASONS = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_ABORT: "abort",
    pb.FINISH_REASON_ERROR: "error",
}


@dataclass(frozen=True)
class Generation:
    request_id: str
    texts: list[str]  # one per sample
    token_ids: list[list[int]]
    finish_reasons: list[str]
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    reasonings: list[str] = field(default_factory=list)  # chat on a reasoning model: the thinking, per sample
    tool_calls: list[list[pb.ToolCall]] = field(default_factory=list)  # chat with tools: the calls, per sample

    @property
    def text(self) -> str:
        return self.texts[0]

    @classmethod
    def from_response(cls, response: pb.GenerateResponse) -> Generation:
        completions = sorted(response.completions, key=lambda c: c.index)
        return cls(
            response.request_id,
            [c.text for c in completions],
            [list(c.token_ids) for c in completions],
            [FINISH_REASONS.get(c.finish_reason, "unspecified") for c in completions],
            response.usage.prompt_tokens,
            response.usage.completion_tokens,
            response.usage.cached_tokens,
            [c.reasoning for c in completions],
            [list(c.tool_calls) for c in completions],
        )
