"""One tiny random Mixtral written as Hugging Face, Mistral consolidated and GGUF (per-expert
tensors and llama.cpp's merged ``ffn_*_exps``) loads to identical logits; quantized GGUF experts
stay quantized and equal transformers running the weights the file holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from model.batch import Batch, Chunk
from model.kv_cache import KVCacheSpec, PagedKVCache
from model.loader import load_model
from model.loader.gguf_format import GGUFFile
from model.mistral import MistralModel
from model.runner import ModelRunner
from tests.checkpoint_writers import hf_state, load_hf_state, write_gguf, write_mistral
from tests.hf_reference import TinySpec, build_hf_model, hf_logits, save_hf_model
from tests.test_loaders import logits_of

SPEC = TinySpec("moe", heads=4, kv_heads=2, hidden=64, intermediate=96, vocab=256, architecture="mixtral",
                experts=8, top_k=2, theta=1e6)  # fmt: skip
PROMPT = [3, 200, 17, 45, 45, 120, 9, 250, 64, 1, 88, 31]
EXPERT_TENSORS = 3 * SPEC.experts * SPEC.layers


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    hf = build_hf_model(SPEC, seed=2)
    loaded = load_model(save_hf_model(hf, tmp_path_factory.mktemp("hf") / "mixtral"))
    assert loaded.config.num_experts == 8 and loaded.config.num_experts_per_tok == 2
    return {"hf": hf, "state": hf_state(hf), "config": loaded.config, "logits": logits_of(loaded.model)}


def test_hf_mixtral_matches_transformers(reference: dict[str, Any]) -> None:
    assert (reference["logits"] - hf_logits(reference["hf"], PROMPT)).abs().max().item() < 1e-4


def test_consolidated_mixtral_loads_identical_logits(reference: dict[str, Any], tmp_path: Path) -> None:
    directory = write_mistral(reference["state"], reference["config"], tmp_path / "consolidated")
    loaded = load_model(directory)
    assert loaded.format == "mistral"
    assert loaded.config == reference["config"]
    assert torch.equal(logits_of(loaded.model), reference["logits"])


@pytest.mark.parametrize("merged", [False, True], ids=["per_expert", "merged_exps"])
def test_gguf_mixtral_loads_identical_logits(reference: dict[str, Any], tmp_path: Path, merged: bool) -> None:
    path = tmp_path / "mixtral.gguf"
    write_gguf(reference["state"], reference["config"], path, Q.F32, merged_experts=merged)
    names = {t.name for t in GGUFFile(path).tensors}
    assert ("blk.0.ffn_gate_exps.weight" in names) == merged
    assert ("blk.0.ffn_gate.7.weight" in names) != merged
    loaded = load_model(path)
    assert loaded.config.architecture == "mixtral"
    assert (loaded.config.num_experts, loaded.config.num_experts_per_tok) == (8, 2)
    assert torch.equal(logits_of(loaded.model), reference["logits"])


def runner_logits(model: MistralModel) -> torch.Tensor:
    """The prompt's logits through the compiled CPU kernels (what runs quantized weights)."""
    spec = KVCacheSpec.for_model(model.config, model.dtype, 4)
    runner = ModelRunner(model, PagedKVCache(spec, 8, model.device, "cpu"), "cpu")
    return runner.execute(Batch([Chunk(PROMPT, 0, [1, 2, 3], num_logits=len(PROMPT))])).clone()


def test_gguf_q4_0_experts_stay_quantized_in_both_layouts(reference: dict[str, Any], tmp_path: Path) -> None:
    logits = []
    for merged in (False, True):
        path = tmp_path / f"mixtral-{merged}.Q4_0.gguf"
        stored = write_gguf(reference["state"], reference["config"], path, Q.Q4_0, merged_experts=merged)
        loaded = load_model(path, quantization="auto")
        # every expert matrix (and q, k, v, o, the head) held as Q4_0; the router and norms dense
        assert loaded.weight_types["Q4_0"] == EXPERT_TENSORS + 4 * SPEC.layers + 2
        assert "layers.0.mlp.experts.7.gate_up_proj" in loaded.model.quantized
        logits.append(runner_logits(loaded.model))
    assert torch.equal(logits[0], logits[1])
    dequantized = build_hf_model(SPEC)
    load_hf_state(dequantized, stored)
    assert (logits[0] - hf_logits(dequantized, PROMPT)).abs().max().item() < 1e-4


def test_experts_quantize_at_load_like_dense_weights(reference: dict[str, Any], tmp_path: Path) -> None:
    directory = save_hf_model(reference["hf"], tmp_path / "hf")
    loaded = load_model(directory, quantization="q8_0")
    quantized = loaded.model.quantized
    assert {f"layers.{i}.mlp.experts.{e}.{w}" for i in range(SPEC.layers) for e in range(8)
            for w in ("gate_up_proj", "down_proj")} <= set(quantized)  # fmt: skip
    assert "layers.0.mlp.router.weight" not in quantized  # the router stays dense
    assert loaded.weight_types["q8_0"] == EXPERT_TENSORS + 4 * SPEC.layers + 2
    # exact: transformers running the Q8_0-rounded weights (llama.cpp's Q8_0, as gguf-py computes it)
    rounded = {
        name: value if value.ndim == 1 or "block_sparse_moe.gate" in name else _q8_0_rounded(value)
        for name, value in reference["state"].items()
    }
    hf = build_hf_model(SPEC)
    load_hf_state(hf, rounded)
    got = runner_logits(loaded.model)
    assert not torch.equal(got, reference["logits"])
    assert (got - hf_logits(hf, PROMPT)).abs().max().item() < 1e-4


def _q8_0_rounded(weight: torch.Tensor) -> torch.Tensor:
    blocks = quantize(weight.numpy(), Q.Q8_0)
    return torch.from_numpy(np.array(dequantize(blocks, Q.Q8_0), dtype=np.float32))
