"""Hugging Face layout: ``config.json`` + ``model.safetensors`` or shards listed in an index."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from model.config import CheckpointError, ModelConfig, release_window
from model.loader.checkpoint import Checkpoint, WeightStream, build_config, read_json, require
from model.loader.safetensors_mmap import SafetensorsFile

_DEFAULT_MAX_POSITIONS = {"mistral": 4096 * 32, "llama": 2048, "mixtral": 4096 * 32, "ministral": 4096 * 32}
_LAYER_TYPES = {"sliding_attention": True, "full_attention": False}
# router settings of other MoE families, and the values Mixtral's router has
_ROUTER_FIELDS = {"scoring_func": "softmax", "norm_topk_prob": True, "n_shared_experts": 0,
                  "num_shared_experts": 0, "shared_expert_intermediate_size": 0, "routed_scaling_factor": 1.0,
                  "topk_method": "greedy", "n_group": 1}  # fmt: skip


def open_hf(directory: Path) -> Checkpoint:
    config_path = directory / "config.json"
    config = config_from_hf(read_json(config_path), config_path)
    files = _weight_files(directory)

    def weights() -> WeightStream:
        for file in files:
            reader = SafetensorsFile(file)
            for name in reader.names():
                yield name, reader.rows(name), file

    return Checkpoint(directory, "hf", directory.name, config, weights)


def config_from_hf(cfg: dict[str, Any], path: Path) -> ModelConfig:
    model_type = cfg.get("model_type")
    if model_type not in _DEFAULT_MAX_POSITIONS:
        raise CheckpointError(
            f"{path}: unsupported architecture model_type={model_type!r} "
            f"(supported: {', '.join(_DEFAULT_MAX_POSITIONS)})"
        )
    rope = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    rope_type = scaling.get("rope_type", scaling.get("type", rope.get("rope_type", "default")))
    if rope_type != "default":
        raise CheckpointError(f"{path}: unsupported rope scaling {rope_type!r} (supported: default)")
    for key, allowed in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if cfg.get(key, allowed) != allowed:
            raise CheckpointError(f"{path}: unsupported {key}={cfg[key]!r} (supported: {allowed!r})")
    hidden = require(path, cfg, "hidden_size")
    heads = require(path, cfg, "num_attention_heads")
    layers = require(path, cfg, "num_hidden_layers")
    window = cfg.get("sliding_window") if model_type != "llama" else None
    layer_windows = _layer_windows(cfg, path, window, layers)
    experts, top_k = 0, 0
    if model_type == "mixtral":
        for key, supported in _ROUTER_FIELDS.items():
            if cfg.get(key) not in (None, supported):
                raise CheckpointError(f"{path}: unsupported MoE router {key}={cfg[key]!r} (supported: {supported!r})")
        experts, top_k = require(path, cfg, "num_local_experts"), cfg.get("num_experts_per_tok", 2)
    return build_config(
        path,
        architecture="mistral" if model_type == "ministral" else model_type,
        vocab_size=require(path, cfg, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=require(path, cfg, "intermediate_size"),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or hidden // heads,
        rope_theta=float(cfg.get("rope_theta", rope.get("rope_theta", 1e6 if model_type == "mixtral" else 1e4))),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=cfg.get("max_position_embeddings", _DEFAULT_MAX_POSITIONS[model_type]),
        sliding_window=release_window(layer_windows) if layer_windows else window,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        layer_windows=layer_windows,
        num_experts=experts,
        num_experts_per_tok=top_k,
    )


def _layer_windows(cfg: dict[str, Any], path: Path, window: int | None, layers: int) -> tuple[int | None, ...]:
    """Per-layer windows from ``layer_types`` (Ministral: ``sliding_attention`` layers use
    ``sliding_window``, ``full_attention`` layers see everything); () when all layers agree."""
    types = cfg.get("layer_types")
    if types is None:
        return ()
    if not isinstance(types, list) or len(types) != layers or any(t not in _LAYER_TYPES for t in types):
        raise CheckpointError(
            f"{path}: layer_types must list one of {', '.join(_LAYER_TYPES)} per layer ({layers}), got {types!r}"
        )
    windows = tuple(window if _LAYER_TYPES[t] else None for t in types)
    return () if len(set(windows)) == 1 and windows[0] == window else windows


def _weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: missing or empty 'weight_map'")
        files = [directory / name for name in sorted(set(weight_map.values()))]
    elif (directory / "model.safetensors").exists():
        files = [directory / "model.safetensors"]
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        legacy = (
            " (pytorch_model.bin is not supported: convert it to safetensors)" if any(directory.glob("*.bin")) else ""
        )
        raise CheckpointError(f"{directory}: no .safetensors weights found{legacy}")
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"{file}: weight shard listed in the index is missing")
    return files
