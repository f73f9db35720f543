"""Parity of the decoder with Hugging Face transformers (eager attention), fp32, max abs 1e-4."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.dense_cache import DenseKVCache
from model.generate import generate
from model.loader import load_model
from model.mistral import MistralModel
from tests.hf_reference import FAMILY_SPECS, PARITY_SPECS, TinySpec, build_hf_model, hf_greedy, hf_logits, save_hf_model

TOLERANCE = 1e-4
PROMPT = [5, 17, 99, 3, 42, 42, 7, 120, 64, 1, 33, 81, 90, 12, 4, 56, 77, 23, 8, 111, 9, 45, 67, 100]  # 24 > windows


def full_logits(model: MistralModel, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        cache = DenseKVCache(model.config)
        hidden = model(torch.tensor(ids), torch.arange(len(ids)), cache.attention(len(ids)))
        return model.compute_logits(hidden)


@pytest.fixture(params=PARITY_SPECS + FAMILY_SPECS, ids=lambda s: s.name)
def pair(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[TinySpec, object, MistralModel]:
    spec: TinySpec = request.param
    hf = build_hf_model(spec)
    ours = load_model(save_hf_model(hf, tmp_path / spec.name)).model
    return spec, hf, ours


def test_prompt_logits_match_hf(pair: tuple[TinySpec, object, MistralModel]) -> None:
    spec, hf, ours = pair
    expected = hf_logits(hf, PROMPT)
    got = full_logits(ours, PROMPT)
    assert got.shape == expected.shape == (len(PROMPT), spec.vocab)
    assert (got - expected).abs().max().item() < TOLERANCE


def test_greedy_continuation_matches_hf(pair: tuple[TinySpec, object, MistralModel]) -> None:
    _, hf, ours = pair
    expected = hf_greedy(hf, PROMPT, 32)
    got = list(generate(ours, PROMPT, 32))
    assert len(expected) == 32
    assert got == expected


def test_incremental_decoding_equals_full_recompute(pair: tuple[TinySpec, object, MistralModel]) -> None:
    """Logits of each decode step through the cache equal a fresh forward over the whole sequence."""
    _, _, ours = pair
    sequence = list(PROMPT)
    with torch.inference_mode():
        cache = DenseKVCache(ours.config)
        hidden = ours(torch.tensor(sequence), torch.arange(len(sequence)), cache.attention(len(sequence)))
        step_logits = ours.compute_logits(hidden[-1:])[0]
        for _ in range(16):
            reference = full_logits(ours, sequence)[-1]
            assert (step_logits - reference).abs().max().item() < TOLERANCE
            token = int(step_logits.argmax())
            assert token == int(reference.argmax())
            position = torch.tensor([len(sequence)])
            sequence.append(token)
            hidden = ours(torch.tensor([token]), position, cache.attention(1))
            step_logits = ours.compute_logits(hidden)[0]


def test_sliding_window_changes_logits_beyond_the_window(tmp_path: Path) -> None:
    """Guards the window tests against a window that is silently ignored."""
    windowed = TinySpec("w", heads=4, kv_heads=1, window=5)
    unwindowed = TinySpec("nw", heads=4, kv_heads=1, window=None)
    a = load_model(save_hf_model(build_hf_model(windowed), tmp_path / "a")).model
    b = load_model(save_hf_model(build_hf_model(unwindowed), tmp_path / "b")).model
    la, lb = full_logits(a, PROMPT), full_logits(b, PROMPT)
    assert torch.equal(la[:5], lb[:5])  # inside the window: identical weights, identical result
    assert (la[5:] - lb[5:]).abs().max().item() > 1e-2


def test_bfloat16_on_cpu_runs_and_stays_close(tmp_path: Path) -> None:
    spec = PARITY_SPECS[1]
    hf = build_hf_model(spec)
    path = save_hf_model(hf, tmp_path / "m")
    ours = load_model(path, dtype=torch.bfloat16).model
    assert ours.dtype == torch.bfloat16
    got = full_logits(ours, PROMPT)
    expected = hf_logits(hf, PROMPT)
    # bf16 keeps 8 bits of mantissa: agreement to a few percent of the logit range
    assert (got - expected).abs().max().item() < 0.05 * expected.abs().max().item()
