"""CUDA checks (marker ``gpu``): paged parity with both backends on a GPU.

Skipped where CUDA is absent (the CPU suite covers the same logic; these run the real
kernels). ``bench/gpu_check.sh`` runs them.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from model.loader import load_model
from tests.hf_reference import FAMILY_SPECS, PARITY_SPECS, TinySpec, build_hf_model, hf_greedy, hf_logits, save_hf_model
from tests.paged_driver import PagedDriver

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run bench/gpu_check.sh on one)"),
]
PROMPT_LENGTHS = [3, 9, 17, 26, 40]


def run(spec: TinySpec, path: Path, dtype: torch.dtype, backend: str) -> PagedDriver:
    model = load_model(path, dtype=dtype, device="cuda").model
    driver = PagedDriver(model, num_blocks=64, block_size=4, backend=backend)
    rng = random.Random(0)
    ids = [f"s{i}" for i in range(len(PROMPT_LENGTHS))]
    for seq_id, n in zip(ids, PROMPT_LENGTHS, strict=True):
        driver.add(seq_id, [rng.randrange(spec.vocab) for _ in range(n)], 12)
    while active := [s for s in ids if not driver.seqs[s].finished]:
        driver.step({s: rng.randint(1, 11) for s in active if rng.random() < 0.7} or {active[0]: 5})
    return driver


@pytest.mark.parametrize("spec", PARITY_SPECS + FAMILY_SPECS, ids=lambda s: s.name)
def test_torch_backend_fp32_on_cuda_matches_hf(spec: TinySpec, tmp_path: Path) -> None:
    hf = build_hf_model(spec)
    driver = run(spec, save_hf_model(hf, tmp_path / "m"), torch.float32, "torch")
    for seq in driver.seqs.values():
        prompt = seq.tokens[: seq.prompt_len]
        assert seq.generated == hf_greedy(hf, prompt, 12)
        reference = hf_logits(hf, seq.tokens[:-1])[seq.prompt_len - 1 :]
        assert (torch.stack(seq.logits).cpu() - reference).abs().max().item() < 1e-4


@pytest.mark.parametrize("spec", PARITY_SPECS + FAMILY_SPECS, ids=lambda s: s.name)
def test_xformers_kernels_match_torch_backend_in_bf16(spec: TinySpec, tmp_path: Path) -> None:
    """Same batches, same interleaving: xformers' CUDA kernels against SDPA, both bf16."""
    path = save_hf_model(build_hf_model(spec), tmp_path / "m")
    reference = run(spec, path, torch.bfloat16, "torch")
    got = run(spec, path, torch.bfloat16, "xformers")
    for seq_id, seq in got.seqs.items():
        ours, theirs = torch.stack(seq.logits).float(), torch.stack(reference.seqs[seq_id].logits).float()
        steps = min(len(ours), len(theirs))  # identical until a bf16 near-tie picks another token
        same_prefix = next((i for i in range(steps) if seq.generated[i] != reference.seqs[seq_id].generated[i]), steps)
        assert same_prefix >= 1
        diff = (ours[:same_prefix] - theirs[:same_prefix]).abs().max().item()
        assert diff < 0.05 * theirs.abs().max().item()
