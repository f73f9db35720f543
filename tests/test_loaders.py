"""One random model written in every supported format loads to the same logits."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

from model.dense_cache import DenseKVCache
from model.loader import load_model
from model.loader.gguf_format import GGUFFile
from model.mistral import MistralModel
from tests.checkpoint_writers import hf_state, load_hf_state, write_gguf, write_mistral
from tests.hf_reference import TinySpec, build_hf_model, hf_logits, save_hf_model

# Rows of 256 so every block quantization (32 or 256 wide) applies; llama: GGUF stores no window.
SPEC = TinySpec("loader", heads=4, kv_heads=2, hidden=256, intermediate=512, vocab=256, architecture="llama")
PROMPT = [3, 200, 17, 45, 45, 120, 9, 250, 64, 1, 88, 31]

# Relative RMS error of the logits that each storage type may add over the fp32
# original, about 2x what was measured on this model (F16 0.0025, BF16 0.015,
# Q8_0 0.033, Q5_0 0.38, Q5_1 0.24, Q4_0 0.60, Q4_1 0.48). Random weights of std 0.2
# amplify quantization noise far more than trained ones; the exact check is the
# one against the dequantized weights, below.
QUANT_DRIFT = {Q.F16: 0.005, Q.BF16: 0.03, Q.Q8_0: 0.07, Q.Q5_0: 0.75, Q.Q5_1: 0.5, Q.Q4_0: 1.0, Q.Q4_1: 0.9}


def logits_of(model: MistralModel) -> torch.Tensor:
    with torch.inference_mode():
        cache = DenseKVCache(model.config)
        return model.compute_logits(
            model(torch.tensor(PROMPT), torch.arange(len(PROMPT)), cache.attention(len(PROMPT)))
        )


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    hf = build_hf_model(SPEC, seed=1)
    directory = save_hf_model(hf, tmp_path_factory.mktemp("hf") / "single")
    loaded = load_model(directory)
    return {"hf": hf, "state": hf_state(hf), "config": loaded.config, "logits": logits_of(loaded.model)}


def test_hf_single_file_matches_transformers(reference: dict[str, Any]) -> None:
    expected = hf_logits(reference["hf"], PROMPT)
    assert (reference["logits"] - expected).abs().max().item() < 1e-4


def test_hf_sharded_loads_identical_logits(reference: dict[str, Any], tmp_path: Path) -> None:
    directory = save_hf_model(reference["hf"], tmp_path / "sharded", max_shard_size="300KB")
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded = load_model(directory)
    assert loaded.format == "hf"
    assert torch.equal(logits_of(loaded.model), reference["logits"])


def test_mistral_consolidated_loads_identical_logits(reference: dict[str, Any], tmp_path: Path) -> None:
    directory = write_mistral(reference["state"], reference["config"], tmp_path / "mistral")
    loaded = load_model(directory)
    assert loaded.format == "mistral"
    assert torch.equal(logits_of(loaded.model), reference["logits"])


def test_gguf_f32_loads_identical_logits(reference: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    write_gguf(reference["state"], reference["config"], path, Q.F32)
    loaded = load_model(path)
    assert loaded.format == "gguf"
    # GGUF stores eps as float32: equal once rounded the way the fp32 model uses it
    assert np.float32(loaded.config.rms_norm_eps) == np.float32(reference["config"].rms_norm_eps)
    assert replace(loaded.config, rms_norm_eps=0.1) == replace(reference["config"], rms_norm_eps=0.1)
    assert torch.equal(logits_of(loaded.model), reference["logits"])


@pytest.mark.parametrize("qtype", list(QUANT_DRIFT), ids=lambda q: q.name)
def test_gguf_quantized_equals_its_dequantized_weights(reference: dict[str, Any], tmp_path: Path, qtype: Q) -> None:
    path = tmp_path / f"m.{qtype.name}.gguf"
    stored = write_gguf(reference["state"], reference["config"], path, qtype)
    got = logits_of(load_model(path).model)
    # exact: transformers running the very weights the file holds
    dequantized_hf = build_hf_model(SPEC)
    load_hf_state(dequantized_hf, stored)
    assert (got - hf_logits(dequantized_hf, PROMPT)).abs().max().item() < 1e-4
    # bounded: what the quantization itself costs against the fp32 original
    original = reference["logits"]
    drift = ((got - original).norm() / original.norm()).item()
    assert 0 < drift < QUANT_DRIFT[qtype]


@pytest.mark.parametrize("qtype", [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K], ids=lambda q: q.name)
def test_gguf_k_quants_dequantize_into_place(reference: dict[str, Any], tmp_path: Path, qtype: Q) -> None:
    """No numpy quantizer exists for K-quants, so one matrix of an F32 file is replaced by raw
    blocks; the loaded weight must equal ``gguf.quants.dequantize`` of those bytes."""
    write_gguf(reference["state"], reference["config"], tmp_path / "f32.gguf", Q.F32)
    source = GGUFFile(tmp_path / "f32.gguf")
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    # bytes below 0x7C: every embedded fp16 scale is finite
    raw = np.random.default_rng(0).integers(0, 0x7C, size=(512, 256 // block * size), dtype=np.uint8)
    writer = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    for key, value in source.metadata.items():
        if key.startswith("llama."):
            (writer.add_float32 if isinstance(value, float) else writer.add_uint32)(key, value)
    for tensor in source.tensors:
        replaced = tensor.name == "blk.0.ffn_gate.weight"
        writer.add_tensor(
            tensor.name, raw if replaced else np.array(source.raw(tensor)), raw_dtype=qtype if replaced else tensor.type
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    model = load_model(tmp_path / "k.gguf").model
    expected = torch.from_numpy(dequantize(raw, qtype))
    assert expected.isfinite().all()
    assert torch.equal(model.get_parameter("layers.0.mlp.gate_up_proj")[:512], expected)


def test_gguf_without_output_tensor_ties_embeddings(reference: dict[str, Any], tmp_path: Path) -> None:
    state = {k: v for k, v in reference["state"].items() if k != "lm_head.weight"}
    path = tmp_path / "tied.gguf"
    write_gguf(state, reference["config"], path, Q.F32)
    loaded = load_model(path)
    assert loaded.config.tie_word_embeddings is True
    assert loaded.model.lm_head is None


def test_hf_config_with_legacy_rope_theta_key(tmp_path: Path) -> None:
    spec = TinySpec("old", heads=4, kv_heads=2, theta=1e6, window=9)
    directory = save_hf_model(build_hf_model(spec), tmp_path / "old")
    config = json.loads((directory / "config.json").read_text())
    config.pop("rope_parameters")
    config["rope_theta"] = 1e6
    (directory / "config.json").write_text(json.dumps(config))
    loaded = load_model(directory)
    assert loaded.config.rope_theta == 1e6
    assert loaded.config.sliding_window == 9
    assert loaded.config.architecture == "mistral"


def test_mistral_params_map_to_config(reference: dict[str, Any], tmp_path: Path) -> None:
    directory = write_mistral(reference["state"], reference["config"], tmp_path / "mistral")
    params = json.loads((directory / "params.json").read_text())
    params["sliding_window"] = 4096
    (directory / "params.json").write_text(json.dumps(params))
    loaded = load_model(directory)
    assert loaded.config.sliding_window == 4096
    assert loaded.config.num_kv_heads == 2
    assert loaded.config.head_dim == 64
