"""Tokenizers backed by Hugging Face ``tokenizers``: ``tokenizer.json`` files and GGUF byte-level BPE."""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer as RustTokenizer

from server.chat_template import ChatTemplate
from server.tokenizer import SpecialTokens, Tokenizer


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
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def encode_exact(self, text: str) -> list[int]:
        if self._verbatim is None:
            self._verbatim = RustTokenizer.from_str(self.backend.to_str())
            self._verbatim.encode_special_tokens = True
        return list(self._verbatim.encode(text, add_special_tokens=False).ids)

    @property
    def special_ids(self) -> frozenset[int]:
        return self._special_ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens))
