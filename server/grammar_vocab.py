"""The model's vocabulary as llguidance sees it: every token id's bytes, EOS, special tokens.

Hugging Face ``tokenizers`` (``tokenizer.json``, GGUF byte-level BPE) hand llguidance their
own JSON, which it reads natively. SentencePiece vocabularies are spelled out piece by piece:
``▁`` is a space, ``<0xNN>`` the byte NN, control and unknown pieces are special tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

from llguidance import LLTokenizer, TokenizerWrapper

from server.tokenizer import Tokenizer
from server.tokenizer_hf import HFTokenizer
from server.tokenizer_spm import SentencePieceTokenizer


class _SentencePieceVocab:
    """What ``llguidance.TokenizerWrapper`` reads from a tokenizer."""

    def __init__(self, tokenizer: SentencePieceTokenizer) -> None:
        self._tokenizer = tokenizer
        self.eos_token_id = tokenizer.special.eos_ids[0] if tokenizer.special.eos_ids else None
        self.bos_token_id = tokenizer.special.bos_id
        self.tokens, self.special_token_ids = tokenizer.piece_bytes()

    def __call__(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False)


def grammar_tokenizer(tokenizer: Tokenizer, vocab_size: int) -> LLTokenizer:
    """``vocab_size`` is the model's (the logits' width), which may exceed the tokenizer's."""
    eos: Sequence[int] = list(tokenizer.special.eos_ids)
    if isinstance(tokenizer, HFTokenizer):
        return LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size, eos_token=list(eos))
    if isinstance(tokenizer, SentencePieceTokenizer):
        return LLTokenizer(TokenizerWrapper(_SentencePieceVocab(tokenizer)), n_vocab=vocab_size, eos_token=list(eos))
    raise ValueError(f"structured output does not support {type(tokenizer).__name__} vocabularies")
