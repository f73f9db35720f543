"""The paged runner against Hugging Face transformers: packed batches, chunked prefill,
interleaved decode, the cpu backend's compiled kernels, the torch backend and xformers' masks
(with xformers' reference attention)."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch

from model.attention_xformers import XformersPagedAttention
from model.batch import Batch, Chunk
from model.kv_cache import KVCacheSpec, PagedKVCache
from model.loader import load_model
from model.mistral import MistralModel
from model.runner import AttentionFactory, ModelRunner
from tests.hf_reference import FAMILY_SPECS, PARITY_SPECS, TinySpec, build_hf_model, hf_greedy, hf_logits, save_hf_model
from tests.paged_driver import PagedDriver
from tests.xformers_reference import reference_kernel

TOLERANCE = 1e-4
BLOCK_SIZE = 4
NEW_TOKENS = 12
PROMPT_LENGTHS = [3, 9, 17, 26, 40]


def prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n)] for n in PROMPT_LENGTHS]


def xformers_on_cpu() -> AttentionFactory:
    return partial(XformersPagedAttention, kernel=reference_kernel)


# backend name -> attention override (None: the backend's own)
BACKENDS: dict[str, tuple[str, Callable[[], AttentionFactory | None]]] = {
    "cpu-kernels": ("cpu", lambda: None),  # the compiled decoder: packed linears, paged attention kernel
    "torch-sdpa": ("torch", lambda: None),
    "xformers-masks": ("torch", xformers_on_cpu),
}


@pytest.fixture(params=PARITY_SPECS + FAMILY_SPECS, ids=lambda s: s.name)
def pair(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[TinySpec, Any, MistralModel]:
    spec: TinySpec = request.param
    hf = build_hf_model(spec)
    return spec, hf, load_model(save_hf_model(hf, tmp_path / spec.name)).model


def run_interleaved(driver: PagedDriver, seq_ids: list[str], seed: int) -> None:
    """Random subsets of sequences each step; prompts split at random chunk boundaries."""
    rng = random.Random(seed)
    while active := [s for s in seq_ids if not driver.seqs[s].finished]:
        chosen = [s for s in active if rng.random() < 0.7] or [rng.choice(active)]
        driver.step({s: rng.randint(1, 11) for s in chosen})


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_paged_batches_match_hf(pair: tuple[TinySpec, Any, MistralModel], backend: str) -> None:
    spec, hf, model = pair
    name, attention = BACKENDS[backend]
    driver = PagedDriver(model, num_blocks=64, block_size=BLOCK_SIZE, backend=name, attention=attention())
    ids = [f"s{i}" for i in range(len(PROMPT_LENGTHS))]
    for seq_id, prompt in zip(ids, prompts(spec.vocab), strict=True):
        driver.add(seq_id, prompt, NEW_TOKENS)
    run_interleaved(driver, ids, seed=len(spec.name))
    for seq_id, prompt in zip(ids, prompts(spec.vocab), strict=True):
        seq = driver.seqs[seq_id]
        assert seq.generated == hf_greedy(hf, prompt, NEW_TOKENS), seq_id
        # each generated token's logits equal HF's at the same position of the full sequence
        reference = hf_logits(hf, seq.tokens[:-1])[len(prompt) - 1 :]
        got = torch.stack(seq.logits)
        assert (got - reference).abs().max().item() < TOLERANCE
    assert driver.blocks.num_free_blocks == driver.blocks.num_blocks


def test_sliding_window_holds_bounded_blocks(tmp_path: Path) -> None:
    window, block_size = 8, 4
    spec = TinySpec("window8", heads=4, kv_heads=2, window=window)
    hf = build_hf_model(spec)
    model = load_model(save_hf_model(hf, tmp_path / "m")).model
    bound = math.ceil(window / block_size) + 1
    held: list[int] = []  # blocks held during each forward pass and after each step

    def record(driver: PagedDriver) -> None:
        held.append(driver.forward_blocks["s"])
        if driver.blocks.has("s"):
            held.append(len(driver.blocks.block_table("s")[0]))

    driver = PagedDriver(model, num_blocks=16, block_size=block_size, on_step=record)
    prompt = prompts(spec.vocab)[1][:6]
    driver.add("s", prompt, 4 * window)
    driver.run_to_completion(["s"])
    assert driver.seqs["s"].generated == hf_greedy(hf, prompt, 4 * window)
    assert len(held) == 2 * (4 * window) - 1  # every step checked
    assert max(held) == bound  # respected at every step, and reached
    assert driver.blocks.counters.window_released_blocks > 0


# logits of the tiny models reach |5|; the bf16 KV cache alone moves them by up to ~0.04 (widen+fma);
# vdpbf16ps also rounds each product's activations to bf16: measured up to 0.144 (AMD EPYC, Zen 4)
BF16_TOLERANCE = {"widen+fma": 0.1, "vdpbf16ps": 0.25}


@pytest.mark.parametrize("spec", PARITY_SPECS, ids=lambda s: s.name)
def test_bf16_cpu_backend_matches_hf_on_bf16_weights(spec: TinySpec, tmp_path: Path, bf16_mode: str) -> None:
    """bf16 on the cpu backend, in each product mode the machine has: weights and KV cache in bf16,
    products and activations in fp32 (widen+fma) or activations rounded to bf16 too (vdpbf16ps). The
    reference is HF in fp32 running the same bf16-rounded weights, so what is left is the bf16 KV
    cache (and the activations' rounding). Teacher-forced on HF's greedy continuation (random tiny
    models have near-ties that any rounding flips): the 5 prompts prefill together, then decode their
    forced tokens together, and every position's logits stay within BF16_TOLERANCE."""
    hf = build_hf_model(spec)
    with torch.no_grad():
        for parameter in hf.parameters():
            parameter.copy_(parameter.bfloat16().float())
    model = load_model(save_hf_model(hf, tmp_path / spec.name), torch.bfloat16).model
    sequences = [p + hf_greedy(hf, p, NEW_TOKENS) for p in prompts(spec.vocab)]
    per_seq = -(-(max(PROMPT_LENGTHS) + NEW_TOKENS) // BLOCK_SIZE)
    spec_bf16 = KVCacheSpec.for_model(model.config, torch.bfloat16, BLOCK_SIZE)
    cache = PagedKVCache(spec_bf16, 1 + len(sequences) * per_seq, model.device, "cpu")
    runner = ModelRunner(model, cache, "cpu")
    tables = [list(range(1 + i * per_seq, 1 + (i + 1) * per_seq)) for i in range(len(sequences))]
    first = runner.execute(
        Batch([Chunk(s[:n], 0, t, num_logits=n) for s, n, t in zip(sequences, PROMPT_LENGTHS, tables, strict=True)])
    )
    got: list[list[torch.Tensor]] = []
    row = 0
    for n in PROMPT_LENGTHS:
        got.append(list(first[row : row + n].clone()))
        row += n
    for step in range(NEW_TOKENS - 1):
        logits = runner.execute(
            Batch(
                [Chunk([s[n + step]], n + step, t) for s, n, t in zip(sequences, PROMPT_LENGTHS, tables, strict=True)]
            )
        )
        for i in range(len(sequences)):
            got[i].append(logits[i].clone())
    for sequence, rows in zip(sequences, got, strict=True):
        reference = hf_logits(hf, sequence[:-1])
        assert (torch.stack(rows) - reference).abs().max().item() < BF16_TOLERANCE[bf16_mode]
