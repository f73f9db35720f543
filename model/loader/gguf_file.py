"""GGUF files of the ``llama`` architecture.

Tensor data stays memory-mapped; each tensor is read row range by row range, either kept in
its block type (``model.quant``: Q8_0, Q4_0, Q4_1, Q4_K, Q6_K, when the loader keeps
quantized weights) or dequantized (numpy, ``gguf.quants``), its Q/K rows converted back from
llama.cpp's interleaved RoPE layout, and its mapped pages released.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from gguf import GGMLQuantizationType as QType
from gguf.quants import dequantize

from model.config import CheckpointError, ModelConfig
from model.loader.checkpoint import Checkpoint, RowSource, WeightStream, build_config
from model.loader.gguf_format import GGUFFile, GGUFTensor
from model.loader.rotary import permuted_rows
from model.loader.safetensors_mmap import release_pages
from model.quant import KEPT_GGUF_TYPES, QuantParts, from_gguf

SUPPORTED_TYPES = (
    QType.F32, QType.F16, QType.BF16, QType.Q8_0, QType.Q4_0, QType.Q4_1,
    QType.Q5_0, QType.Q5_1, QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K,
)  # fmt: skip
_LAYER_NAMES = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
# Mixtral: the router, and the experts' weights one tensor per expert (blk.N.ffn_gate.E.weight, older
# files) or all experts in one 3-D tensor (blk.N.ffn_gate_exps.weight, llama.cpp since 2024)
_MOE_NAMES = {"ffn_gate": "w1", "ffn_down": "w2", "ffn_up": "w3"}
_ROUTER = "ffn_gate_inp.weight"
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def open_gguf(path: Path) -> Checkpoint:
    reader = GGUFFile(path)
    config = config_from_gguf(reader, path)
    for tensor in reader.tensors:
        if tensor.type not in SUPPORTED_TYPES:
            raise CheckpointError(
                f"{path}: tensor {tensor.name} has unsupported quantization type {tensor.type.name} "
                f"(supported: {', '.join(t.name for t in SUPPORTED_TYPES)})"
            )

    def weights() -> WeightStream:
        for tensor in reader.tensors:
            merged = _MERGED_EXPERTS.fullmatch(tensor.name)
            if merged and len(tensor.shape) == 3:
                block, kind = merged.groups()
                for expert in range(tensor.shape[0]):
                    name = f"model.layers.{block}.block_sparse_moe.experts.{expert}.{_MOE_NAMES[kind]}.weight"
                    yield name, _rows(reader, tensor, expert), path
                continue
            hf_name = hf_name_of(tensor.name)
            source = _rows(reader, tensor)
            heads = {"q_proj": config.num_heads, "k_proj": config.num_kv_heads}.get(hf_name.split(".")[-2])
            yield hf_name, source if heads is None else permuted_rows(source, config.head_dim), path

    return Checkpoint(path, "gguf", model_name(path, reader.metadata), config, weights)


# A file name's encoding suffix in llama.cpp's naming convention: ".Q4_1", "-Q4_K_M", ".IQ3_XS", ".F16"
ENCODING_SUFFIX = re.compile(r"[.-](?:I?Q\d[A-Z0-9_]*|[BF]F?16|F32)$", re.IGNORECASE)


def model_name(path: Path, metadata: dict[str, Any]) -> str:
    """The name to serve a GGUF file under, as its publisher writes it: the file's name less its
    encoding where it names the model (``SmolLM2-135M-Instruct.Q4_1.gguf`` -> ``SmolLM2-135M-Instruct``),
    else llama.cpp's ``<basename>-<size_label>-<finetune>-<version>`` from the metadata, else
    ``general.name``, else the file's name."""
    stem = ENCODING_SUFFIX.sub("", path.stem)
    basename = str(metadata.get("general.basename") or "")
    if basename and basename.lower().replace(" ", "-") in stem.lower():
        return stem
    keys = ("general.basename", "general.size_label", "general.finetune", "general.version")
    parts = [str(metadata[key]) for key in keys if metadata.get(key)]
    if basename:
        return "-".join(parts)
    return str(metadata.get("general.name") or stem)


