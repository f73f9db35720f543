"""Tokenizers backed by Hugging Face ``tokenizers``: ``tokenizer.json`` files and GGUF byte-level BPE."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property

from tokenizers import Tokenizer as RustTokenizer

from server.chat_template import ChatTemplate
from server.tokenizer import SpecialTokens, Tokenizer

LONG_TEXT = 1024  # characters


class HFTokenizer(Tokenizer):
    def __init__(self, backend: RustTokenizer, special: SpecialTokens, chat_template: ChatTemplate | None) -> None:
        super().__init__(special, chat_template)
        self.backend = backend
        added = backend.get_added_tokens_decoder()
        self._special_ids = frozenset(i for i, token in added.items() if token.special)
        self._verbatim: RustTokenizer | None = None  # a copy that reads special-token strings as text

    @property
    def vocab_size(self) -> int:
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) > LONG_TEXT:  # encode holds the GIL throughout (0.9 s for 2 MB), encode_batch does not
            return list(self.backend.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0].ids)
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def encode_exact(self, text: str) -> list[int]:
        if self._verbatim is None:
            self._verbatim = RustTokenizer.from_str(self.backend.to_str())
            self._verbatim.encode_special_tokens = True
        return list(self._verbatim.encode(text, add_special_tokens=False).ids)

    @property
    def special_ids(self) -> frozenset[int]:
        return self._special_ids

    @cached_property
    def max_token_bytes(self) -> int:
        """Each token decoded alone (a byte of a character decodes to U+FFFD: more, never less)."""
        decode = self.backend.decode
        return max(1, max((len(decode([i], skip_special_tokens=False).encode()) for i in range(self.vocab_size)),
                          default=1))  # fmt: skip

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens))
