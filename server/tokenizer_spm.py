"""SentencePiece tokenizers: ``tokenizer.model`` files (Llama, Mistral v1-v7) and GGUF ``llama`` vocabularies.

SentencePiece never matches control pieces (``<s>``, ``[INST]``...) in text, so
``encode`` splits the text on them first. Like Hugging Face's ``legacy=False``
behaviour, only the text at the very start gets SentencePiece's dummy-prefix space;
a segment right after a control piece is encoded as written.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import cached_property

from sentencepiece import SentencePieceProcessor
from sentencepiece import sentencepiece_model_pb2 as spm_pb2

from server.chat_template import ChatTemplate
from server.tokenizer import ChatEncoder, SpecialTokens, Tokenizer

CONTROL = spm_pb2.ModelProto.SentencePiece.CONTROL


class SentencePieceTokenizer(Tokenizer):
    def __init__(
        self,
        proto: spm_pb2.ModelProto,
        *,
        add_bos: bool,
        chat_template: ChatTemplate | None,
        extra_eos_ids: Sequence[int] = (),
        chat_encoder: ChatEncoder | None = None,
    ) -> None:
        self._sp = SentencePieceProcessor(model_proto=proto.SerializeToString())
        no_prefix = spm_pb2.ModelProto()
        no_prefix.CopyFrom(proto)
        no_prefix.normalizer_spec.add_dummy_prefix = False
        self._sp_no_prefix = SentencePieceProcessor(model_proto=no_prefix.SerializeToString())
        self._control = {p.piece: i for i, p in enumerate(proto.pieces) if p.type == CONTROL}
        self._control_ids = frozenset(self._control.values())
        pattern = "|".join(re.escape(piece) for piece in sorted(self._control, key=len, reverse=True))
        self._split = re.compile(f"({pattern})") if pattern else None
        self.add_bos = add_bos
        bos, eos = self._sp.bos_id(), self._sp.eos_id()
        eos_ids = tuple(dict.fromkeys([*([eos] if eos >= 0 else []), *extra_eos_ids]))
        super().__init__(
            SpecialTokens(
                bos_id=bos if bos >= 0 else None,
                eos_ids=eos_ids,
                bos_token=self._sp.id_to_piece(bos) if bos >= 0 else None,
                eos_token=self._sp.id_to_piece(eos) if eos >= 0 else None,
            ),
            chat_template,
            chat_encoder,
        )

    @classmethod
    def from_file(
        cls,
        path: str,
        *,
        add_bos: bool = True,
        chat_template: ChatTemplate | None = None,
        chat_encoder: ChatEncoder | None = None,
    ) -> SentencePieceTokenizer:
        proto = spm_pb2.ModelProto()
        with open(path, "rb") as f:
            proto.ParseFromString(f.read())
        return cls(proto, add_bos=add_bos, chat_template=chat_template, chat_encoder=chat_encoder)

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids: list[int] = []
        if add_special_tokens and self.add_bos and self.special.bos_id is not None:
            ids.append(self.special.bos_id)
        segments = self._split.split(text) if self._split else [text]
        for index, segment in enumerate(segments):
            if segment in self._control:
                ids.append(self._control[segment])
            elif segment:
                processor = self._sp if index == 0 else self._sp_no_prefix
                ids.extend(processor.encode(segment))
        return ids

    def encode_exact(self, text: str) -> list[int]:
        return list(self._sp_no_prefix.encode(text))

    @property
    def special_ids(self) -> frozenset[int]:
        return self._control_ids

    @cached_property
    def max_token_bytes(self) -> int:
        return max(1, max(len(piece) for piece in self.piece_bytes()[0]))

    def piece_bytes(self) -> tuple[list[bytes], list[int]]:
        """Each id's bytes (``▁`` a space, ``<0xNN>`` that byte) and the special (control, unknown) ids."""
        sp = self._sp
        tokens: list[bytes] = []
        special: list[int] = []
        for i in range(sp.get_piece_size()):
            piece = sp.id_to_piece(i)
            if sp.is_byte(i):
                tokens.append(bytes([int(piece[3:5], 16)]))
            else:
                tokens.append(piece.replace("\u2581", " ").encode())
                if sp.is_control(i) or sp.is_unknown(i):
                    special.append(i)
        return tokens, special

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        if skip_special_tokens:
            return str(self._sp.decode([i for i in ids if i not in self._control_ids]))
        pieces: list[str] = []
        run: list[int] = []
        for token in ids:
            if token in self._control_ids:
                pieces.append(self._sp.decode(run))
                pieces.append(self._sp.id_to_piece(token))
                run = []
            else:
                run.append(token)
        pieces.append(self._sp.decode(run))
        return "".join(pieces)
