"""Incremental detokenization and stop strings with real tokenizers (byte-level BPE,
SentencePiece byte fallback, Tekken): deltas never split a character and always add up."""

from __future__ import annotations

from pathlib import Path

import mistral_common
import pytest

from server.detokenizer import IncrementalDetokenizer
from server.tokenizer import Tokenizer
from server.tokenizer_loader import load_tokenizer
from server.tokenizer_spm import SentencePieceTokenizer
from server.tokenizer_tekken import TekkenTokenizer

MISTRAL_V1 = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
TEKKEN = Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"


@pytest.fixture(scope="module", params=["byte-level-bpe", "sentencepiece", "tekken"])
def tokenizer(request: pytest.FixtureRequest, default_model_path: Path) -> Tokenizer:
    if request.param == "byte-level-bpe":
        return load_tokenizer(default_model_path)
    if request.param == "tekken":
        return TekkenTokenizer(TEKKEN)
    return SentencePieceTokenizer.from_file(str(MISTRAL_V1))


def stream(tokenizer: Tokenizer, prompt: str, output: str, **kwargs: object) -> tuple[list[str], str | None]:
    """Feed the tokens of ``output`` one by one; return the deltas and the matched stop string."""
    prompt_ids = tokenizer.encode(prompt)
    full = tokenizer.encode(prompt + output)
    assert full[: len(prompt_ids)] == prompt_ids
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, **kwargs)  # type: ignore[arg-type]
    deltas = []
    for token in full[len(prompt_ids) :]:
        update = detok.append(token)
        deltas.append(update.text)
        if update.stop is not None:
            return deltas, update.stop
    deltas.append(detok.flush())
    return deltas, None


def test_deltas_concatenate_to_the_text_and_never_split_a_character(tokenizer: Tokenizer) -> None:
    output = " Snow 雪 falls ❄️ on the café, 🏔️🇨🇭 — naïve façade."
    deltas, stop = stream(tokenizer, "Weather report:", output)
    assert stop is None
    assert "".join(deltas) == output
    assert all("\ufffd" not in d for d in deltas)
    assert sum(1 for d in deltas if d == "") > 0  # multi-token characters wait for their last byte


def pieces(tokenizer: Tokenizer, text: str) -> list[str]:
    return [tokenizer.decode([t]) for t in tokenizer.encode(text, add_special_tokens=False)]


def test_stop_string_split_across_two_tokens(tokenizer: Tokenizer) -> None:
    output = " The answer is forty-two. END OF STORY and more text"
    assert not any("END OF" in piece for piece in pieces(tokenizer, output))  # no token holds it whole
    deltas, stop = stream(tokenizer, "Q:", output, stop=["END OF"])
    assert stop == "END OF"
    assert "".join(deltas) == " The answer is forty-two. "


def test_stop_string_inside_a_single_token_followed_by_more_text(tokenizer: Tokenizer) -> None:
    output = " everything is wonderful today"
    assert any("onde" in piece and not piece.endswith("onde") for piece in pieces(tokenizer, output))
    deltas, stop = stream(tokenizer, "Say:", output, stop=["onde"])
    assert stop == "onde"
    assert "".join(deltas) == " everything is w"


def test_include_stop_string_in_output(tokenizer: Tokenizer) -> None:
    deltas, stop = stream(
        tokenizer, "Say:", " everything is wonderful today", stop=["onde"], include_stop_str_in_output=True
    )
    assert stop == "onde" and "".join(deltas) == " everything is wonde"


def test_emoji_split_across_tokens_as_a_stop_string(tokenizer: Tokenizer) -> None:
    output = " I love 🏔️ mountains and 🌊 seas"
    assert len(tokenizer.encode("🌊", add_special_tokens=False)) > 1  # byte tokens
    deltas, stop = stream(tokenizer, "Say:", output, stop=["🌊"])
    assert stop == "🌊"
    assert "".join(deltas) == " I love 🏔️ mountains and "
    assert all("\ufffd" not in d for d in deltas)


def test_text_that_may_begin_a_stop_string_is_held_back(tokenizer: Tokenizer) -> None:
    prompt_ids = tokenizer.encode("Count:")
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, stop=["STOP HERE"])
    text = ""
    for token in tokenizer.encode("Count: one two STOP")[len(prompt_ids) :]:
        update = detok.append(token)
        assert update.stop is None
        text += update.text
    assert text == " one two "  # " STOP" could still become "STOP HERE"
    assert detok.flush() == "STOP"  # the sequence ended for another reason: release it


def test_stop_strings_wait_for_min_tokens(tokenizer: Tokenizer) -> None:
    prompt_ids = tokenizer.encode("Go:")
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, stop=[" a"])
    tokens = tokenizer.encode("Go: a b a c")[len(prompt_ids) :]
    first = detok.append(tokens[0], allow_stop=False)
    assert first.stop is None
    text = first.text
    for token in tokens[1:]:
        update = detok.append(token)
        text += update.text
        if update.stop:
            break
    assert update.stop == " a" and text == " a b"


def test_fork_is_independent(tokenizer: Tokenizer) -> None:
    prompt_ids = tokenizer.encode("Hi")
    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    twin = detok.fork()
    a = "".join(detok.append(t).text for t in tokenizer.encode("Hi there")[len(prompt_ids) :]) + detok.flush()
    b = "".join(twin.append(t).text for t in tokenizer.encode("Hi you")[len(prompt_ids) :]) + twin.flush()
    assert (a, b) == (" there", " you")