def _rows(reader: GGUFFile, tensor: GGUFTensor, expert: int | None = None) -> RowSource:
    """Rows dequantized to fp32 on read (zero-copy for F32); a 1-D tensor is read whole. ``expert``:
    the matrix of that expert in a merged 3-D expert tensor."""
    raw = reader.raw(tensor)
    offset, shape, nbytes = tensor.offset, tensor.shape, tensor.nbytes
    if expert is not None:
        nbytes //= raw.shape[0]
        raw, offset, shape = raw[expert], offset + expert * nbytes, shape[1:]
    stored_row_bytes = nbytes // len(raw) if raw.ndim > 1 else nbytes

    def read(start: int, end: int) -> torch.Tensor:
        part = raw[start:end] if raw.ndim > 1 else raw
        return torch.from_numpy(dequantize(part, tensor.type))

    def release(start: int, end: int) -> None:
        if raw.ndim == 1:
            start, end = 0, 1
        release_pages(reader.mapping, offset + start * stored_row_bytes, (end - start) * stored_row_bytes)

    def quantized(start: int, end: int) -> QuantParts:
        return from_gguf(raw[start:end], tensor.type)

    row_bytes = 4 * (shape[-1] if len(shape) > 1 else shape[0])
    keep = tensor.type in KEPT_GGUF_TYPES and raw.ndim == 2
    return RowSource(shape, read, release, row_bytes, quantized=quantized if keep else None,
                     stored=tensor.type.name)  # fmt: skip


_MERGED_EXPERTS = re.compile(r"blk\.(\d+)\.(ffn_gate|ffn_down|ffn_up)_exps\.weight")
_EXPERT = re.compile(r"blk\.(\d+)\.(ffn_gate|ffn_down|ffn_up)\.(\d+)\.weight")


def hf_name_of(name: str) -> str:
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    expert = _EXPERT.fullmatch(name)
    if expert:
        block, kind, index = expert.groups()
        return f"model.layers.{block}.block_sparse_moe.experts.{index}.{_MOE_NAMES[kind]}.weight"
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] == _ROUTER:
        return f"model.layers.{parts[1]}.block_sparse_moe.gate.weight"
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    return name


def config_from_gguf(reader: GGUFFile, path: Path) -> ModelConfig:
    meta = reader.metadata
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path}: unsupported GGUF architecture {arch!r} (supported: llama)")

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"llama.{key}", default)
        if value is None:
            raise CheckpointError(f"{path}: missing GGUF metadata llama.{key}")
        if isinstance(value, list):
            raise CheckpointError(f"{path}: per-layer llama.{key} is not supported")
        return value

    scaling = meta.get("llama.rope.scaling.type", "none")
    if scaling != "none":
        raise CheckpointError(f"{path}: unsupported rope scaling {scaling!r} (supported: none)")
    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    tensor_names = {t.name for t in reader.tensors}
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    vocab = meta.get("llama.vocab_size") or (embed.shape[0] if embed is not None else None)
    if vocab is None:
        raise CheckpointError(f"{path}: missing llama.vocab_size and token_embd.weight")
    window = meta.get("llama.attention.sliding_window")
    experts, top_k = int(meta.get("llama.expert_count") or 0), int(meta.get("llama.expert_used_count") or 0)
    if experts:
        _check_router(meta, path)
    return build_config(
        path,
        architecture="mixtral" if experts else "llama" if window is None else "mistral",
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=int(
            meta.get("llama.attention.key_length") or meta.get("llama.rope.dimension_count") or hidden // heads
        ),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        max_position_embeddings=int(get("context_length")),
        sliding_window=None if window is None else int(window),
        tie_word_embeddings="output.weight" not in tensor_names,
        num_experts=experts,
        num_experts_per_tok=top_k,
    )


# llama.cpp's MoE router settings and the values of Mixtral's (softmax gating, no shared experts)
_GGUF_ROUTER = {"llama.expert_gating_func": 1, "llama.expert_shared_count": 0, "llama.expert_weights_norm": True,
                "llama.expert_weights_scale": 1.0, "llama.expert_group_count": 1}  # fmt: skip
_GATING = {1: "softmax", 2: "sigmoid", 3: "softmax_weight"}


def _check_router(meta: dict[str, Any], path: Path) -> None:
    for key, supported in _GGUF_ROUTER.items():
        value = meta.get(key)
        if value is not None and value != supported:
            shown = _GATING.get(value, value) if key.endswith("gating_func") else value
            raise CheckpointError(
                f"{path}: unsupported MoE router {key}={shown!r} "
                f"(supported: {_GATING[1] if key.endswith('gating_func') else supported!r})"
            )
