"""The model's vocabulary as llguidance sees it: every token id's bytes, how text is tokenized,
EOS, special tokens.

A matcher needs two things to agree: the bytes of each token, and the tokenizer it calls to learn
how the model writes text the grammar forces (``{`` at the start of a JSON object). Its mask
allows a token whose bytes fit; its forced text is tokenized and the tokens consumed. If the
tokenizer adds anything the bytes do not have (SentencePiece's dummy-prefix space: ``{`` encoded
as ``▁{``, whose bytes are `` {``), the matcher forces bytes the grammar refuses and allows
nothing after, and the request fails. So the tokenizer it gets is ``Tokenizer.encode_exact``, and
each answer is checked against the bytes: one that does not spell its text exactly is replaced by
a longest-match over the vocabulary, so the two can never disagree.

Hugging Face ``tokenizers`` (``tokenizer.json``, GGUF byte-level BPE) hand llguidance their own
JSON, which it reads natively (with its own tokenizer) when their decoder is one it knows
(byte-level, metaspace with byte fallback); other decoders (a plain character vocabulary) are
spelled out id by id, each token's decoded text. SentencePiece and Tekken vocabularies are
spelled out piece by piece: ``▁`` is a space, ``<0xNN>`` the byte NN, control and unknown pieces
are special tokens (llguidance matches them only where a grammar names them: ``<[id]>``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import structlog
from llguidance import LLTokenizer, TokenizerWrapper

from server.tokenizer import Tokenizer
from server.tokenizer_hf import HFTokenizer
from server.tokenizer_spm import SentencePieceTokenizer
from server.tokenizer_tekken import TekkenTokenizer

log = structlog.get_logger(__name__)


class SpelledVocab:
    """What ``llguidance.TokenizerWrapper`` reads: each id's bytes, padded with special tokens
    up to the model's vocabulary (ids the tokenizer lacks can never be generated), and a
    tokenizer whose ids always spell exactly the text asked for."""

    def __init__(
        self,
        tokens: list[bytes],
        special: Sequence[int],
        vocab_size: int,
        encode: Callable[[str], list[int]],
        eos_token_id: int | None,
        bos_token_id: int | None,
    ) -> None:
        self._encode = encode
        self.eos_token_id = eos_token_id
        self.bos_token_id = bos_token_id
        padding = range(len(tokens), vocab_size)
        self.tokens = tokens + [f"<[pad {i}]>".encode() for i in padding]
        self.special_token_ids = [*special, *padding]
        skip = set(self.special_token_ids)
        self._by_bytes: dict[bytes, int] = {}
        for i, piece in enumerate(tokens):
            if i not in skip and piece:
                self._by_bytes.setdefault(piece, i)
        self._longest = max(map(len, self._by_bytes), default=1)
        self.mismatches = 0  # answers of ``encode`` that did not spell their text (replaced)

    def __call__(self, text: str | bytes) -> list[int]:
        data = text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")
        try:
            ids = self._encode(data.decode())
        except Exception:  # a character cut in two, or a tokenizer that fails: only a byte-wise match is sure
            return self.longest_match(data)
        if b"".join(self.tokens[i] for i in ids if 0 <= i < len(self.tokens)) == data:
            return ids
        self.mismatches += 1
        if self.mismatches == 1:
            log.warning("tokenizer ids do not spell their text; using a longest match",
                        text=data[:80].decode("utf-8", "replace"))  # fmt: skip
        return self.longest_match(data)

    def longest_match(self, data: bytes) -> list[int]:
        """Greedy longest-match ids spelling ``data`` (bytes no token covers are skipped)."""
        ids: list[int] = []
        position = 0
        while position < len(data):
            for length in range(min(self._longest, len(data) - position), 0, -1):
                token = self._by_bytes.get(data[position : position + length])
                if token is not None:
                    ids.append(token)
                    position += length
                    break
            else:
                position += 1
        return ids


def _decoded(tokenizer: HFTokenizer) -> tuple[list[bytes], list[int]]:
    """An HF vocabulary llguidance cannot read itself: each id's decoded text."""
    backend = tokenizer.backend
    added = backend.get_added_tokens_decoder()
    tokens = [
        (added[i].content if i in added else backend.decode([i], skip_special_tokens=False)).encode()
        for i in range(tokenizer.vocab_size)
    ]
    return tokens, [i for i, token in added.items() if token.special]


def spelled_vocab(tokenizer: Tokenizer, vocab_size: int) -> SpelledVocab:
    if isinstance(tokenizer, HFTokenizer):
        tokens, special = _decoded(tokenizer)
    elif isinstance(tokenizer, SentencePieceTokenizer | TekkenTokenizer):
        tokens, special = tokenizer.piece_bytes()
    else:
        raise ValueError(f"structured output does not support {type(tokenizer).__name__} vocabularies")
    eos = tokenizer.special.eos_ids[0] if tokenizer.special.eos_ids else None
    return SpelledVocab(tokens, special, vocab_size, tokenizer.encode_exact, eos, tokenizer.special.bos_id)


def grammar_tokenizer(tokenizer: Tokenizer, vocab_size: int) -> LLTokenizer:
    """``vocab_size`` is the model's (the logits' width), which may exceed the tokenizer's."""
    eos: Sequence[int] = list(tokenizer.special.eos_ids)
    if isinstance(tokenizer, HFTokenizer):
        try:
            return LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size, eos_token=list(eos))
        except ValueError:  # "can't determine decoder type"
            pass
    vocab = spelled_vocab(tokenizer, vocab_size)
    return LLTokenizer(TokenizerWrapper(vocab), n_vocab=vocab_size, eos_token=list(eos))
