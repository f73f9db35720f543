"""Tiny random checkpoints with each kind of vocabulary the loaders accept, built from the files
users bring: mistral-common's own ``tokenizer.model.v1/.v3/.v7`` and Tekken files, the default
model's byte-level BPE vocabulary, and GGUF / ``tokenizer.json`` vocabularies written from them
the way converters write them (llama.cpp's for GGUF, transformers' for ``tokenizer.json``).

=================  ==========================================  =====================
kind               files                                       vocabulary (size)
=================  ==========================================  =====================
hf-bytelevel       config.json, tokenizer.json (SmolLM2 BPE)   byte-level BPE 49,152
hf-metaspace       config.json, tokenizer.json (transformers'  Metaspace + byte
                   conversion of Mistral's v3 .model)          fallback 32,768
hf-sentencepiece   config.json, tokenizer.model (v3)           SentencePiece 32,768
gguf-llama         .gguf, ``llama`` vocabulary from v3         SentencePiece 32,768
gguf-gpt2          .gguf, the default model's ``gpt2`` vocab   byte-level BPE 49,152
gguf-tekken        .gguf, ``gpt2`` + ``tekken`` pre-tokenizer  Tekken 131,072
mistral-v1/v3/v7   params.json, tokenizer.model.vN             SentencePiece 32,000/32,768
tekken-v7/v11/v13  params.json, tekken.json of that version    Tekken 131,072
=================  ==========================================  =====================
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import mistral_common
from gguf import GGMLQuantizationType as Q

from model.loader.gguf_format import GGUFFile
from server.chat_template import MISTRAL_TEMPLATE
from tests.checkpoint_writers import add_metadata, hf_state, write_gguf, write_mistral
from tests.hf_reference import TinySpec, build_hf_model, save_hf_model

DATA = Path(mistral_common.__file__).parent / "data"
V1 = DATA / "tokenizer.model.v1"
V3 = DATA / "mistral_instruct_tokenizer_240323.model.v3"
V7 = DATA / "mistral_instruct_tokenizer_241114.model.v7"
TEKKEN = DATA / "tekken_240911.json"
KINDS = (
    "hf-bytelevel", "hf-metaspace", "hf-sentencepiece", "gguf-llama", "gguf-gpt2", "gguf-tekken",
    "mistral-v1", "mistral-v3", "mistral-v7", "tekken-v7", "tekken-v11", "tekken-v13",
)  # fmt: skip
VOCAB_SIZES = {"hf-bytelevel": 49152, "gguf-gpt2": 49152, "gguf-tekken": 131072, "mistral-v1": 32000}


def vocab_size(kind: str) -> int:
    return VOCAB_SIZES.get(kind, 131072 if kind.startswith("tekken") else 32768)


def write_checkpoint(kind: str, root: Path, default_gguf: Path, spec: TinySpec | None = None) -> Path:
    """A tiny random model of ``spec`` (default: 2 layers, hidden 64) with ``kind``'s vocabulary
    under ``root``; returns what ``--model`` takes (a directory or a .gguf file)."""
    spec = spec or TinySpec(kind.replace("-", "_"), heads=4, kv_heads=2, vocab=vocab_size(kind))
    hf = build_hf_model(spec)
    hf_dir = save_hf_model(hf, root / "hf")
    if kind.startswith("hf-"):
        return write_vocabulary(kind, hf_dir, default_gguf)
    from model.loader import load_model

    config = load_model(hf_dir).config
    if kind.startswith("gguf-"):
        path = root / f"{kind}.gguf"
        write_gguf(hf_state(hf), config, path, Q.F32, gguf_vocabulary(kind, default_gguf))
        return path
    return write_vocabulary(kind, write_mistral(hf_state(hf), config, root / kind), default_gguf)


def write_vocabulary(kind: str, directory: Path, default_gguf: Path) -> Path:
    """``kind``'s tokenizer files in ``directory`` (a GGUF file there holds only the vocabulary),
    with the config file that tells the loader the layout when the directory has none; returns
    what ``load_tokenizer`` takes."""
    directory.mkdir(parents=True, exist_ok=True)
    if kind.startswith("gguf-"):
        path = directory / f"{kind}.gguf"
        writer = gguf.GGUFWriter(str(path), "llama")
        for key, value in gguf_vocabulary(kind, default_gguf).items():
            add_metadata(writer, key, value)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path
    if kind.startswith("hf-"):
        if not (directory / "config.json").exists():
            (directory / "config.json").write_text(json.dumps({"model_type": "mistral"}))
        write_hf_vocabulary(kind, directory, default_gguf)
        return directory
    if not (directory / "params.json").exists():
        (directory / "params.json").write_text("{}")
    if kind.startswith("mistral-"):
        source = {"mistral-v1": V1, "mistral-v3": V3, "mistral-v7": V7}[kind]
        shutil.copy(source, directory / f"tokenizer.model.{kind.removeprefix('mistral-')}")
    else:
        write_tekken(TEKKEN, kind.removeprefix("tekken-"), directory / "tekken.json")
    return directory


def write_tekken(source: Path, version: str, path: Path) -> None:
    """``source``'s vocabulary as a tekken.json of ``version``, with the special-token list Tekken
    files carry since v7 (the 20 of old, then [ARGS], [CALL_ID], ...); [THINK] and [/THINK] only
    from v13, as Mistral's files have them."""
    from mistral_common.tokens.tokenizers.base import SpecialTokens
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    data = json.loads(source.read_text())
    data["config"]["version"] = version
    names = [str(t["token_str"].value) for t in Tekkenizer.DEPRECATED_SPECIAL_TOKENS]
    thinking = {SpecialTokens.begin_think.value, SpecialTokens.end_think.value}
    for token in SpecialTokens:
        if token.value not in names:
            think = token.value in thinking
            names.append(token.value if not think or int(version[1:]) >= 13 else f"<SPECIAL_{len(names)}>")
    data["special_tokens"] = [{"rank": i, "token_str": name, "is_control": True} for i, name in enumerate(names)]
    path.write_text(json.dumps(data))


