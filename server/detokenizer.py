"""Incremental detokenization with stop strings: the ``TextStream`` the engine calls per token.

Text is decoded over a sliding window of tokens (the offsets technique of TGI and vLLM):
``decode(tokens[prefix:])`` minus ``decode(tokens[prefix:read])`` is the new text, and it
is taken only when it does not end in U+FFFD, so a character whose bytes span several
tokens (byte-level BPE, SentencePiece byte fallback) comes out whole. Starting the window
on the last prompt tokens keeps the first output token's leading space.

Special tokens are dropped from the text, except ``kept`` ones (the tool-call and reasoning
markers the front-end parses), which appear as their strings (``[TOOL_CALLS]``).

Stop strings are searched in the decoded text across token boundaries; text that could be
the beginning of a stop string is held back until it is known not to be. The deltas
returned always concatenate to the final text.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from scheduler.request import TextUpdate
from server.tokenizer import Tokenizer

PROMPT_CONTEXT = 6  # prompt tokens decoded with the output so spacing is right


def held_back(text: str, token: str, limit: int | None = None) -> int:
    """Length of the longest end of ``text`` (at most ``limit`` characters) that begins ``token``:
    text to hold back because what follows may complete ``token``."""
    longest = min(len(token) - 1, len(text) if limit is None else limit)
    for k in range(longest, 0, -1):
        if text.endswith(token[:k]):
            return k
    return 0


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int],
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        kept: Sequence[int] = (),
    ) -> None:
        self.tokenizer = tokenizer
        self.kept = frozenset(kept)
        self._dropped = tokenizer.special_ids - self.kept if kept else frozenset()
        self.tokens = list(prompt_ids[-PROMPT_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.tokens)
        self.stop = tuple(stop)
        self.include_stop = include_stop_str_in_output
        self.text = ""  # decoded output so far (cut at a matched stop string)
        self.emitted = 0  # characters of self.text already returned
        self.stopped = False

    def append(self, token_id: int, allow_stop: bool = True) -> TextUpdate:
        """Add one output token; ``allow_stop`` is False while min_tokens is not reached."""
        assert not self.stopped, "append after a stop string matched"
        self.tokens.append(token_id)
        before = len(self.text)
        self._decode_new()
        if self.stop and allow_stop:
            match = self._find_stop(max(0, before - max(map(len, self.stop)) + 1))
            if match is not None:
                index, stop = match
                self.text = self.text[: index + len(stop) if self.include_stop else index]
                self.stopped = True
                return TextUpdate(self._take(len(self.text)), stop)
        return TextUpdate(self._take(len(self.text) - self._held_back()))

    def flush(self) -> str:
        """Everything not yet returned, including an incomplete trailing character."""
        if not self.stopped:
            tail = self._decode(self.tokens[self.prefix_offset :])
            head = self._decode(self.tokens[self.prefix_offset : self.read_offset])
            if len(tail) > len(head):
                self.text += tail[len(head) :]
                self.prefix_offset = self.read_offset = len(self.tokens)
        return self._take(len(self.text))

    def fork(self) -> IncrementalDetokenizer:
        twin = copy.copy(self)
        twin.tokens = list(self.tokens)
        return twin

    def _decode(self, ids: Sequence[int]) -> str:
        if not self.kept:
            return self.tokenizer.decode(ids)
        return self.tokenizer.decode([i for i in ids if i not in self._dropped], skip_special_tokens=False)

    def _decode_new(self) -> None:
        head = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        full = self._decode(self.tokens[self.prefix_offset :])
        if len(full) > len(head) and not full.endswith("\ufffd"):
            self.text += full[len(head) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.tokens)

    def _find_stop(self, start: int) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        for stop in self.stop:
            index = self.text.find(stop, start)
            if index >= 0 and (best is None or index < best[0]):
                best = (index, stop)
        return best

    def _held_back(self) -> int:
        """Length of the longest end of the text that begins some stop string."""
        return max((held_back(self.text, stop, len(self.text) - self.emitted) for stop in self.stop), default=0)

    def _take(self, end: int) -> str:
        end = max(end, self.emitted)
        out = self.text[self.emitted : end]
        self.emitted = end
        return out
