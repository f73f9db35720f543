"""A chat sample's output as its parts: reasoning, answer content, tool calls.

The text the engine streams (markers kept, ``ChatOutputSpec.kept_ids``) goes first through the
reasoning splitter, then the answer through the tool-call parser. Both front-ends read chat
outputs through this: HTTP as ``reasoning_content`` / ``content`` / ``tool_calls``, gRPC as
``reasoning`` / ``text`` / ``tool_calls``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from server.reasoning import ReasoningMarkers, ReasoningSplitter
from server.tool_calls import CallParser, CallStyle, ToolCall


@dataclass(frozen=True)
class ChatOutputSpec:
    """What a chat request's output holds besides the answer."""

    reasoning: ReasoningMarkers | None = None
    opened: bool = False  # the prompt opened the thinking
    calls: CallStyle | None = None  # tools offered: read calls back in this style
    names: frozenset[str] = frozenset()  # the functions calls may name
    forced: bool = False  # tool_choice required or a function

    @property
    def kept_ids(self) -> tuple[int, ...]:
        """Special tokens whose text the engine must keep in the output for the parsers."""
        ids = self.reasoning.marker_ids if self.reasoning is not None else ()
        return ids + (self.calls.marker_ids if self.calls is not None else ())


@dataclass
class ChatDelta:
    content: str = ""
    reasoning: str = ""
    calls: list[ToolCall] = field(default_factory=list)

    def __iadd__(self, other: ChatDelta) -> ChatDelta:
        self.content += other.content
        self.reasoning += other.reasoning
        self.calls += other.calls
        return self


class ChatOutputParser:
    """One sample: feed its text deltas in order, then ``finish`` at its end."""

    def __init__(self, spec: ChatOutputSpec, on_failure: Callable[[str, str], None]) -> None:
        self.splitter = ReasoningSplitter(spec.reasoning, spec.opened) if spec.reasoning is not None else None
        self.calls = CallParser(spec.calls, spec.names, spec.forced, on_failure) if spec.calls is not None else None

    def feed(self, text: str) -> ChatDelta:
        reasoning, answer = self.splitter.feed(text) if self.splitter is not None else ("", text)
        return self._answer(reasoning, answer, last=False)

    def finish(self) -> ChatDelta:
        reasoning, answer = self.splitter.finish() if self.splitter is not None else ("", "")
        return self._answer(reasoning, answer, last=True)

    def _answer(self, reasoning: str, answer: str, last: bool) -> ChatDelta:
        if self.calls is None:
            return ChatDelta(answer, reasoning)
        content, calls = self.calls.feed(answer)
        delta = ChatDelta(content, reasoning, calls)
        if last:
            more, late = self.calls.finish()
            delta += ChatDelta(more, "", late)
        return delta


class ChatOutputs:
    """Every sample's parser of one request; with no spec, all text is content."""

    def __init__(self, spec: ChatOutputSpec | None, on_failure: Callable[[str, str], None]) -> None:
        self.spec = spec
        self.on_failure = on_failure
        self._parsers: dict[int, ChatOutputParser] = {}

    def parts(self, index: int, text: str, last: bool) -> ChatDelta:
        """Sample ``index``'s new text as reasoning, content and tool calls; ``last`` at its end."""
        if self.spec is None:
            return ChatDelta(text)
        parser = self._parsers.setdefault(index, ChatOutputParser(self.spec, self.on_failure))
        delta = parser.feed(text)
        if last:
            delta += parser.finish()
        return delta
