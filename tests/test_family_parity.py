"""The Mistral family against Hugging Face transformers (eager, fp32) through the paged engine.

Each tiny random checkpoint (Mixtral 8 experts top-2 GQA, Ministral's interleaved sliding and
full layers, Nemo's head_dim independent of hidden / heads, v0.3's 32768-token vocabulary) runs
16 concurrent greedy requests through ``Engine`` with a token budget that chunks the prompts and
a block pool small enough to preempt: every logits row the runner produced (recomputed ones
included) is within 1e-4 of HF's at the same position, and 32 greedy tokens equal HF's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from model.batch import Batch
from model.loader import load_model
from model.mistral import MistralModel
from scheduler.engine import Engine, StepRecord
from scheduler.request import SamplingParams
from tests.engine_harness import make_engine, record_steps, request, run, tiny_prompts
from tests.hf_reference import FAMILY_SPECS, TinySpec, build_hf_model, hf_greedy, hf_logits, save_hf_model

TOLERANCE = 1e-4
NEW_TOKENS = 32
REQUESTS = 16


@pytest.fixture(scope="module", params=FAMILY_SPECS, ids=lambda s: s.name)
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[TinySpec, Any, Path]:
    spec: TinySpec = request.param
    hf = build_hf_model(spec)
    return spec, hf, save_hf_model(hf, tmp_path_factory.mktemp(spec.name) / "hf")


def record_logits(engine: Engine) -> list[tuple[Batch, torch.Tensor]]:
    """Every (batch, logits) the engine's runner returns."""
    records: list[tuple[Batch, torch.Tensor]] = []
    execute = engine.runner.execute

    def recording(batch: Batch) -> torch.Tensor:
        logits = execute(batch)
        records.append((batch, logits.clone()))
        return logits

    engine.runner.execute = recording  # type: ignore[method-assign]
    return records


def logits_by_position(
    records: list[tuple[Batch, torch.Tensor]], steps: list[StepRecord], sequences: dict[str, list[int]]
) -> dict[str, list[tuple[int, torch.Tensor]]]:
    """Request id -> (position whose next token the row predicts, logits row), for every row. The
    step records name each chunk's sequence, in the batch's order."""
    assert len(records) == len(steps)
    rows: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for (batch, logits), step in zip(records, steps, strict=True):
        row = 0
        for chunk, (seq_id, _) in zip(batch.chunks, step.scheduled, strict=True):
            assert sequences[seq_id][chunk.start_position : chunk.end_position] == list(chunk.token_ids)
            for position in range(chunk.end_position - chunk.num_logits, chunk.end_position):
                rows.setdefault(seq_id, []).append((position, logits[row]))
                row += 1
    return rows


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_engine_matches_hf_with_chunked_prefill_and_preemption(pair: tuple[TinySpec, Any, Path], backend: str) -> None:
    spec, hf, path = pair
    model: MistralModel = load_model(path).model
    prompts = tiny_prompts(REQUESTS, spec.vocab, seed=3, lengths=(8, 40))
    # 16 x up to 71 tokens on 120 blocks of 4 (480 tokens) must preempt; 48 tokens a step chunk the prompts
    engine = make_engine(model, num_blocks=120, block_size=4, max_num_batched_tokens=48, backend=backend)
    steps = record_steps(engine)
    records = record_logits(engine)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS)
    results = run(engine, [request(f"r{i}", p, params) for i, p in enumerate(prompts)])
    assert engine.stats().preemptions > 0
    assert any(len(c.token_ids) < len(p) for b, _ in records for c in b.chunks for p in prompts if c.start_position == 0
               and list(c.token_ids) == p[: len(c.token_ids)])  # fmt: skip
    assert max(len(r.scheduled) for r in steps) >= 8  # requests really ran together
    sequences = {}
    for i, prompt in enumerate(prompts):
        generated = results[f"r{i}"].tokens()
        assert generated == hf_greedy(hf, prompt, NEW_TOKENS), f"r{i}"
        sequences[f"r{i}"] = prompt + generated
    rows = logits_by_position(records, steps, sequences)
    for seq_id, sequence in sequences.items():
        reference = hf_logits(hf, sequence[:-1])
        positions = [p for p, _ in rows[seq_id]]
        assert set(positions) == set(range(len(sequence) - 1 - NEW_TOKENS, len(sequence) - 1))
        got = torch.stack([logits for _, logits in rows[seq_id]])
        assert (got - reference[positions]).abs().max().item() < TOLERANCE, seq_id
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
