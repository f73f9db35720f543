"""bfloat16 on the default model against float32, both on the cpu backend (the stated tolerances of
the bf16 path: weights and KV cache rounded to bf16, products and activations in fp32)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.batch import Batch, Chunk
from model.kv_cache import KVCacheSpec, PagedKVCache
from model.loader import load_model
from model.runner import ModelRunner
from scheduler.output_stream import SyncOutputStream
from scheduler.request import SamplingParams
from server.runtime import RuntimeOptions, build_runtime

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "The three primary colors are",
    "Grouped-query attention is",
    "1, 2, 3, 4, 5,",
]
LOGIT_TOLERANCE = 0.5  # |logits| reach ~33; measured 0.22
LOGPROB_TOLERANCE = 0.1  # of the float32 argmax token; measured 0.04


def greedy(path: Path, dtype: str, quantization: str = "none") -> list[list[int]]:
    """32 greedy tokens for each prompt, all in one batch (weights dequantized unless ``quantization``)."""
    options = RuntimeOptions(path, dtype=dtype, quantization=quantization, kv_cache_memory=64 << 20)
    runtime = build_runtime(options)
    assert runtime.engine.runner.backend == "cpu" and runtime.dtype_name == dtype
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    streams = []
    for i, prompt in enumerate(PROMPTS):
        stream = SyncOutputStream(1)
        runtime.engine.submit(runtime.request(f"r{i}", runtime.tokenizer.encode(prompt), params), stream)
        streams.append(stream)
    runtime.engine.run_until_idle()
    return [[t for output in stream for t in output.token_ids] for stream in streams]


@pytest.mark.slow
def test_bf16_greedy_agrees_with_fp32_for_32_tokens(default_model_path: Path) -> None:
    assert greedy(default_model_path, "bfloat16") == greedy(default_model_path, "float32")


def teacher_forced_logits(path: Path, dtype: torch.dtype, tokens: list[int]) -> torch.Tensor:
    model = load_model(path, dtype).model
    cache = PagedKVCache(KVCacheSpec.for_model(model.config, dtype, 16), 16, model.device, "cpu")
    return ModelRunner(model, cache, "cpu").execute(
        Batch([Chunk(tokens, 0, list(range(1, 9)), num_logits=len(tokens))])
    )


@pytest.mark.slow
def test_bf16_logits_within_tolerance_of_fp32(default_model_path: Path) -> None:
    tokens = list(range(1000, 1128))
    fp32 = teacher_forced_logits(default_model_path, torch.float32, tokens).clone()
    bf16 = teacher_forced_logits(default_model_path, torch.bfloat16, tokens)
    assert (bf16 - fp32).abs().max().item() < LOGIT_TOLERANCE
    chosen = fp32.argmax(-1, keepdim=True)
    moved = fp32.log_softmax(-1).gather(1, chosen) - bf16.log_softmax(-1).gather(1, chosen)
    assert moved.abs().max().item() < LOGPROB_TOLERANCE
    assert torch.equal(bf16.argmax(-1), fp32.argmax(-1))