def write_hf_vocabulary(kind: str, directory: Path, default_gguf: Path) -> None:
    if kind == "hf-bytelevel":
        from server.tokenizer_loader import load_tokenizer

        smollm = load_tokenizer(default_gguf)
        smollm.backend.save(str(directory / "tokenizer.json"))  # type: ignore[attr-defined]
        template = GGUFFile(default_gguf).metadata["tokenizer.chat_template"]
        config = {"bos_token": smollm.special.bos_token, "eos_token": smollm.special.eos_token,
                  "chat_template": template}  # fmt: skip
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
    elif kind == "hf-metaspace":
        converted = convert_to_tokenizer_json(V3, directory.parent / "convert")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(converted / name, directory / name)
    else:
        shutil.copy(V3, directory / "tokenizer.model")
        (directory / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True}))


def convert_to_tokenizer_json(model_file: Path, work: Path) -> Path:
    """transformers' own conversion of a SentencePiece file (LlamaTokenizer, as Mistral's HF repos
    were made): a ``tokenizer.json`` with a Metaspace pre-tokenizer and byte fallback."""
    from transformers import AutoTokenizer

    source = work / "source"
    source.mkdir(parents=True)
    shutil.copy(model_file, source / "tokenizer.model")
    config = {"tokenizer_class": "LlamaTokenizer", "legacy": True, "add_bos_token": True,
              "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}  # fmt: skip
    (source / "tokenizer_config.json").write_text(json.dumps(config))
    out = work / "converted"
    AutoTokenizer.from_pretrained(str(source)).save_pretrained(str(out))
    return out


def gguf_vocabulary(kind: str, default_gguf: Path) -> dict[str, object]:
    """The ``tokenizer.*`` metadata llama.cpp's converter writes for this vocabulary."""
    if kind == "gguf-gpt2":
        return {k: v for k, v in GGUFFile(default_gguf).metadata.items() if k.startswith("tokenizer.")}
    if kind == "gguf-tekken":
        from tests.test_tekken import gguf_metadata_of_tekken

        return {**gguf_metadata_of_tekken(TEKKEN), "tokenizer.chat_template": MISTRAL_TEMPLATE}
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(V3))
    size = sp.get_piece_size()
    types = [
        gguf.TokenType.UNKNOWN if sp.is_unknown(i)
        else gguf.TokenType.CONTROL if sp.is_control(i)
        else gguf.TokenType.BYTE if sp.is_byte(i)
        else gguf.TokenType.NORMAL
        for i in range(size)
    ]  # fmt: skip
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(size)],
        "tokenizer.ggml.scores": [sp.get_score(i) for i in range(size)],
        "tokenizer.ggml.token_type": [int(t) for t in types],
        "tokenizer.ggml.bos_token_id": sp.bos_id(),
        "tokenizer.ggml.eos_token_id": sp.eos_id(),
        "tokenizer.ggml.unknown_token_id": sp.unk_id(),
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.chat_template": MISTRAL_TEMPLATE,
    }
