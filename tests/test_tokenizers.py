"""Tokenizers of every kind: reference ids, exact round trips, GGUF vocabularies, chat templates."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import mistral_common
import pytest
import sentencepiece

from server.chat_template import MISTRAL_TEMPLATE, TOOL_PROMPT, ChatTemplate, ChatTemplateError
from server.tokenizer import Tokenizer
from server.tokenizer_loader import load_tokenizer
from server.tokenizer_spm import SentencePieceTokenizer

MISTRAL_DATA = Path(mistral_common.__file__).parent / "data"
V1 = MISTRAL_DATA / "tokenizer.model.v1"
V3 = MISTRAL_DATA / "mistral_instruct_tokenizer_240323.model.v3"
TEXTS = [
    "What is grouped query attention",
    "héllo wörld, ça va? Ñandú à la crème brûlée",
    "emoji 😀👍🏽 and flags 🇫🇷🇯🇵, a family 👨‍👩‍👧",
    "日本語のテキストと中文和한국어",
    "  leading spaces\nand\ttabs\n\n  trailing  ",
    "numbers 1234567 and 3.14159, code: def f(x): return x**2",
    "Γειά σου κόσμε — «quotes» ‘single’ “double”",
]
SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="module")
def gguf_llama_vocab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Mistral v1 vocabulary written into a GGUF the way llama.cpp's converter does."""
    sp = sentencepiece.SentencePieceProcessor(model_file=str(V1))
    path = tmp_path_factory.mktemp("gguf") / "vocab.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    size = sp.get_piece_size()
    writer.add_token_list([sp.id_to_piece(i) for i in range(size)])
    writer.add_token_scores([sp.get_score(i) for i in range(size)])
    types = []
    for i in range(size):
        if sp.is_unknown(i):
            types.append(gguf.TokenType.UNKNOWN)
        elif sp.is_control(i):
            types.append(gguf.TokenType.CONTROL)
        elif sp.is_byte(i):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    writer.add_token_types(types)
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    writer.add_add_bos_token(True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def transformers_smollm(default_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """transformers' own conversion of the default GGUF's tokenizer, also saved as tokenizer.json."""
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(default_model_path.parent, gguf_file=default_model_path.name)
    directory = tmp_path_factory.mktemp("smollm_hf")
    reference.save_pretrained(directory)
    (directory / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return {"reference": reference, "directory": directory}


def tokenizer_of_kind(kind: str, request: pytest.FixtureRequest) -> Tokenizer:
    if kind == "sentencepiece-v1":
        return SentencePieceTokenizer.from_file(str(V1))
    if kind == "sentencepiece-v3":
        return SentencePieceTokenizer.from_file(str(V3))
    if kind == "gguf-llama":
        return load_tokenizer(request.getfixturevalue("gguf_llama_vocab"))
    if kind == "gguf-gpt2":
        return load_tokenizer(request.getfixturevalue("default_model_path"))
    return load_tokenizer(request.getfixturevalue("transformers_smollm")["directory"])


def test_mistral_v1_reference_ids() -> None:
    tokenizer = SentencePieceTokenizer.from_file(str(V1))
    assert tokenizer.encode("What is grouped query attention") == [1, 1824, 349, 2071, 286, 5709, 4501]


@pytest.mark.parametrize("kind", ["sentencepiece-v1", "sentencepiece-v3", "gguf-llama", "gguf-gpt2", "tokenizer-json"])
@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_round_trip_is_exact(kind: str, text: str, request: pytest.FixtureRequest) -> None:
    tokenizer = tokenizer_of_kind(kind, request)
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_gguf_llama_vocab_encodes_like_sentencepiece(text: str, gguf_llama_vocab: Path) -> None:
    original = sentencepiece.SentencePieceProcessor(model_file=str(V1))
    rebuilt = load_tokenizer(gguf_llama_vocab)
    assert rebuilt.encode(text) == [original.bos_id(), *original.encode(text)]
    assert rebuilt.encode(text, add_special_tokens=False) == original.encode(text)


@pytest.mark.parametrize("text", [*TEXTS, "<|im_start|>user\nHi<|im_end|>\n", "x    y\n\n\n\tz 00012"])
def test_gguf_gpt2_vocab_encodes_like_transformers(
    text: str, default_model_path: Path, transformers_smollm: dict[str, Any]
) -> None:
    expected = transformers_smollm["reference"].encode(text)
    assert load_tokenizer(default_model_path).encode(text) == expected
    assert load_tokenizer(transformers_smollm["directory"]).encode(text) == expected


def test_smollm_pre_tokenizer_isolates_every_numeric_character(default_model_path: Path) -> None:
    """llama.cpp's ``smollm`` pre-tokenizer splits each \\p{N} character (SmolLM's own tokenizer.json
    does the same with Digits(individual_digits=True)); transformers' GGUF conversion drops that
    split, which only shows for non-ASCII numerals, so they are checked here instead."""
    tokenizer = load_tokenizer(default_model_path)
    ids = tokenizer.encode("x ²³")
    assert len(ids) == 4  # "x", " ", "²", "³": no merge crosses a numeric character
    assert tokenizer.decode(ids) == "x ²³"


def test_special_token_text_becomes_its_id(default_model_path: Path) -> None:
    tokenizer = load_tokenizer(default_model_path)
    ids = tokenizer.encode("<|im_start|>user")
    assert ids[0] == 1
    assert tokenizer.decode(ids) == "user"
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<|im_start|>user"


def test_default_model_special_tokens(default_model_path: Path) -> None:
    tokenizer = load_tokenizer(default_model_path)
    assert tokenizer.special.eos_ids == (2,)
    assert tokenizer.special.eos_token == "<|im_end|>"
    assert tokenizer.encode("Once upon a time") == [6403, 1980, 253, 655]  # no BOS: add_bos_token is false


MESSAGES = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "What is GQA?"},
]


def test_mistral_fallback_template_renders_inst_format() -> None:
    template = ChatTemplate(MISTRAL_TEMPLATE)
    rendered = template.render(MESSAGES, bos_token="<s>", eos_token="</s>")
    assert rendered == "<s>[INST] Hi [/INST] Hello!</s>[INST] What is GQA? [/INST]"
    with_system = template.render(
        [{"role": "system", "content": "Be brief."}, *MESSAGES[:1]], bos_token="<s>", eos_token="</s>"
    )
    assert with_system == "<s>[INST] Be brief.\n\nHi [/INST]"


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "assistant", "content": "first"}],
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        [{"role": "tool", "content": "x"}],
    ],
    ids=["assistant_first", "user_twice", "unknown_role"],
)
def test_mistral_template_rejects_bad_conversations(messages: list[dict[str, str]]) -> None:
    with pytest.raises(ChatTemplateError):
        ChatTemplate(MISTRAL_TEMPLATE).render(messages, bos_token="<s>", eos_token="</s>")


