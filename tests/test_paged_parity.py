"""The paged runner against Hugging Face transformers: packed batches, chunked prefill,
interleaved decode, torch backend and xformers' masks (with xformers' reference attention)."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch

from model.attention_torch import TorchPagedAttention
from model.attention_xformers import XformersPagedAttention
from model.loader import load_model
from model.mistral import MistralModel
from model.runner import AttentionFactory
from tests.hf_reference import PARITY_SPECS, TinySpec, build_hf_model, hf_greedy, hf_logits, save_hf_model
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


ATTENTION: dict[str, Callable[[], AttentionFactory | None]] = {
    "torch": lambda: None,  # decode tokens through the compiled kernel
    "torch-sdpa-only": lambda: partial(TorchPagedAttention, use_kernel=False),
    "xformers-masks": xformers_on_cpu,
}


@pytest.fixture(params=PARITY_SPECS, ids=lambda s: s.name)
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


@pytest.mark.parametrize("attention", list(ATTENTION))
def test_paged_batches_match_hf(pair: tuple[TinySpec, Any, MistralModel], attention: str) -> None:
    spec, hf, model = pair
    driver = PagedDriver(model, num_blocks=64, block_size=BLOCK_SIZE, attention=ATTENTION[attention]())
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
