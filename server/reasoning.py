"""Reasoning models' thinking, kept apart from the answer: the markers a model thinks between, the
span a constraint lets come before the answer, and the splitter of the output as it streams.

Markers: Mistral's ``[THINK]`` / ``[/THINK]`` special tokens (Magistral, tokenizer v13), or
``<think>`` / ``</think>``, as special tokens or as text a chat template sets up (templates that
open the thinking in the generation prompt: the output then starts inside it). Special-token
markers are kept in the output text (``marker_ids``) so the splitter sees them.

``--reasoning-parser``: ``auto`` (the default) uses what the tokenizer has and nothing without;
``think`` insists (a tokenizer without think markers is a start-up error); ``none`` leaves the
thinking in the answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from scheduler.request import ReasoningSpan
from server.detokenizer import held_back
from server.tokenizer import Tokenizer

REASONING_PARSERS = ("none", "auto", "think")
_TOKEN_PAIRS = (("[THINK]", "[/THINK]"), ("<think>", "</think>"))


@dataclass(frozen=True)
class ReasoningMarkers:
    start: str
    end: str
    start_id: int | None = None  # special tokens; None: the markers are text
    end_id: int | None = None

    @property
    def marker_ids(self) -> tuple[int, ...]:
        return tuple(i for i in (self.start_id, self.end_id) if i is not None)

    def opened_by(self, tokenizer: Tokenizer, prompt_ids: Sequence[int]) -> bool:
        """The prompt ends inside the thinking (its last token, or last text, is the start marker)."""
        if not prompt_ids:
            return False
        if self.start_id is not None:
            return prompt_ids[-1] == self.start_id
        return tokenizer.decode(prompt_ids[-8:], skip_special_tokens=False).rstrip().endswith(self.start)

    def span(self, opened: bool) -> ReasoningSpan:
        """What a constraint lets come before the answer it shapes."""
        start = None if opened else (self.start_id if self.start_id is not None else self.start)
        return ReasoningSpan(start, self.end_id if self.end_id is not None else self.end)


def reasoning_markers(tokenizer: Tokenizer, parser: str) -> ReasoningMarkers | None:
    """The markers ``--reasoning-parser`` reads the output by; ValueError naming the flag when
    ``think`` is asked of a tokenizer without any."""
    if parser not in REASONING_PARSERS:
        raise ValueError(f"--reasoning-parser: {parser!r} is not one of {', '.join(REASONING_PARSERS)}")
    if parser == "none":
        return None
    found = _markers(tokenizer)
    if found is None and parser == "think":
        raise ValueError(
            "--reasoning-parser think: this model's tokenizer has no think markers ([THINK] and [/THINK], or "
            "<think> and </think> as tokens or in its chat template); choose from none, auto"
        )
    return found


def _markers(tokenizer: Tokenizer) -> ReasoningMarkers | None:
    for start, end in _TOKEN_PAIRS:
        start_id, end_id = tokenizer.special_id(start), tokenizer.special_id(end)
        if start_id is not None and end_id is not None:
            return ReasoningMarkers(start, end, start_id, end_id)
    template = tokenizer.chat_template
    if template is not None and "<think>" in template.source and "</think>" in template.source:
        return ReasoningMarkers("<think>", "</think>")
    return None


class ReasoningSplitter:
    """One sample's output as (reasoning, answer) deltas. The thinking is what lies between the
    markers when the output begins with the start marker (or the prompt opened it); an output
    that ends inside it is all reasoning."""

    def __init__(self, markers: ReasoningMarkers, opened: bool) -> None:
        self.markers = markers
        self.state = "thinking" if opened else "start"
        self.buffer = ""

    def feed(self, text: str) -> tuple[str, str]:
        self.buffer += text
        if self.state == "start":
            head = self.buffer.lstrip()
            start = self.markers.start
            if head.startswith(start):
                self.buffer = head[len(start) :]
                self.state = "thinking"
            elif start.startswith(head):
                return "", ""  # may still become the marker
            else:
                self.state = "answer"
        if self.state == "thinking":
            index = self.buffer.find(self.markers.end)
            if index < 0:
                keep = held_back(self.buffer, self.markers.end)
                reasoning = self.buffer[: len(self.buffer) - keep]
                self.buffer = self.buffer[len(reasoning) :]
                return reasoning, ""
            reasoning, self.buffer = self.buffer[:index], self.buffer[index + len(self.markers.end) :]
            self.state = "answer"
            answer, self.buffer = self.buffer, ""
            return reasoning, answer
        answer, self.buffer = self.buffer, ""
        return "", answer

    def finish(self) -> tuple[str, str]:
        rest, self.buffer = self.buffer, ""
        return (rest, "") if self.state == "thinking" else ("", rest)
