"""Tokenizers rebuilt from the vocabulary a GGUF file embeds (``tokenizer.ggml.*`` metadata).

``llama`` vocabularies become a SentencePiece BPE model proto (pieces, scores and
types map one to one, llama.cpp copied SentencePiece's type numbers); ``gpt2``
vocabularies become a byte-level BPE ``tokenizers.Tokenizer`` with the
pre-tokenizer llama.cpp associates with ``tokenizer.ggml.pre``.
"""

from __future__ import annotations

import logging
from typing import Any

from sentencepiece import sentencepiece_model_pb2 as spm_pb2
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as RustTokenizer

from model.config import CheckpointError
from server.chat_template import ChatTemplate
from server.tokenizer import SpecialTokens, Tokenizer
from server.tokenizer_hf import HFTokenizer
from server.tokenizer_spm import SentencePieceTokenizer

log = logging.getLogger(__name__)

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Tekken's (Mistral Nemo, Small 3, Ministral: the ``pattern`` of tekken.json)
_TEKKEN_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> regexes applied in order (each split isolates its matches)
_PRE_TOKENIZERS = {
    "default": [_GPT2_PATTERN],
    "gpt-2": [_GPT2_PATTERN],
    "smollm": [r"\p{N}", _GPT2_PATTERN],
    "starcoder": [r"\p{N}", _GPT2_PATTERN],
    "llama-bpe": [_LLAMA3_PATTERN],
    "tekken": [_TEKKEN_PATTERN],
}
# tiktoken-style vocabularies: a pre-token that is in the vocabulary is one token, merges or not
_WHOLE_WORDS = ("llama-bpe", "tekken")


def gguf_tokenizer(meta: dict[str, Any], path: str) -> Tokenizer:
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise CheckpointError(f"{path}: GGUF file has no embedded vocabulary (tokenizer.ggml.tokens)")
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    template_source = meta.get("tokenizer.chat_template")
    template = ChatTemplate(template_source) if template_source else None
    extra_eos = [meta[k] for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if k in meta]
    if kind == "llama":
        return SentencePieceTokenizer(
            _sentencepiece_proto(meta, tokens, types),
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", True)),
            chat_template=template,
            extra_eos_ids=extra_eos,
        )
    if kind == "gpt2":
        return _byte_level_bpe(meta, tokens, types, template, extra_eos)
    raise CheckpointError(f"{path}: unsupported GGUF tokenizer model {kind!r} (supported: llama, gpt2)")


def _sentencepiece_proto(meta: dict[str, Any], tokens: list[str], types: list[int]) -> spm_pb2.ModelProto:
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    proto = spm_pb2.ModelProto()
    for piece, score, kind in zip(tokens, scores, types, strict=True):
        entry = proto.pieces.add()
        entry.piece, entry.score, entry.type = piece, score, kind
    trainer = proto.trainer_spec
    trainer.model_type = spm_pb2.TrainerSpec.BPE
    trainer.vocab_size = len(tokens)
    trainer.byte_fallback = BYTE in types
    unknown = next((i for i, kind in enumerate(types) if kind == UNKNOWN), 0)
    defaults = {"unk": unknown, "bos": -1, "eos": -1, "pad": -1}
    for field, key in (("unk", "unknown"), ("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id", defaults[field])
        setattr(trainer, f"{field}_id", token_id)
        if 0 <= token_id < len(tokens):
            setattr(trainer, f"{field}_piece", tokens[token_id])
    normalizer = proto.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    return proto


def _byte_level_bpe(
    meta: dict[str, Any], tokens: list[str], types: list[int], template: ChatTemplate | None, extra_eos: list[int]
) -> Tokenizer:
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        log.warning("unknown GGUF pre-tokenizer %r, using the GPT-2 default", pre)
    patterns = _PRE_TOKENIZERS.get(pre, _PRE_TOKENIZERS["default"])
    backend = RustTokenizer(
        models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, ignore_merges=pre in _WHOLE_WORDS)
    )
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in patterns]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t == CONTROL]
    )
    backend.add_tokens(
        [AddedToken(tokens[i], special=False, normalized=False) for i, t in enumerate(types) if t == USER_DEFINED]
    )
    bos = meta.get("tokenizer.ggml.bos_token_id")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        from tokenizers.processors import TemplateProcessing

        backend.post_processor = TemplateProcessing(
            single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A $B", special_tokens=[(tokens[bos], bos)]
        )
    special = SpecialTokens(
        bos_id=bos,
        eos_ids=tuple(dict.fromkeys([*([eos] if eos is not None else []), *extra_eos])),
        bos_token=tokens[bos] if bos is not None else None,
        eos_token=tokens[eos] if eos is not None else None,
    )
    return HFTokenizer(backend, special, template)
