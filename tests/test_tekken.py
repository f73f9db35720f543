"""Tekken tokenizers against mistral-common: the same ids for multilingual, emoji and code texts,
exact round trips, and chat prompts equal to ``encode_chat_completion`` for the v3 files it ships
and v7 / v11 files built from the same vocabulary (mistral-common ships no v7 or v11 Tekken file)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mistral_common
import pytest
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.base import SpecialTokens
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from mistral_common.tokens.tokenizers.tekken import Tekkenizer

from model.config import CheckpointError
from server.grammar_vocab import grammar_tokenizer
from server.tokenizer_loader import load_tokenizer
from server.tokenizer_tekken import TekkenTokenizer
from tests.vocabularies import write_tekken

DATA = Path(mistral_common.__file__).parent / "data"
SHIPPED = [DATA / "tekken_240718.json", DATA / "tekken_240911.json"]
TEXTS = [
    "Hello, world! How are you today?",
    "Grüße aus München — ça va? Ñandú, año, façade.",
    "日本語のテキストと中文文本，还有한국어 문장。",
    "Привет, мир! Как дела? Ελληνικά γράμματα.",
    "مرحبا بالعالم — שלום עולם — नमस्ते दुनिया",
    "emoji 🤖👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 and ZWJ ❤️‍🔥",
    'def fib(n: int) -> int:\n    """Fibonacci."""\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n',
    '  leading spaces,\ttabs\t\tand\r\nCRLF\n\n\nnewlines; {"json": [1, 2.5e-3, null]}  ',
]


@pytest.fixture(scope="module", params=SHIPPED, ids=lambda p: p.stem)
def shipped(request: pytest.FixtureRequest) -> tuple[TekkenTokenizer, Tekkenizer]:
    path: Path = request.param
    return TekkenTokenizer(path), MistralTokenizer.from_file(str(path)).instruct_tokenizer.tokenizer


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_texts_match_mistral_common_ids_and_round_trip(shipped: tuple[TekkenTokenizer, Tekkenizer], text: str) -> None:
    ours, reference = shipped
    ids = ours.encode(text, add_special_tokens=False)
    assert ids == reference.encode(text, bos=False, eos=False)
    assert ours.encode(text) == [1, *ids]  # BOS
    assert ours.decode(ids) == text
    assert min(ids) >= ours.num_special_tokens == 1000


def test_vocabulary_and_special_tokens(shipped: tuple[TekkenTokenizer, Tekkenizer]) -> None:
    ours, reference = shipped
    assert ours.vocab_size == reference.n_words == 131072
    assert (ours.special.bos_id, ours.special.eos_ids) == (reference.bos_id, (reference.eos_id,))
    inst = reference.get_special_token("[INST]")
    # a hand-written instruct prompt's control strings become control tokens (as with SentencePiece)
    assert ours.encode("[INST]Hi[/INST]", add_special_tokens=False) == [
        inst, *reference.encode("Hi", bos=False, eos=False), reference.get_special_token("[/INST]")
    ]  # fmt: skip
    assert ours.decode([1, inst, 2], skip_special_tokens=False) == "<s>[INST]</s>"
    assert ours.decode([1, inst, 2]) == ""


@pytest.fixture(scope="module", params=["v3", "v7", "v11"])
def versioned(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tekken.json of that instruct version: the shipped v3 file, or its vocabulary with the
    version and special-token list of v7 / v11."""
    if request.param == "v3":
        return DATA / "tekken_240718.json"
    path = tmp_path_factory.mktemp(request.param) / "tekken.json"
    write_tekken(DATA / "tekken_240718.json", request.param, path)
    return path


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CONVERSATIONS: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]] | None]] = {
    "single_turn": ([{"role": "user", "content": "Bonjour! Qu'est-ce que Tekken? 🤖"}], None),
    "system_multi_turn": (
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name a prime."},
            {"role": "assistant", "content": "7"},
            {"role": "user", "content": "Another, in 日本語?"},
        ],
        None,
    ),
    "tools": (
        [
            {"role": "system", "content": "Use tools when useful."},
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": "abc123XYZ",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                    },
                ],
            },
            {"role": "tool", "content": '{"celsius": 21}', "tool_call_id": "abc123XYZ", "name": "get_weather"},
            {"role": "user", "content": "And in Lyon?"},
        ],
        [WEATHER],
    ),
}


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_chat_prompt_equals_encode_chat_completion(versioned: Path, name: str) -> None:
    messages, tools = CONVERSATIONS[name]
    ours = TekkenTokenizer(versioned)
    reference = MistralTokenizer.from_file(str(versioned))
    request = ChatCompletionRequest.model_validate(
        {"messages": [_reference_message(m) for m in messages], "tools": tools}
    )
    expected = reference.encode_chat_completion(request).tokens
    assert ours.encode_chat(messages, tools=tools) == expected
    text = ours.render_chat(messages, tools=tools)
    assert text.startswith("<s>") and text.endswith("[/INST]")
    if ours.version != "v3":
        assert "[SYSTEM_PROMPT]" in text or "system" not in [m["role"] for m in messages]


