"""Write one set of Hugging Face weights in the other formats, the way their own tools do.

The Q/K row permutation here is llama.cpp's ``permute`` (``convert_hf_to_gguf.py``),
also what Mistral's consolidated checkpoints hold: the test-side inverse of the
loader's ``interleaved_to_half``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf.quants import dequantize, quantize
from safetensors.torch import save_file

from model.config import ModelConfig

_GGUF_LAYER = {
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
_MISTRAL_LAYER = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
_TOP = {
    "model.embed_tokens.weight": ("token_embd.weight", "tok_embeddings.weight"),
    "model.norm.weight": ("output_norm.weight", "norm.weight"),
    "lm_head.weight": ("output.weight", "output.weight"),
}


def half_to_interleaved(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    rows, cols = weight.shape
    return weight.reshape(num_heads, 2, rows // num_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _rename(name: str, fmt: int, layer_map: dict[str, str], prefix: str) -> str:
    if name in _TOP:
        return _TOP[name][fmt]
    _, _, index, rest = name.split(".", 3)
    return f"{prefix}.{index}.{layer_map[rest]}"


def _permuted(name: str, tensor: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    if name.endswith("q_proj.weight"):
        return half_to_interleaved(tensor, config.num_heads)
    if name.endswith("k_proj.weight"):
        return half_to_interleaved(tensor, config.num_kv_heads)
    return tensor


def hf_state(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if "rotary" not in k}


def write_mistral(state: dict[str, torch.Tensor], config: ModelConfig, directory: Path) -> Path:
    directory.mkdir(parents=True)
    tensors = {_rename(k, 1, _MISTRAL_LAYER, "layers"): _permuted(k, v, config).contiguous() for k, v in state.items()}
    save_file(tensors, str(directory / "consolidated.safetensors"))
    params = {
        "dim": config.hidden_size,
        "n_layers": config.num_layers,
        "head_dim": config.head_dim,
        "hidden_dim": config.intermediate_size,
        "n_heads": config.num_heads,
        "n_kv_heads": config.num_kv_heads,
        "norm_eps": config.rms_norm_eps,
        "vocab_size": config.vocab_size,
        "rope_theta": config.rope_theta,
        "max_seq_len": config.max_position_embeddings,
    }
    if config.sliding_window is not None:
        params["sliding_window"] = config.sliding_window
    if config.tie_word_embeddings:
        params["tied_embeddings"] = True
    (directory / "params.json").write_text(json.dumps(params))
    return directory


def write_gguf(
    state: dict[str, torch.Tensor],
    config: ModelConfig,
    path: Path,
    qtype: gguf.GGMLQuantizationType,
    metadata: dict[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """Write a llama-architecture GGUF; return the weights it holds, dequantized, in HF layout."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(config.num_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_vocab_size(config.vocab_size)
    for key, value in (metadata or {}).items():
        _add_metadata(writer, key, value)
    stored: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        kind = gguf.GGMLQuantizationType.F32 if tensor.ndim == 1 else qtype
        raw = _encode(_permuted(name, tensor, config).float().numpy(), kind)
        writer.add_tensor(_rename(name, 0, _GGUF_LAYER, "blk"), raw, raw_dtype=kind)
        # Blocks run along rows, so quantizing commutes with the row permutation:
        # the HF-layout weights the file holds are those of the unpermuted rows.
        hf_layout = _encode(tensor.float().numpy(), kind)
        stored[name] = torch.from_numpy(np.array(dequantize(hf_layout, kind), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def _encode(data: np.ndarray, kind: gguf.GGMLQuantizationType) -> np.ndarray:
    if kind == gguf.GGMLQuantizationType.F32:
        return data
    if kind == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16)
    return np.asarray(quantize(data, kind))


def _add_metadata(writer: gguf.GGUFWriter, key: str, value: Any) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        writer.add_array(key, list(value))
