"""Find and build the tokenizer that belongs to a checkpoint (directory or GGUF file)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as RustTokenizer

from model.config import CheckpointError
from model.loader import find_gguf
from model.loader.gguf_format import GGUFFile
from server.chat_template import MISTRAL_TEMPLATE, ChatTemplate
from server.mistral_chat import MistralCommonChat
from server.tokenizer import SpecialTokens, Tokenizer
from server.tokenizer_gguf import gguf_tokenizer
from server.tokenizer_hf import HFTokenizer
from server.tokenizer_spm import SentencePieceTokenizer
from server.tokenizer_tekken import TekkenTokenizer


def load_tokenizer(path: Path) -> Tokenizer:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir() and (path / "config.json").exists():
        return _hf_directory(path)
    if path.is_dir() and (path / "params.json").exists():
        return _mistral_directory(path)
    gguf = find_gguf(path)
    if gguf is None:
        raise CheckpointError(f"{path}: no tokenizer found (expected tokenizer.json, tokenizer.model* or a .gguf file)")
    return gguf_tokenizer(GGUFFile(gguf).metadata, str(gguf))


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read JSON ({exc})") from None
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _template_source(directory: Path, tokenizer_config: dict[str, Any]) -> str | None:
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.exists():
        return jinja_file.read_text()
    source = tokenizer_config.get("chat_template")
    if isinstance(source, list):  # named templates: take "default"
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default") or next(iter(named.values()), None)
    return source if isinstance(source, str) else None


def _hf_directory(directory: Path) -> Tokenizer:
    model_config = _read_json(directory / "config.json")
    tokenizer_config = _read_json(directory / "tokenizer_config.json")
    source = _template_source(directory, tokenizer_config)
    if source is None and model_config.get("model_type") == "mistral":
        source = MISTRAL_TEMPLATE
    template = ChatTemplate(source) if source else None
    generation_eos = _read_json(directory / "generation_config.json").get("eos_token_id", [])
    extra_eos = generation_eos if isinstance(generation_eos, list) else [generation_eos]

    if (directory / "tokenizer.json").exists():
        backend = RustTokenizer.from_file(str(directory / "tokenizer.json"))
        bos_token = _token_text(tokenizer_config.get("bos_token"))
        eos_token = _token_text(tokenizer_config.get("eos_token"))
        bos_id = backend.token_to_id(bos_token) if bos_token else model_config.get("bos_token_id")
        eos_id = backend.token_to_id(eos_token) if eos_token else model_config.get("eos_token_id")
        eos_ids = tuple(dict.fromkeys(i for i in [eos_id, *extra_eos] if isinstance(i, int)))
        return HFTokenizer(backend, SpecialTokens(bos_id, eos_ids, bos_token, eos_token), template)
    spm_file = directory / "tokenizer.model"
    if spm_file.exists():
        tokenizer = SentencePieceTokenizer.from_file(
            str(spm_file), add_bos=bool(tokenizer_config.get("add_bos_token", True)), chat_template=template
        )
        return tokenizer
    if (directory / "tekken.json").exists():
        return TekkenTokenizer(directory / "tekken.json")
    raise CheckpointError(f"{directory}: no tokenizer.json, tokenizer.model or tekken.json")


def _mistral_directory(directory: Path) -> Tokenizer:
    """Mistral's layout: ``tekken.json`` (Nemo and later) or the newest ``tokenizer.model.v*``."""
    if (directory / "tekken.json").exists():
        return TekkenTokenizer(directory / "tekken.json")
    candidates = sorted(directory.glob("tokenizer.model*"), key=lambda p: p.name)
    if not candidates:
        raise CheckpointError(f"{directory}: no tekken.json or tokenizer.model* file")
    # the file's suffix (v1 bare, .v3, .v7) names its instruct format: mistral-common builds the prompts
    return SentencePieceTokenizer.from_file(str(candidates[-1]), add_bos=True,
                                            chat_encoder=MistralCommonChat(candidates[-1]))  # fmt: skip
