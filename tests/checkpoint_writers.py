"""Write one set of Hugging Face weights in the other formats, the way their own tools do.

The Q/K row permutation here is llama.cpp's ``permute`` (``convert_hf_to_gguf.py``),
also what Mistral's consolidated checkpoints hold: the test-side inverse of the
loader's ``interleaved_to_half``.
"""

from __future__ import annotations

import json
import re
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


# Mixtral's feed-forward: router and experts, (GGUF name, consolidated name) inside a layer
_MOE = re.compile(r"block_sparse_moe\.(?:gate|experts\.(\d+)\.(w[123]))\.weight")
_GGUF_EXPERT = {"w1": "ffn_gate", "w2": "ffn_down", "w3": "ffn_up"}


def _rename(name: str, fmt: int, layer_map: dict[str, str], prefix: str) -> str:
    if name in _TOP:
        return _TOP[name][fmt]
    _, _, index, rest = name.split(".", 3)
    moe = _MOE.fullmatch(rest)
    if moe:
        expert, which = moe.groups()
        if expert is None:
            return f"{prefix}.{index}." + ("ffn_gate_inp.weight" if fmt == 0 else "feed_forward.gate.weight")
        if fmt == 0:  # llama.cpp's per-expert layout (before the merged ffn_*_exps tensors)
            return f"{prefix}.{index}.{_GGUF_EXPERT[which]}.{expert}.weight"
        return f"{prefix}.{index}.feed_forward.experts.{expert}.{which}.weight"
    return f"{prefix}.{index}.{layer_map[rest]}"


def merge_experts(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-expert GGUF tensors (``blk.N.ffn_gate.E.weight``) stacked into llama.cpp's merged
    ``blk.N.ffn_gate_exps.weight`` (experts, rows, columns); the rest unchanged, in order."""
    out: dict[str, np.ndarray] = {}
    pattern = re.compile(r"blk\.(\d+)\.(ffn_gate|ffn_down|ffn_up)\.(\d+)\.weight")
    groups: dict[str, list[np.ndarray]] = {}
    for name, tensor in tensors.items():
        match = pattern.fullmatch(name)
        if match is None:
            out[name] = tensor
            continue
        merged = f"blk.{match.group(1)}.{match.group(2)}_exps.weight"
        groups.setdefault(merged, []).append(tensor)
        assert len(groups[merged]) == int(match.group(3)) + 1, "experts in order"
        out[merged] = tensor  # placeholder keeps the position
    for merged, parts in groups.items():
        out[merged] = np.stack(parts)
    return out


def _permuted(name: str, tensor: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    if name.endswith("q_proj.weight"):
        return half_to_interleaved(tensor, config.num_heads)
    if name.endswith("k_proj.weight"):
        return half_to_interleaved(tensor, config.num_kv_heads)
    return tensor


def hf_state(model: Any) -> dict[str, torch.Tensor]:
    """The weights under the names a checkpoint on disk has (transformers 5 holds a Mixtral's experts
    as 3-D ``mlp.experts.gate_up_proj`` / ``down_proj`` and saves them per expert, as here)."""
    state = {}
    for name, value in model.state_dict().items():
        if "rotary" in name:
            continue
        prefix, _, rest = name.rpartition(".mlp.")
        if rest == "gate.weight":
            state[f"{prefix}.block_sparse_moe.gate.weight"] = value
        elif rest == "experts.gate_up_proj":
            gate, up = value.chunk(2, dim=1)
            for e in range(value.shape[0]):
                state[f"{prefix}.block_sparse_moe.experts.{e}.w1.weight"] = gate[e]
                state[f"{prefix}.block_sparse_moe.experts.{e}.w3.weight"] = up[e]
        elif rest == "experts.down_proj":
            for e in range(value.shape[0]):
                state[f"{prefix}.block_sparse_moe.experts.{e}.w2.weight"] = value[e]
        else:
            state[name] = value
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def load_hf_state(model: Any, state: dict[str, torch.Tensor]) -> None:
    """The inverse of ``hf_state``: checkpoint-named weights into a transformers model, every
    parameter filled."""
    memory: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for name, value in state.items():
        prefix, _, rest = name.partition(".block_sparse_moe.")
        if not rest:
            memory[name] = value
        elif rest == "gate.weight":
            memory[f"{prefix}.mlp.gate.weight"] = value
        else:
            _, index, which, _ = rest.split(".")
            experts.setdefault(prefix, {}).setdefault(int(index), {})[which] = value
    for prefix, by_index in experts.items():
        ordered = [by_index[i] for i in range(len(by_index))]
        memory[f"{prefix}.mlp.experts.gate_up_proj"] = torch.stack([torch.cat([e["w1"], e["w3"]]) for e in ordered])
        memory[f"{prefix}.mlp.experts.down_proj"] = torch.stack([e["w2"] for e in ordered])
    missing, unexpected = model.load_state_dict(memory, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)


def write_mistral(state: dict[str, torch.Tensor], config: ModelConfig, directory: Path) -> Path:
    directory.mkdir(parents=True)
    tensors = {_rename(k, 1, _MISTRAL_LAYER, "layers"): _permuted(k, v, config).contiguous() for k, v in state.items()}
    save_file(tensors, str(directory / "consolidated.safetensors"))
    params: dict[str, Any] = {
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
    if config.is_moe:
        params["moe"] = {"num_experts": config.num_experts, "num_experts_per_tok": config.num_experts_per_tok}
    (directory / "params.json").write_text(json.dumps(params))
    return directory


def write_gguf(
    state: dict[str, torch.Tensor],
    config: ModelConfig,
    path: Path,
    qtype: gguf.GGMLQuantizationType,
    metadata: dict[str, Any] | None = None,
    merged_experts: bool = False,
) -> dict[str, torch.Tensor]:
    """Write a llama-architecture GGUF; return the weights it holds, dequantized, in HF layout.
    A Mixtral's experts go one tensor per expert, or with ``merged_experts`` one 3-D tensor per
    layer and kind (llama.cpp's ``ffn_*_exps``)."""
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
    if config.is_moe:
        writer.add_expert_count(config.num_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
    for key, value in (metadata or {}).items():
        add_metadata(writer, key, value)
    stored: dict[str, torch.Tensor] = {}
    raws: dict[str, np.ndarray] = {}
    kinds: dict[str, gguf.GGMLQuantizationType] = {}
    for name, tensor in state.items():
        router = name.endswith("block_sparse_moe.gate.weight")  # llama.cpp keeps the router in F32
        kind = gguf.GGMLQuantizationType.F32 if tensor.ndim == 1 or router else qtype
        gguf_name = _rename(name, 0, _GGUF_LAYER, "blk")
        raws[gguf_name] = _encode(_permuted(name, tensor, config).float().numpy(), kind)
        kinds[re.sub(r"\.(\d+)\.weight$", "_exps.weight", gguf_name)] = kinds[gguf_name] = kind
        # Blocks run along rows, so quantizing commutes with the row permutation:
        # the HF-layout weights the file holds are those of the unpermuted rows.
        hf_layout = _encode(tensor.float().numpy(), kind)
        stored[name] = torch.from_numpy(np.array(dequantize(hf_layout, kind), dtype=np.float32))
    for gguf_name, raw in (merge_experts(raws) if merged_experts else raws).items():
        writer.add_tensor(gguf_name, raw, raw_dtype=kinds[gguf_name])
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


def add_metadata(writer: gguf.GGUFWriter, key: str, value: Any) -> None:
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
