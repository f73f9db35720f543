"""Mistral layout: ``params.json`` + ``consolidated.safetensors`` (interleaved RoPE rows)."""

from __future__ import annotations

import re
from pathlib import Path

from model.config import CheckpointError, ModelConfig, release_window
from model.loader.checkpoint import Checkpoint, WeightStream, build_config, read_json, require
from model.loader.rotary import permuted_rows
from model.loader.safetensors_mmap import SafetensorsFile

# Mistral name (inside a layer) -> Hugging Face name (inside a layer)
_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def open_mistral(directory: Path) -> Checkpoint:
    params_path = directory / "params.json"
    config = config_from_params(read_json(params_path), params_path)
    files = sorted(directory.glob("consolidated*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: params.json found but no consolidated*.safetensors weights")

    def weights() -> WeightStream:
        for file in files:
            reader = SafetensorsFile(file)
            for name in reader.names():
                hf_name = hf_name_of(name)
                source = reader.rows(name)
                heads = {"q_proj": config.num_heads, "k_proj": config.num_kv_heads}.get(hf_name.split(".")[-2])
                yield hf_name, source if heads is None else permuted_rows(source, config.head_dim), file

    return Checkpoint(directory, "mistral", directory.name, config, weights)


# Mixtral (mistral-inference's MoeLayer): layers.N.feed_forward.gate / .experts.E.w1|w2|w3
_MOE_NAME = re.compile(r"layers\.(\d+)\.feed_forward\.(gate|experts\.\d+\.w[123])\.weight")
# the router Mixtral has; any other key of params.json's "moe" describes a router we do not run
_MOE_KEYS = ("num_experts", "num_experts_per_tok")


def hf_name_of(name: str) -> str:
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    moe = _MOE_NAME.fullmatch(name)
    if moe:
        return f"model.layers.{moe.group(1)}.block_sparse_moe.{moe.group(2)}.weight"
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    return name  # unknown: the model rejects it by name


def _moe(params: dict[str, object], path: Path) -> tuple[int, int]:
    moe = params.get("moe")
    if not moe:
        return 0, 0
    if not isinstance(moe, dict):
        raise CheckpointError(f"{path}: moe must be an object with num_experts and num_experts_per_tok")
    for key, value in moe.items():
        if key not in _MOE_KEYS:
            raise CheckpointError(
                f"{path}: unsupported MoE router field moe.{key}={value!r} (supported: {', '.join(_MOE_KEYS)})"
            )
    experts = require(path, moe, "num_experts")
    return experts, moe.get("num_experts_per_tok", 2)


def _layer_windows(window: object, layers: int, path: Path) -> tuple[int | None, ...]:
    """A list ``sliding_window`` (Ministral's params.json) is a pattern repeated over the layers."""
    if not isinstance(window, list):
        return ()
    if not window or layers % len(window) or not all(isinstance(w, int) and w >= 1 for w in window):
        raise CheckpointError(
            f"{path}: sliding_window must be a positive integer or a list of them whose length divides "
            f"n_layers ({layers}), got {window!r}"
        )
    windows = tuple(window[i % len(window)] for i in range(layers))
    return () if len(set(windows)) == 1 else windows


def config_from_params(params: dict[str, object], path: Path) -> ModelConfig:
    if params.get("vision_encoder"):
        raise CheckpointError(f"{path}: unsupported architecture ('vision_encoder' models are not supported)")
    experts, top_k = _moe(params, path)
    layers = require(path, params, "n_layers")
    window = params.get("sliding_window")
    layer_windows = _layer_windows(window, layers, path)
    if isinstance(window, list):
        window = release_window(layer_windows) if layer_windows else window[0]
    dim = require(path, params, "dim")
    heads = require(path, params, "n_heads")
    return build_config(
        path,
        architecture="mixtral" if experts else "mistral",
        vocab_size=require(path, params, "vocab_size"),
        hidden_size=dim,
        intermediate_size=require(path, params, "hidden_dim"),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=params.get("n_kv_heads") or heads,
        head_dim=params.get("head_dim") or dim // heads,
        rope_theta=float(params.get("rope_theta", 10000.0)),  # type: ignore[arg-type]
        rms_norm_eps=float(params.get("norm_eps", 1e-5)),  # type: ignore[arg-type]
        max_position_embeddings=params.get("max_seq_len") or params.get("max_position_embeddings") or 32768,
        sliding_window=window,
        tie_word_embeddings=bool(params.get("tied_embeddings", False)),
        layer_windows=layer_windows,
        num_experts=experts,
        num_experts_per_tok=top_k,
    )
