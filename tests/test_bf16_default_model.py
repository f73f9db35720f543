"""bfloat16 on the default model against float32, both on the cpu backend (the stated tolerances of
the bf16 path: weights and KV cache rounded to bf16; products and activations in fp32 with widen+fma,
activations rounded to bf16 before each product too with vdpbf16ps)."""

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
LOGIT_TOLERANCE = 0.5  # |logits| reach ~33; measured 0.22 (widen+fma), 0.35 (vdpbf16ps, AMD EPYC Zen 4)
LOGPROB_TOLERANCE = 0.1  # of the float32 argmax token; measured 0.04 (widen+fma), 0.07 (vdpbf16ps)


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
@pytest.mark.usefixtures("widen_bf16")
def test_bf16_greedy_agrees_with_fp32_for_32_tokens(default_model_path: Path) -> None:
    """With fp32 activations, bf16 weights and cache flip none of these 32-token greedy runs (with
    vdpbf16ps's bf16 activations one prompt diverges after 8 tokens: the logits test bounds that mode)."""
    assert greedy(default_model_path, "bfloat16") == greedy(default_model_path, "float32")


def teacher_forced_logits(path: Path, dtype: torch.dtype, tokens: list[int]) -> torch.Tensor:
    model = load_model(path, dtype).model
    cache = PagedKVCache(KVCacheSpec.for_model(model.config, dtype, 16), 16, model.device, "cpu")
    return ModelRunner(model, cache, "cpu").execute(
        Batch([Chunk(tokens, 0, list(range(1, 9)), num_logits=len(tokens))])
    )


@pytest.mark.slow
def test_bf16_logits_within_tolerance_of_fp32(default_model_path: Path, bf16_mode: str) -> None:
    """Every position's logits within LOGIT_TOLERANCE; the argmax agrees everywhere with widen+fma,
    and with vdpbf16ps wherever float32's best token leads the second by more than twice the
    tolerance, where no rounding within it can flip them (measured on an AMD EPYC, Zen 4: 4 of the
    128 positions flip, each a near-tie within 0.025)."""
    tokens = list(range(1000, 1128))
    fp32 = teacher_forced_logits(default_model_path, torch.float32, tokens).clone()
    bf16 = teacher_forced_logits(default_model_path, torch.bfloat16, tokens)
    assert (bf16 - fp32).abs().max().item() < LOGIT_TOLERANCE
    chosen = fp32.argmax(-1, keepdim=True)
    moved = fp32.log_softmax(-1).gather(1, chosen) - bf16.log_softmax(-1).gather(1, chosen)
    assert moved.abs().max().item() < LOGPROB_TOLERANCE
    top2 = fp32.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * LOGIT_TOLERANCE if bf16_mode == "vdpbf16ps" else slice(None)
    assert torch.equal(bf16.argmax(-1)[clear], fp32.argmax(-1)[clear])
