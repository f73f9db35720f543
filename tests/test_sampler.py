"""Sampling on a fixed small vocabulary: exact probabilities, a chi-square test, seeds."""

from __future__ import annotations

import math

import pytest
import torch

from model.sampler import Sampler, SamplingRow

LOGITS = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])


def softmax(values: list[float]) -> list[float]:
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def renormalized(probs: list[float], keep: list[int]) -> list[float]:
    total = sum(probs[i] for i in keep)
    return [probs[i] / total if i in keep else 0.0 for i in range(len(probs))]


BASE = softmax([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])  # 0.5744, 0.2113, 0.1282, 0.0777, 0.0286, 0.0039
CASES = {
    "temperature_0.5": (SamplingRow(temperature=0.5), softmax([4.0, 2.0, 1.0, 0.0, -2.0, -6.0])),
    "top_k_3": (SamplingRow(top_k=3), renormalized(BASE, [0, 1, 2])),
    "top_p_0.8": (SamplingRow(top_p=0.8), renormalized(BASE, [0, 1, 2])),  # 0.574 + 0.211 = 0.786 < 0.8
    "top_p_0.75": (SamplingRow(top_p=0.75), renormalized(BASE, [0, 1])),
    "min_p_0.2": (SamplingRow(min_p=0.2), renormalized(BASE, [0, 1, 2])),  # >= 0.2 * 0.574 = 0.115
    "repetition_1.5": (
        SamplingRow(repetition_penalty=1.5, history=(0, 4)),
        softmax([2.0 / 1.5, 1.0, 0.5, 0.0, -1.0 * 1.5, -3.0]),
    ),
    "frequency_presence": (
        SamplingRow(frequency_penalty=0.5, presence_penalty=0.3, output_ids=(1, 1, 2)),
        softmax([2.0, 1.0 - 1.0 - 0.3, 0.5 - 0.5 - 0.3, 0.0, -1.0, -3.0]),
    ),
    "banned": (SamplingRow(banned_ids=(0, 3)), renormalized(BASE, [1, 2, 4, 5])),
    "combined": (SamplingRow(temperature=2.0, top_k=4, top_p=0.9), None),
}


@pytest.mark.parametrize("name", [n for n, (_, expected) in CASES.items() if expected is not None])
def test_exact_probabilities(name: str) -> None:
    row, expected = CASES[name]
    got = Sampler(torch.Generator()).probabilities(LOGITS, [row])[0]
    assert got.tolist() == pytest.approx(expected, abs=1e-6)


def test_combined_warpers_in_order() -> None:
    """temperature 2 -> top_k 4 -> top_p 0.9, as Hugging Face orders them."""
    scaled = softmax([1.0, 0.5, 0.25, 0.0])  # top 4 of logits / 2
    keep = []
    total = 0.0
    for i in sorted(range(4), key=lambda i: -scaled[i]):
        keep.append(i)
        total += scaled[i]
        if total >= 0.9:
            break
    expected = renormalized([*scaled, 0.0, 0.0], keep)
    got = Sampler(torch.Generator()).probabilities(LOGITS, [CASES["combined"][0]])[0]
    assert got.tolist() == pytest.approx(expected, abs=1e-6)


def test_draws_follow_the_distribution_chi_square() -> None:
    """20,000 draws at a fixed seed against top_p=0.95, temperature 1.3: chi-square below the
    0.1% critical value for 4 degrees of freedom (18.47)."""
    row = SamplingRow(temperature=1.3, top_p=0.95)
    rows = [row] * 20_000
    sampler = Sampler(torch.Generator().manual_seed(2024))
    expected = sampler.probabilities(LOGITS, [row])[0]
    counts = torch.bincount(
        torch.tensor([c.token_id for c in sampler.sample(LOGITS.expand(20_000, -1), rows)]), minlength=6
    )
    support = [i for i in range(6) if expected[i] > 0]
    assert counts[[i for i in range(6) if expected[i] == 0]].sum().item() == 0
    chi2 = sum((counts[i].item() - 20_000 * expected[i].item()) ** 2 / (20_000 * expected[i].item()) for i in support)
    assert len(support) == 5 and chi2 < 18.47


def test_top_k_1_is_greedy_and_temperature_0_is_greedy() -> None:
    logits = torch.randn(64, 1000, generator=torch.Generator().manual_seed(0))
    sampler = Sampler(torch.Generator().manual_seed(1))
    expected = logits.argmax(dim=-1).tolist()
    assert [c.token_id for c in sampler.sample(logits, [SamplingRow(top_k=1)] * 64)] == expected
    assert [c.token_id for c in sampler.sample(logits, [SamplingRow(temperature=0.0)] * 64)] == expected


def test_seeded_rows_repeat_whatever_the_batch() -> None:
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(3))

    def draws(batch_rows: list[int], seed: int) -> list[int]:
        generator = torch.Generator().manual_seed(seed)
        tokens = []
        for _ in range(10):
            rows = [SamplingRow(generator=generator) if i == 0 else SamplingRow() for i in range(len(batch_rows))]
            choice = Sampler(torch.Generator()).sample(logits[batch_rows], rows)[0]
            tokens.append(choice.token_id)
        return tokens

    alone = draws([0], seed=5)
    crowded = draws([0, 3, 4, 7], seed=5)
    assert alone == crowded
    assert alone != draws([0], seed=6)
