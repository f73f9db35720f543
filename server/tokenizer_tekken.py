"""Tekken tokenizers (``tekken.json``: Mistral Nemo, Small 3, Ministral, Pixtral), through mistral-common.

Tekken is tiktoken-style byte-level BPE: ``vocab`` holds base64 token bytes by rank, the ids
below ``default_num_special_tokens`` are special tokens (``<s>``, ``[INST]``, ...), and a
regular token's id is its rank plus that count. mistral-common's own ``Tekkenizer`` encodes and
decodes, so ids are its ids; chat requests go through its ``encode_chat_completion`` with the
instruct format of the file's ``version`` (v3: ``[INST]`` turns with the system prompt folded into
the last user turn; v7: ``[SYSTEM_PROMPT]``; v11 and later: tool calls as ``[TOOL_CALLS]name[ARGS]``).

Like the SentencePiece tokenizers here (and unlike mistral-common's ``encode``), text that spells a
special token (``[INST]``) in a plain prompt becomes that token, so hand-written instruct prompts
work; chat messages never do: mistral-common encodes their content as text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

from model.config import CheckpointError
from server.mistral_chat import MistralCommonChat
from server.tokenizer import SpecialTokens, Tokenizer

# Instruct formats mistral-serve renders through mistral-common (v1, v2 are SentencePiece-only)
SUPPORTED_VERSIONS = ("v3", "v7", "v11", "v13")


def _version(path: Path) -> str:
    """The file's ``config.version``, refused (one line naming file and field) unless supported."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read JSON ({exc})") from None
    config = data.get("config") if isinstance(data, dict) else None
    version = config.get("version") if isinstance(config, dict) else None
    if version not in SUPPORTED_VERSIONS:
        supported = ", ".join(SUPPORTED_VERSIONS)
        raise CheckpointError(f"{path}: unsupported Tekken version config.version={version!r} (supported: {supported})")
    return str(version)


class TekkenTokenizer(Tokenizer):
    def __init__(self, path: Path) -> None:
        self.version = _version(path)
        from mistral_common.tokens.tokenizers.tekken import SpecialTokenPolicy

        chat = MistralCommonChat(path)
        self._tekken = chat.tokenizer
        self._keep, self._ignore = SpecialTokenPolicy.KEEP, SpecialTokenPolicy.IGNORE
        self.num_special_tokens = int(self._tekken.num_special_tokens)
        self._special = {self._tekken.id_to_piece(i): i for i in range(self.num_special_tokens)}
        named = [s for s in self._special if not s.startswith("<SPECIAL_")]
        pattern = "|".join(re.escape(s) for s in sorted(named, key=len, reverse=True))
        self._split = re.compile(f"({pattern})")
        bos, eos = int(self._tekken.bos_id), int(self._tekken.eos_id)
        special = SpecialTokens(bos, (eos,), self._tekken.id_to_piece(bos), self._tekken.id_to_piece(eos))
        super().__init__(special, chat_template=None, chat_encoder=chat)

    @property
    def vocab_size(self) -> int:
        return int(self._tekken.n_words)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids: list[int] = [self.special.bos_id] if add_special_tokens and self.special.bos_id is not None else []
        for segment in self._split.split(text):
            if segment in self._special:
                ids.append(self._special[segment])
            elif segment:
                ids.extend(self._tekken.encode(segment, bos=False, eos=False))
        return ids

    def encode_exact(self, text: str) -> list[int]:
        return list(self._tekken.encode(text, bos=False, eos=False))

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset(range(self.num_special_tokens))

    @cached_property
    def max_token_bytes(self) -> int:
        return max(1, max(len(piece) for piece in self.piece_bytes()[0]))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        policy = self._ignore if skip_special_tokens else self._keep
        return str(self._tekken.decode(list(ids), special_token_policy=policy))

    def piece_bytes(self) -> tuple[list[bytes], list[int]]:
        """Each id's bytes (special tokens spelled out) and the special ids."""
        tekken = self._tekken
        tokens = [tekken.id_to_byte_piece(i, self._keep) for i in range(self.vocab_size)]
        return tokens, list(range(self.num_special_tokens))