def test_mistral_v3_chat_uses_control_tokens() -> None:
    tokenizer = SentencePieceTokenizer.from_file(str(V3), chat_template=ChatTemplate(MISTRAL_TEMPLATE))
    ids = tokenizer.encode_chat(MESSAGES)
    assert ids[:2] == [1, 3]  # <s> [INST]
    assert ids.count(3) == 2 and ids.count(4) == 2 and ids.count(2) == 1  # two turns, one </s>
    assert tokenizer.decode(ids, skip_special_tokens=False).startswith("<s>[INST]")


def test_smollm_chatml_template_from_gguf_and_tokenizer_config(
    default_model_path: Path, transformers_smollm: dict[str, Any]
) -> None:
    expected = (
        f"<|im_start|>system\n{SMOLLM_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nWhat is GQA?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert load_tokenizer(default_model_path).render_chat(MESSAGES) == expected
    assert load_tokenizer(transformers_smollm["directory"]).render_chat(MESSAGES) == expected
    reference = transformers_smollm["reference"].apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=True
    )
    assert reference == expected


def test_chat_encoding_matches_transformers(default_model_path: Path, transformers_smollm: dict[str, Any]) -> None:
    reference = transformers_smollm["reference"].apply_chat_template(
        MESSAGES, tokenize=True, add_generation_prompt=True
    )
    if not isinstance(reference, list):  # a BatchEncoding in transformers 5
        reference = reference["input_ids"]
    assert load_tokenizer(default_model_path).encode_chat(MESSAGES) == list(reference)


TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {"name": "add", "description": "Add.", "parameters": {"type": "object"}}}
]
CALL: dict[str, Any] = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": {"a": 1}}}


def test_mistral_template_renders_tools_in_the_v3_format() -> None:
    messages: list[dict[str, Any]] = [
        *MESSAGES,
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "content": "2", "tool_call_id": "c1"},
    ]
    rendered = ChatTemplate(MISTRAL_TEMPLATE).render(messages, bos_token="<s>", eos_token="</s>", tools=TOOLS)
    assert rendered == (
        "<s>[INST] Hi [/INST] Hello!</s>"
        '[AVAILABLE_TOOLS] [{"type": "function", "function": {"name": "add", "description": "Add.", '
        '"parameters": {"type": "object"}}}][/AVAILABLE_TOOLS][INST] What is GQA? [/INST]'
        '[TOOL_CALLS] [{"name": "add", "arguments": {"a": 1}, "id": "c1"}]</s>'
        '[TOOL_RESULTS] {"content": "2", "call_id": "c1"}[/TOOL_RESULTS]'
    )
    with pytest.raises(ChatTemplateError, match="a tool message must follow an assistant message with tool_calls"):
        ChatTemplate(MISTRAL_TEMPLATE).render([*MESSAGES, {"role": "tool", "content": "x", "tool_call_id": ""}],
                                              bos_token="<s>", eos_token="</s>")  # fmt: skip


def test_a_template_that_takes_tools_gets_them_as_they_are() -> None:
    template = ChatTemplate("{% for t in tools %}{{ t.function.name }};{% endfor %}{{ messages[-1].content }}")
    assert template.takes_tools
    assert template.render(MESSAGES, bos_token="", eos_token="", tools=TOOLS) == "add;What is GQA?"


def test_a_template_without_tools_gets_them_described_in_the_last_user_turn() -> None:
    template = ChatTemplate("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}")
    assert not template.takes_tools
    messages: list[dict[str, Any]] = [*MESSAGES, {"role": "assistant", "content": "", "tool_calls": [CALL]}]
    rendered = template.render(messages, bos_token="", eos_token="", tools=TOOLS)
    described = '{"name": "add", "description": "Add.", "parameters": {"type": "object"}}'
    assert rendered == (
        "<user>Hi<assistant>Hello!<user>What is GQA?"
        + TOOL_PROMPT.format(tools=described)
        + '<assistant>[{"name": "add", "arguments": {"a": 1}}]'
    )


@pytest.mark.parametrize(
    ("shipped", "name"),
    [
        ("tokenizer.model.v1", "tokenizer.model.v1"),
        ("mistral_instruct_tokenizer_240323.model.v3", "tokenizer.model.v3"),
        ("mistral_instruct_tokenizer_241114.model.v7", "tokenizer.model.v7"),
    ],
    ids=["v1", "v3", "v7"],
)
def test_mistral_layout_chat_equals_encode_chat_completion(shipped: str, name: str, tmp_path: Path) -> None:
    """A Mistral checkpoint's SentencePiece file names its instruct version; the prompt is
    mistral-common's for that version (v3: the system prompt in the last user turn; v7:
    ``[SYSTEM_PROMPT]``), where the generic ``[INST]`` template would only approximate it."""
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    (tmp_path / "params.json").write_text("{}")
    (tmp_path / name).write_bytes((MISTRAL_DATA / shipped).read_bytes())
    messages = [{"role": "system", "content": "Be brief."}, *MESSAGES]
    reference = MistralTokenizer.from_file(str(tmp_path / name))
    expected = reference.encode_chat_completion(ChatCompletionRequest.model_validate({"messages": messages})).tokens
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.encode_chat(messages) == expected
    text = tokenizer.render_chat(messages)
    assert text.startswith("<s>")
    assert ("[SYSTEM_PROMPT]" in text) == (name.endswith("v7"))
    assert tokenizer.encode("What is GQA?", add_special_tokens=False) == reference.instruct_tokenizer.tokenizer.encode(
        "What is GQA?", bos=False, eos=False
    )
