"""A Hugging Face transformers model holding exactly our loaded weights (benchmark baseline)."""

from __future__ import annotations

from typing import Any

import torch

from model.mistral import MistralModel


def hf_twin(model: MistralModel) -> Any:
    """``LlamaForCausalLM`` / ``MistralForCausalLM`` (SDPA attention) with ``model``'s weights, unfused."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    cfg = model.config
    common: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings,
    )  # fmt: skip
    if cfg.architecture == "mistral":
        hf = MistralForCausalLM(MistralConfig(sliding_window=cfg.sliding_window, **common))
    else:
        hf = LlamaForCausalLM(LlamaConfig(**common))
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("qkv_proj"):
            prefix = "model." + name.removesuffix("qkv_proj")
            q, k, v = tensor.split([cfg.q_size, cfg.kv_size, cfg.kv_size])
            state.update({prefix + "q_proj.weight": q, prefix + "k_proj.weight": k, prefix + "v_proj.weight": v})
        elif name.endswith("gate_up_proj"):
            prefix = "model." + name.removesuffix("gate_up_proj")
            gate, up = tensor.chunk(2)
            state.update({prefix + "gate_proj.weight": gate, prefix + "up_proj.weight": up})
        elif name.endswith(("o_proj", "down_proj", "embed_tokens")):
            state[f"model.{name}.weight"] = tensor
        elif name == "lm_head":
            state["lm_head.weight"] = tensor
        elif not name.startswith("rotary"):
            state[f"model.{name}"] = tensor
    missing, unexpected = hf.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if cfg.tie_word_embeddings:
        hf.tie_weights()
    return hf.to(model.dtype).eval()
