"""Model runner details: logits rows, copy-on-write forks, backend selection."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from model.batch import Batch, Chunk
from model.kv_cache import KVCacheSpec, PagedKVCache
from model.loader import load_model
from model.mistral import MistralModel
from model.runner import ModelRunner, cache_layout, resolve_backend
from tests.hf_reference import TinySpec, build_hf_model, hf_greedy, hf_logits, save_hf_model
from tests.paged_driver import PagedDriver

SPEC = TinySpec("runner", heads=4, kv_heads=2, window=None)
PROMPT = [5, 17, 99, 3, 42, 7]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, MistralModel]:
    hf = build_hf_model(SPEC)
    return hf, load_model(save_hf_model(hf, tmp_path_factory.mktemp("m") / "m")).model


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_all_prompt_logits_when_asked(pair: tuple[Any, MistralModel], backend: str) -> None:
    hf, model = pair
    spec = KVCacheSpec.for_model(model.config, torch.float32, 4)
    cache = PagedKVCache(spec, 8, torch.device("cpu"), cache_layout(backend))
    runner = ModelRunner(model, cache, backend)
    other = [9, 9, 9]
    logits = runner.execute(
        Batch([Chunk(PROMPT, 0, [1, 2], num_logits=len(PROMPT)), Chunk(other, 0, [3], num_logits=0)])
    )
    assert logits.shape == (len(PROMPT), SPEC.vocab)
    assert (logits - hf_logits(hf, PROMPT)).abs().max().item() < 1e-4
    assert runner.num_computed_tokens == len(PROMPT) + len(other)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_forked_sequences_diverge_through_copy_on_write(pair: tuple[Any, MistralModel], backend: str) -> None:
    """Two samples share the prompt's blocks; the partial block is copied when the second writes."""
    hf, model = pair
    driver = PagedDriver(model, num_blocks=16, block_size=4, backend=backend)
    driver.add("a", PROMPT, 8)
    driver.step({"a": 100})  # prompt computed, first token sampled (6 tokens: block 2 half full)
    driver.fork("a", "b")
    forced = (driver.seqs["a"].tokens[-1] + 1) % SPEC.vocab
    driver.seqs["b"].tokens[-1] = forced  # b samples a different first token
    driver.run_to_completion(["a", "b"])
    assert driver.seqs["a"].generated == hf_greedy(hf, PROMPT, 8)
    assert driver.seqs["b"].generated == [forced, *hf_greedy(hf, [*PROMPT, forced], 7)]
    assert driver.blocks.num_free_blocks == driver.blocks.num_blocks


def test_backend_selection() -> None:
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu, torch.float32) == "cpu"  # the kernels build on this machine
    assert resolve_backend("auto", cpu, torch.bfloat16) == "cpu"
    assert resolve_backend("auto", cpu, torch.float16) == "torch"  # no fp16 kernels
    assert resolve_backend("torch", cpu) == "torch"
    with pytest.raises(ValueError, match="attention backend 'cpu' needs the CPU device and a float32 or bfloat16"):
        resolve_backend("cpu", cpu, torch.float16)
    with pytest.raises(ValueError, match="attention backend 'xformers' needs a CUDA device"):
        resolve_backend("xformers", cpu)
    with pytest.raises(ValueError, match="attention backend 'flash' is not one of: auto, cpu, torch, xformers"):
        resolve_backend("flash", cpu)


def test_runner_refuses_a_cache_of_another_layout(pair: tuple[Any, MistralModel]) -> None:
    _, model = pair
    cache = PagedKVCache(KVCacheSpec.for_model(model.config, torch.float32, 4), 8, torch.device("cpu"), "flat")
    with pytest.raises(ValueError, match="backend 'cpu' needs a 'cpu' KV cache, got 'flat'"):
        ModelRunner(model, cache, "cpu")


def test_cache_needs_two_blocks(pair: tuple[Any, MistralModel]) -> None:
    _, model = pair
    spec = KVCacheSpec.for_model(model.config, torch.float32, 16)
    with pytest.raises(ValueError, match="at least 2 blocks"):
        PagedKVCache.from_budget(spec, spec.block_bytes, torch.device("cpu"))
