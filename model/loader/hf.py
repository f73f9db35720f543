"""Hugging Face layout: ``config.json`` + ``model.safetensors`` or shards listed in an index."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from model.config import CheckpointError, ModelConfig
from model.loader.checkpoint import Checkpoint, WeightStream, build_config, read_json, require
from model.loader.safetensors_mmap import SafetensorsFile

_DEFAULT_MAX_POSITIONS = {"mistral": 4096 * 32, "llama": 2048}


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
        raise CheckpointError(f"{path}: unsupported architecture model_type={model_type!r} (supported: llama, mistral)")
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
    return build_config(
        path,
        architecture=model_type,
        vocab_size=require(path, cfg, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=require(path, cfg, "intermediate_size"),
        num_layers=require(path, cfg, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or hidden // heads,
        rope_theta=float(cfg.get("rope_theta", rope.get("rope_theta", 10000.0))),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=cfg.get("max_position_embeddings", _DEFAULT_MAX_POSITIONS[model_type]),
        sliding_window=cfg.get("sliding_window") if model_type == "mistral" else None,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


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