def _reference_message(message: dict[str, Any]) -> dict[str, Any]:
    """The message as mistral-common's own request takes it (arguments as JSON text, no empty content)."""
    out = dict(message)
    if "tool_calls" in out:
        out["tool_calls"] = [
            {**c, "function": {**c["function"], "arguments": json.dumps(c["function"]["arguments"])}}
            for c in out["tool_calls"]
        ]
        out["content"] = None
    return out


def test_bad_chat_is_a_value_error_naming_the_problem() -> None:
    ours = TekkenTokenizer(DATA / "tekken_240718.json")
    with pytest.raises(ValueError, match="role"):
        ours.encode_chat([{"role": "narrator", "content": "x"}])


def test_mistral_layout_directory_uses_tekken_json(tmp_path: Path) -> None:
    (tmp_path / "params.json").write_text("{}")
    (tmp_path / "tekken.json").write_bytes((DATA / "tekken_240911.json").read_bytes())
    tokenizer = load_tokenizer(tmp_path)
    assert isinstance(tokenizer, TekkenTokenizer)
    assert tokenizer.encode(TEXTS[0], add_special_tokens=False) == TekkenTokenizer(DATA / "tekken_240911.json").encode(
        TEXTS[0], add_special_tokens=False
    )


def test_unknown_version_names_the_file_and_field(tmp_path: Path) -> None:
    data = json.loads((DATA / "tekken_240718.json").read_text())
    data["config"]["version"] = "v99"
    path = tmp_path / "tekken.json"
    path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError) as caught:
        TekkenTokenizer(path)
    assert str(caught.value) == f"{path}: unsupported Tekken version config.version='v99' (supported: v3, v7, v11, v13)"


def test_structured_output_reads_the_tekken_vocabulary() -> None:
    tokenizer = TekkenTokenizer(DATA / "tekken_240911.json")
    ll = grammar_tokenizer(tokenizer, tokenizer.vocab_size)
    ids = tokenizer.encode('{"a": 1}', add_special_tokens=False)
    assert ll.tokenize_str('{"a": 1}') == ids
    assert ll.decode_bytes(ids) == b'{"a": 1}'


_PRINTABLE = [*range(33, 127), *range(161, 173), *range(174, 256)]
_BYTE_CHARS = {b: chr(b) for b in _PRINTABLE} | {
    b: chr(256 + i) for i, b in enumerate(b for b in range(256) if b not in _PRINTABLE)
}


def _byte_level(data: bytes) -> str:
    """GPT-2's printable spelling of bytes (what GGUF ``gpt2`` vocabularies store)."""
    return "".join(_BYTE_CHARS[b] for b in data)


def gguf_metadata_of_tekken(path: Path) -> dict[str, Any]:
    """The tokenizer metadata llama.cpp's converter writes for a Tekken model (``gpt2`` model,
    ``tekken`` pre-tokenizer): special tokens first, then each rank's bytes, and the merges a
    tiktoken vocabulary implies (every split of a token into two tokens, in the token's rank order)."""
    import base64

    data = json.loads(path.read_text())
    specials = [s.value for s in SpecialTokens]
    num_special = data["config"]["default_num_special_tokens"]
    inner = data["config"]["default_vocab_size"] - num_special
    ranks = {base64.b64decode(t["token_bytes"]): t["rank"] for t in data["vocab"][:inner]}
    names = [str(t["token_str"].value) for t in Tekkenizer.DEPRECATED_SPECIAL_TOKENS]
    names += [f"<SPECIAL_{i}>" for i in range(len(names), num_special)]
    assert set(names[:20]) <= set(specials)
    merges = []
    for token, rank in ranks.items():
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        merges += [(rank, ranks[a], ranks[b], a, b) for a, b in splits]
    merges.sort(key=lambda m: m[:3])
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "tekken",
        "tokenizer.ggml.tokens": names + [_byte_level(t) for t in sorted(ranks, key=ranks.__getitem__)],
        "tokenizer.ggml.token_type": [3] * num_special + [1] * inner,  # CONTROL, NORMAL
        "tokenizer.ggml.merges": [f"{_byte_level(a)} {_byte_level(b)}" for *_, a, b in merges],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.add_bos_token": True,
    }


def test_gguf_tekken_vocabulary_matches_mistral_common() -> None:
    """A Nemo GGUF keeps Tekken as a ``gpt2`` vocabulary with the ``tekken`` pre-tokenizer: the same ids."""
    from server.tokenizer_gguf import gguf_tokenizer

    tokenizer = gguf_tokenizer(gguf_metadata_of_tekken(SHIPPED[1]), "nemo.gguf")
    reference = MistralTokenizer.from_file(str(SHIPPED[1])).instruct_tokenizer.tokenizer
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert ids == reference.encode(text, bos=False, eos=False), text
        assert tokenizer.decode(ids) == text
    assert tokenizer.encode(TEXTS[0])[0] == 1
