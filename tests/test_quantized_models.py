"""Models served with their weights kept quantized give the logits of the same weights
dequantized (within 1e-4), through the paged cpu backend: GGUF files of each kept type, a
floating-point checkpoint quantized at load, and the default model's shipped Q4_1 file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from model.batch import Batch, Chunk
from model.kv_cache import KVCacheSpec, PagedKVCache
from model.loader import LoadedModel, load_model
from model.runner import ModelRunner
from tests.checkpoint_writers import hf_state, write_gguf
from tests.hf_reference import TinySpec, build_hf_model, save_hf_model
from tests.test_bf16_default_model import greedy

SPEC = TinySpec("quant", heads=4, kv_heads=2, hidden=256, intermediate=512, vocab=256, architecture="llama")
PROMPT = [3, 200, 17, 45, 45, 120, 9, 250, 64, 1, 88, 31, 7, 7, 190]


def paged_logits(loaded: LoadedModel, tokens: list[int]) -> torch.Tensor:
    """Prefill all but the last 3 tokens in one chunk, then decode those 3 one by one: every row's logits."""
    model = loaded.model
    cache = PagedKVCache(KVCacheSpec.for_model(model.config, torch.float32, 16), 16, model.device, "cpu")
    runner = ModelRunner(model, cache, "cpu")
    table = list(range(1, 9))
    head = len(tokens) - 3
    rows = [runner.execute(Batch([Chunk(tokens[:head], 0, table, num_logits=head)])).clone()]
    for position in range(head, len(tokens)):
        rows.append(runner.execute(Batch([Chunk([tokens[position]], position, table)])).clone())
    return torch.cat(rows)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    hf = build_hf_model(SPEC, seed=5)
    return {"state": hf_state(hf), "dir": save_hf_model(hf, tmp_path_factory.mktemp("hf") / "m")}


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=lambda q: q.name)
def test_gguf_kept_quantized_equals_dequantized(hf_model: dict[str, Any], tmp_path: Path, qtype: Q) -> None:
    path = tmp_path / f"m.{qtype.name}.gguf"
    write_gguf(hf_model["state"], load_model(hf_model["dir"]).config, path, qtype)
    kept = load_model(path, quantization="auto")
    # 2 layers of 7 matrices, the embedding and the head; 2 layers of 2 norms and the final one
    assert kept.weight_types == {qtype.name: 2 * 7 + 2, "float32": 2 * 2 + 1}
    assert set(kept.model.quantized) == {"embed_tokens", "lm_head"} | {
        f"layers.{i}.{t}" for i in range(2) for t in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj",
                                                       "mlp.down_proj")}  # fmt: skip
    dense = load_model(path, quantization="none")
    assert dense.weight_types == {"float32": 21}
    got, expected = paged_logits(kept, PROMPT), paged_logits(dense, PROMPT)
    assert (got - expected).abs().max().item() < 1e-4


def test_quantized_at_load_equals_the_same_quantization_from_gguf(hf_model: dict[str, Any], tmp_path: Path) -> None:
    """q8_0 at load and gguf-py's Q8_0 quantizer produce the same weights, so the same logits."""
    path = tmp_path / "m.Q8_0.gguf"
    write_gguf(hf_model["state"], load_model(hf_model["dir"]).config, path, Q.Q8_0)
    at_load = load_model(hf_model["dir"], quantization="q8_0")
    assert at_load.weight_types == {"q8_0": 16, "float32": 5}
    got = paged_logits(at_load, PROMPT)
    assert torch.equal(got, paged_logits(load_model(path, quantization="auto"), PROMPT))


def test_quantized_weights_refuse_the_torch_backend(hf_model: dict[str, Any]) -> None:
    loaded = load_model(hf_model["dir"], quantization="int8")
    cache = PagedKVCache(KVCacheSpec.for_model(loaded.config, torch.float32, 16), 8, torch.device("cpu"), "flat")
    with pytest.raises(ValueError, match="quantized weights run on the cpu backend, not 'torch'"):
        ModelRunner(loaded.model, cache, "torch")


def test_default_model_q4_1_logits_equal_its_dequantized_weights(default_model_path: Path) -> None:
    tokens = list(range(1000, 1040))
    kept = load_model(default_model_path, quantization="auto")
    assert kept.weight_types == {"Q4_1": 210, "float32": 61, "Q8_0": 1}
    got = paged_logits(kept, tokens)
    expected = paged_logits(load_model(default_model_path, quantization="none"), tokens)
    assert (got - expected).abs().max().item() < 1e-4


@pytest.mark.slow
def test_default_model_q4_1_greedy_agrees_with_dequantized_for_32_tokens(default_model_path: Path) -> None:
    assert greedy(default_model_path, "float32", "auto") == greedy(default_model_path, "float32", "none")
