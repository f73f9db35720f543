"""The model's vocabulary as llguidance sees it: every token id's bytes, EOS, special tokens.

Hugging Face ``tokenizers`` (``tokenizer.json``, GGUF byte-level BPE) hand llguidance their
own JSON, which it reads natively when their decoder is one it knows (byte-level, metaspace
with byte fallback); other decoders (a plain character vocabulary) are spelled out id by id,
each token's decoded text. SentencePiece vocabularies are spelled out piece by piece: ``▁`` is
a space, ``<0xNN>`` the byte NN, control and unknown pieces are special tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

from llguidance import LLTokenizer, TokenizerWrapper

from server.tokenizer import Tokenizer
from server.tokenizer_hf import HFTokenizer
from server.tokenizer_spm import SentencePieceTokenizer
from server.tokenizer_tekken import TekkenTokenizer


class _SpelledVocab:
    """What ``llguidance.TokenizerWrapper`` reads: each id's bytes, padded with special tokens
    up to the model's vocabulary (ids the tokenizer lacks can never be generated)."""

    def __init__(self, tokenizer: Tokenizer, tokens: list[bytes], special: list[int], vocab_size: int) -> None:
        self._tokenizer = tokenizer
        self.eos_token_id = tokenizer.special.eos_ids[0] if tokenizer.special.eos_ids else None
        self.bos_token_id = tokenizer.special.bos_id
        padding = range(len(tokens), vocab_size)
        self.tokens = tokens + [f"<[pad {i}]>".encode() for i in padding]
        self.special_token_ids = special + list(padding)

    def __call__(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False)


def _decoded(tokenizer: HFTokenizer) -> tuple[list[bytes], list[int]]:
    """An HF vocabulary llguidance cannot read itself: each id's decoded text."""
    backend = tokenizer.backend
    added = backend.get_added_tokens_decoder()
    tokens = [
        (added[i].content if i in added else backend.decode([i], skip_special_tokens=False)).encode()
        for i in range(tokenizer.vocab_size)
    ]
    return tokens, [i for i, token in added.items() if token.special]


def grammar_tokenizer(tokenizer: Tokenizer, vocab_size: int) -> LLTokenizer:
    """``vocab_size`` is the model's (the logits' width), which may exceed the tokenizer's."""
    eos: Sequence[int] = list(tokenizer.special.eos_ids)
    if isinstance(tokenizer, HFTokenizer):
        try:
            return LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size, eos_token=list(eos))
        except ValueError:  # "can't determine decoder type"
            vocab = _SpelledVocab(tokenizer, *_decoded(tokenizer), vocab_size)
            return LLTokenizer(TokenizerWrapper(vocab), n_vocab=vocab_size, eos_token=list(eos))
    if isinstance(tokenizer, SentencePieceTokenizer | TekkenTokenizer):
        vocab = _SpelledVocab(tokenizer, *tokenizer.piece_bytes(), vocab_size)
        return LLTokenizer(TokenizerWrapper(vocab), n_vocab=vocab_size, eos_token=list(eos))
    raise ValueError(f"structured output does not support {type(tokenizer).__name__} vocabularies")
