"""The Mistral decoder (Llama is the same without a sliding window), on packed tokens.

Weights use fused projections (``qkv_proj`` = rows of q, k, v; ``gate_up_proj`` = gate, up).
``weight_destination`` takes Hugging Face tensor names, the lingua franca every loader maps to.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from model.attention import Attention
from model.config import ModelConfig
from model.layers import RMSNorm, RotaryEmbedding, SwiGLU, apply_rotary, empty_weight, linear
from model.moe import SparseMoE


class SelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.qk_size = config.q_size + config.kv_size
        self.qkv_proj = empty_weight(config.q_size + 2 * config.kv_size, config.hidden_size, dtype=dtype, device=device)
        self.o_proj = empty_weight(config.hidden_size, config.q_size, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: Attention) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = linear(x, self.qkv_proj)
        # One rotation for q and k heads together: (T, n_heads + n_kv_heads, head_dim)
        qk = apply_rotary(qkv[:, : self.qk_size].view(num_tokens, -1, self.head_dim), cos, sin)
        q = qk[:, : self.num_heads]
        k = qk[:, self.num_heads :]
        v = qkv[:, self.qk_size :].view(num_tokens, self.num_kv_heads, self.head_dim)
        out = attn(self.layer, q, k, v)  # (T, n_heads, head_dim)
        return linear(out.reshape(num_tokens, -1), self.o_proj)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.self_attn = SelfAttention(config, layer, dtype, device)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        size = (config.hidden_size, config.intermediate_size)
        self.mlp: nn.Module = (
            SparseMoE(*size, config.num_experts, config.num_experts_per_tok, dtype, device)
            if config.is_moe
            else SwiGLU(*size, dtype, device)
        )

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: Attention) -> torch.Tensor:
        attn_out: torch.Tensor = self.self_attn(self.input_layernorm(x), cos, sin, attn)
        x = x + attn_out
        mlp_out: torch.Tensor = self.mlp(self.post_attention_layernorm(x))
        return x + mlp_out


# Hugging Face name -> (our parameter name, index of the shard inside a fused matrix or None).
_LAYER_WEIGHT = re.compile(r"model\.layers\.(\d+)\.(.+)")
_LAYER_TARGETS: dict[str, tuple[str, int | None]] = {
    "self_attn.q_proj.weight": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj.weight": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj.weight": ("self_attn.qkv_proj", 2),
    "self_attn.o_proj.weight": ("self_attn.o_proj", None),
    "mlp.gate_proj.weight": ("mlp.gate_up_proj", 0),
    "mlp.up_proj.weight": ("mlp.gate_up_proj", 1),
    "mlp.down_proj.weight": ("mlp.down_proj", None),
    "input_layernorm.weight": ("input_layernorm.weight", None),
    "post_attention_layernorm.weight": ("post_attention_layernorm.weight", None),
}
# Mixtral's feed-forward (Hugging Face names): the router and expert e's w1 (gate), w3 (up), w2 (down)
_MOE_WEIGHT = re.compile(r"block_sparse_moe\.(?:gate|experts\.(\d+)\.(w[123]))\.weight")
_MOE_SHARDS: dict[str, tuple[str, int | None]] = {"w1": ("gate_up_proj", 0), "w3": ("gate_up_proj", 1),
                                                  "w2": ("down_proj", None)}  # fmt: skip
_TOP_TARGETS = {
    "model.embed_tokens.weight": "embed_tokens",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head",
}


class MistralModel(nn.Module):
    """Token ids and positions in, hidden states out; ``compute_logits`` for the rows that need them."""

    def __init__(
        self, config: ModelConfig, dtype: torch.dtype, device: torch.device, quantized: frozenset[str] = frozenset()
    ) -> None:
        """``quantized``: linear weights (``weight_target`` names) the loader keeps quantized; their
        parameters stay empty and ``self.quantized`` receives the packed kernels' objects."""
        super().__init__()
        self.config = config
        self.embed_tokens = empty_weight(config.vocab_size, config.hidden_size, dtype=dtype, device=device)
        self.layers = nn.ModuleList(DecoderLayer(config, i, dtype, device) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else empty_weight(config.vocab_size, config.hidden_size, dtype=dtype, device=device)
        )
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.max_position_embeddings, device)
        self.quantized: dict[str, Any] = {}  # target -> model.kernels QuantLinear, filled by the loader
        for target in quantized:
            parameter = self.get_parameter(target)
            parameter.data = torch.empty((0, parameter.shape[1]), dtype=dtype, device=device)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.device

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: Attention) -> torch.Tensor:
        """``input_ids``, ``positions``: (T,) int64 -> hidden states (T, hidden_size)."""
        cos, sin = self.rotary(positions, self.dtype)
        x = F.embedding(input_ids, self.embed_tokens)
        for layer in self.layers:
            x = layer(x, cos, sin, attn)
        normed: torch.Tensor = self.norm(x)
        return normed

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, hidden_size) -> (N, vocab_size) in fp32."""
        head = self.embed_tokens if self.lm_head is None else self.lm_head
        return linear(hidden, head).float()

    def expected_weights(self) -> set[str]:
        """Hugging Face names that a complete checkpoint provides."""
        names = {"model.embed_tokens.weight", "model.norm.weight"}
        if self.lm_head is not None:
            names.add("lm_head.weight")
        for i in range(self.config.num_layers):
            names.update(f"model.layers.{i}.{suffix}" for suffix in _LAYER_TARGETS)
            if self.config.is_moe:
                names -= {f"model.layers.{i}.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")}
                names.add(f"model.layers.{i}.block_sparse_moe.gate.weight")
                names.update(
                    f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight"
                    for e in range(self.config.num_experts)
                    for w in _MOE_SHARDS
                )
        return names

    def expected_shape(self, name: str) -> tuple[int, ...]:
        """The shape checkpoint tensor ``name`` must have (also for parameters kept quantized)."""
        target, shard = weight_target(self.config, name)
        if not is_linear(target):
            return tuple(self.get_parameter(target).shape)
        rows, cols = self.parameter_shape(target)
        return (rows if shard is None else self._shard_sizes(target)[shard], cols)

    def parameter_shape(self, target: str) -> tuple[int, int]:
        """(rows, inputs) of a linear parameter, fused ones whole (also when kept quantized)."""
        cfg = self.config
        if target.endswith("qkv_proj"):
            return (cfg.q_size + 2 * cfg.kv_size, cfg.hidden_size)
        if target.endswith("gate_up_proj"):
            return (2 * cfg.intermediate_size, cfg.hidden_size)
        if target.endswith("down_proj"):
            return (cfg.hidden_size, cfg.intermediate_size)
        if target.endswith("o_proj"):
            return (cfg.hidden_size, cfg.q_size)
        return (cfg.vocab_size, cfg.hidden_size)  # embed_tokens, lm_head

    def shard_offset(self, name: str) -> int:
        """The first row checkpoint tensor ``name`` fills in its (fused) parameter."""
        target, shard = weight_target(self.config, name)
        return sum(self._shard_sizes(target)[: shard or 0])

    def _shard_sizes(self, target: str) -> list[int]:
        cfg = self.config
        return [cfg.q_size, cfg.kv_size, cfg.kv_size] if target.endswith("qkv_proj") else [cfg.intermediate_size] * 2

    def weight_destination(self, name: str) -> torch.Tensor:
        """The parameter, or rows of a fused parameter, that checkpoint tensor ``name`` fills."""
        target, shard = weight_target(self.config, name)
        parameter = self.get_parameter(target)
        if shard is None:
            return parameter
        sizes = self._shard_sizes(target)
        offset = sum(sizes[:shard])
        return parameter[offset : offset + sizes[shard]]


def weight_target(config: ModelConfig, name: str) -> tuple[str, int | None]:
    """Checkpoint tensor ``name`` (Hugging Face) -> (our parameter, shard index in a fused one or None)."""
    if name in _TOP_TARGETS:
        if name == "lm_head.weight" and config.tie_word_embeddings:
            raise ValueError("checkpoint has lm_head.weight but the config ties the embeddings")
        return _TOP_TARGETS[name], None
    match = _LAYER_WEIGHT.fullmatch(name)
    if match and int(match.group(1)) < config.num_layers:
        layer, rest = match.groups()
        moe = _MOE_WEIGHT.fullmatch(rest)
        if config.is_moe and moe:
            expert, which = moe.groups()
            if expert is None:
                return f"layers.{layer}.mlp.router.weight", None
            if int(expert) < config.num_experts:
                target, shard = _MOE_SHARDS[which]
                return f"layers.{layer}.mlp.experts.{expert}.{target}", shard
        elif rest in _LAYER_TARGETS and not (config.is_moe and rest.startswith("mlp.")):
            target, shard = _LAYER_TARGETS[rest]
            return f"layers.{layer}.{target}", shard
    raise ValueError(f"unexpected tensor {name!r} for a {config.architecture} model")


def is_linear(target: str) -> bool:
    """A matrix that multiplies activations (or the embedding table): what can stay quantized."""
    return not target.endswith(".weight")


def fused_shards(target: str) -> int:
    """How many checkpoint tensors a parameter is stacked from (q, k, v; gate, up; else 1)."""
    return 3 if target.endswith("qkv_proj") else 2 if target.endswith("gate_up_proj") else 1
