"""A request sharing a 100-token prefix with a finished one computes only what is new."""

from __future__ import annotations

from pathlib import Path

from model.loader import load_model
from server.tokenizer_loader import load_tokenizer
from tests.paged_driver import PagedDriver

BLOCK = 16
NEW = 8
TEXT = (
    "The history of paged memory begins with the Atlas computer, which let programs use more memory "
    "than the machine had by moving fixed-size pages between core and drum. Decades later the same "
    "idea lets a language model server keep the keys and values of many conversations in one pool. "
    "Each block of the cache holds the keys and values of a fixed number of tokens, so a sequence can "
    "grow without reserving its maximum length in advance, and two requests that begin with the same "
    "system prompt can share the blocks of that prompt instead of computing and storing them twice."
)


def test_shared_prefix_is_not_recomputed_and_output_matches_a_cold_run(default_model_path: Path) -> None:
    model = load_model(default_model_path).model
    tokenizer = load_tokenizer(default_model_path)
    shared = tokenizer.encode(TEXT)[:100]
    assert len(shared) == 100
    first = shared + tokenizer.encode(" Summarize that in one line.")
    second = shared + tokenizer.encode(" Who built the Atlas computer, and when?")

    warm = PagedDriver(model, num_blocks=64, block_size=BLOCK)
    warm.add("first", first, NEW)
    warm.run_to_completion(["first"])
    before = warm.runner.num_computed_tokens
    warm.add("second", second, NEW)
    warm.run_to_completion(["second"])
    cached = 100 // BLOCK * BLOCK  # whole blocks only: 96 of the 100 shared tokens
    assert warm.blocks.counters.prefix_hit_tokens == cached
    assert warm.runner.num_computed_tokens - before == len(second) - cached + NEW - 1

    cold = PagedDriver(model, num_blocks=64, block_size=BLOCK)
    cold.add("second", second, NEW)
    cold.run_to_completion(["second"])
    assert cold.runner.num_computed_tokens == len(second) + NEW - 1
    assert warm.seqs["second"].generated == cold.seqs["second"].generated
    assert warm.blocks.num_free_blocks == warm.blocks.num_blocks  # everything returned (cached, evictable)
