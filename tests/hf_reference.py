"""Tiny random Hugging Face models: the reference implementation for parity tests.

``transformers`` is imported lazily (it takes seconds) and only by tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class TinySpec:
    """One random configuration; ``window=None`` means no sliding window. ``architecture``: ``mistral``,
    ``llama``, ``mixtral`` (``experts``, ``top_k``) or ``ministral`` (``layer_types``: per layer,
    ``sliding_attention`` or ``full_attention``); ``head_dim`` None: hidden / heads."""

    name: str
    heads: int
    kv_heads: int
    window: int | None = None
    tied: bool = False
    theta: float = 10000.0
    architecture: str = "mistral"
    hidden: int = 64
    intermediate: int = 128
    layers: int = 2
    vocab: int = 128
    head_dim: int | None = None
    experts: int = 0
    top_k: int = 2
    layer_types: tuple[str, ...] = ()

    def hf_config(self) -> Any:
        from transformers import LlamaConfig, MinistralConfig, MistralConfig, MixtralConfig

        common: dict[str, Any] = dict(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            tie_word_embeddings=self.tied,
            rope_theta=self.theta,
            initializer_range=0.2,  # peaked logits: greedy choices are far from ties
            max_position_embeddings=512,
            bos_token_id=1,
            eos_token_id=2,
        )
        if self.head_dim is not None:
            common["head_dim"] = self.head_dim
        if self.architecture == "llama":
            return LlamaConfig(**common)
        if self.architecture == "mixtral":
            return MixtralConfig(
                sliding_window=self.window, num_local_experts=self.experts, num_experts_per_tok=self.top_k, **common
            )
        if self.architecture == "ministral":
            return MinistralConfig(sliding_window=self.window, layer_types=list(self.layer_types), **common)
        return MistralConfig(sliding_window=self.window, **common)


PARITY_SPECS = [
    TinySpec("mha_untied_theta1e4", heads=4, kv_heads=4),
    TinySpec("gqa4to1_tied_theta1e6", heads=8, kv_heads=2, tied=True, theta=1e6),
    TinySpec("mqa_untied", heads=4, kv_heads=1),
    TinySpec("gqa_window7", heads=8, kv_heads=2, window=7),
    TinySpec("mqa_window5_tied_theta1e6", heads=4, kv_heads=1, window=5, tied=True, theta=1e6),
    TinySpec("llama_gqa", heads=4, kv_heads=2, architecture="llama"),
]
# the rest of the family (issue 15): Mixtral's experts, Ministral's interleaved windows, Nemo's head_dim,
# v0.2/v0.3's shape (no window, theta 1e6, the v3 tokenizer's 32768-token vocabulary)
FAMILY_SPECS = [
    TinySpec(
        "mixtral_8x_top2_gqa",
        heads=4,
        kv_heads=2,
        architecture="mixtral",
        experts=8,
        top_k=2,
        theta=1e6,
        intermediate=96,
    ),
    TinySpec(
        "ministral_interleaved_window6",
        heads=4,
        kv_heads=2,
        architecture="ministral",
        window=6,
        layers=4,
        head_dim=16,
        layer_types=("sliding_attention", "full_attention", "sliding_attention", "full_attention"),
    ),
    TinySpec("nemo_head_dim32_hidden64_heads4", heads=4, kv_heads=2, head_dim=32),
    TinySpec("v03_vocab32768_theta1e6", heads=4, kv_heads=1, theta=1e6, vocab=32768),
]


def build_hf_model(spec: TinySpec, seed: int = 0, max_positions: int = 512) -> Any:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = spec.hf_config()
    config.max_position_embeddings = max_positions
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.eval()


def save_hf_model(model: Any, directory: Path, max_shard_size: str | None = None) -> Path:
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    return directory


def hf_logits(model: Any, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits: torch.Tensor = model(torch.tensor([ids])).logits[0]
    return logits.float()


def hf_greedy(model: Any, ids: list[int], new_tokens: int) -> list[int]:
    """Greedy continuation with HF's own KV cache, never stopping early."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),  # else pad-id tokens get masked
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return [int(t) for t in out[0, len(ids) :]]
