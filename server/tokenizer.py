"""The tokenizer interface the server and CLI use, whatever backs it.

Implementations: ``HFTokenizer`` (``tokenizer.json`` through Hugging Face ``tokenizers``,
also byte-level BPE vocabularies embedded in GGUF) and ``SentencePieceTokenizer``
(``.model`` files, also sentencepiece vocabularies embedded in GGUF).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from server.chat_template import ChatTemplate, Message


@dataclass(frozen=True)
class SpecialTokens:
    bos_id: int | None
    eos_ids: tuple[int, ...]  # every id that ends a generation (EOS, chat end-of-turn)
    bos_token: str | None  # text forms, as chat templates expect them
    eos_token: str | None


class ChatEncoder(Protocol):
    """Chat prompts built by a library rather than a template (``server.mistral_chat``)."""

    version: str  # the instruct format's version (mistral-common's: v1, v3, v7, v11, v13, ...)

    def encode(
        self, messages: Sequence[Message], add_generation_prompt: bool = True, tools: Sequence[Message] | None = None
    ) -> list[int]: ...


class Tokenizer(ABC):
    def __init__(
        self, special: SpecialTokens, chat_template: ChatTemplate | None, chat_encoder: ChatEncoder | None = None
    ) -> None:
        """Chat prompts come from ``chat_encoder`` when given (Mistral-layout tokenizers), else
        from ``chat_template``."""
        self.special = special
        self.chat_template = chat_template
        self.chat_encoder = chat_encoder

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abstractmethod
    def max_token_bytes(self) -> int:
        """The longest token's text in bytes (special tokens spelled out; an upper bound is fine):
        a text more than ``context x max_token_bytes`` long cannot fit the context."""

    @property
    def instruct_version(self) -> str | None:
        """Mistral's instruct format version where a library builds the prompts, else None."""
        return self.chat_encoder.version if self.chat_encoder is not None else None

    @abstractmethod
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; special-token strings inside it become their ids.

        ``add_special_tokens`` adds what the model expects around a prompt (BOS).
        """

    @abstractmethod
    def encode_exact(self, text: str) -> list[int]:
        """Ids whose pieces spell exactly ``text`` as ``piece_bytes`` gives them: no BOS, no
        dummy-prefix space, special-token strings left as text. What a grammar matcher gets when it
        asks how the model would write some text (``server.grammar_vocab``)."""

    @abstractmethod
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    @property
    @abstractmethod
    def special_ids(self) -> frozenset[int]:
        """Control tokens: never produced by encoding text, dropped by ``decode`` unless kept."""

    def special_id(self, text: str) -> int | None:
        """The id of the special token spelled ``text`` (``[TOOL_CALLS]``), or None."""
        ids = self.encode(text, add_special_tokens=False)
        return ids[0] if len(ids) == 1 and ids[0] in self.special_ids else None

    def render_chat(
        self, messages: Sequence[Message], add_generation_prompt: bool = True, tools: Sequence[Message] | None = None
    ) -> str:
        if self.chat_encoder is not None:  # the prompt's ids as text, special tokens spelled out
            return self.decode(self.encode_chat(messages, add_generation_prompt, tools), skip_special_tokens=False)
        if self.chat_template is None:
            raise ValueError("this model has no chat template; send a plain prompt instead of messages")
        return self.chat_template.render(
            messages,
            bos_token=self.special.bos_token or "",
            eos_token=self.special.eos_token or "",
            add_generation_prompt=add_generation_prompt,
            tools=tools,
        )

    def encode_chat(
        self, messages: Sequence[Message], add_generation_prompt: bool = True, tools: Sequence[Message] | None = None
    ) -> list[int]:
        """The rendered template already holds any BOS text, so nothing more is added."""
        if self.chat_encoder is not None:
            return self.chat_encoder.encode(messages, add_generation_prompt, tools)
        return self.encode(self.render_chat(messages, add_generation_prompt, tools), add_special_tokens=False)
