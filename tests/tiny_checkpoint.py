"""A tiny random checkpoint in Hugging Face layout with a character-level tokenizer.

Servers on it start in seconds, so end-to-end tests can run many of them. Token ids:
0 <unk>, 1 <s>, 2 </s>, then one id per character of ``CHARACTERS``.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models

from tests.hf_reference import TinySpec, build_hf_model, save_hf_model

CHARACTERS = [chr(c) for c in range(32, 127)] + list("\néèàüöç日本語中文한국😀🎉€£¥§°±×÷αβγδ")
SPEC = TinySpec("served", heads=4, kv_heads=2, window=None, vocab=128)
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<s>' if loop.first else '' }}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def write_tokenizer(directory: Path) -> None:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {c: 3 + i for i, c in enumerate(CHARACTERS)}
    assert len(vocab) <= SPEC.vocab
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHAT_TEMPLATE})
    )


def write_tiny_checkpoint(directory: Path, max_positions: int = 512, spec: TinySpec = SPEC) -> Path:
    save_hf_model(build_hf_model(spec, max_positions=max_positions), directory)
    write_tokenizer(directory)
    return directory
