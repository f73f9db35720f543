"""The xformers backend's masks, built and materialized on CPU, against the torch backend,
Hugging Face's window rule, and xformers' reference attention."""

from __future__ import annotations

import math

import pytest
import torch
from xformers.ops import fmha

from model.attention import window_mask
from model.attention_torch import TorchPagedAttention
from model.attention_xformers import XformersPagedAttention
from model.batch import Batch, Chunk
from model.kv_cache import KVCacheSpec, PagedKVCache
from tests.xformers_reference import reference_kernel

BLOCK = 4
HEADS, KV_HEADS, HEAD_DIM = 6, 2, 8


def packed_batch() -> Batch:
    """Fresh prompts, a continued prefill, decodes with and without released blocks."""
    return Batch(
        [
            Chunk(list(range(7)), 0, [3, 4]),  # fresh prompt, positions 0..6
            Chunk(list(range(5)), 9, [5, 6, 7, 8]),  # chunked prefill continuing at 9: positions 9..13
            Chunk([1], 20, [9, 10, 11], first_block=3),  # decode at 20, logical blocks 0..2 released
            Chunk([2], 2, [12]),  # decode with a short context
            Chunk(list(range(3)), 0, [13]),  # fresh prompt, positions 0..2
            Chunk([3], 14, [14, 15, 16, 17]),  # decode at 14, full table
        ]
    )


def expected_mask(batch: Batch, cache: PagedKVCache, window: int | None) -> torch.Tensor:
    """Hugging Face's rule written out: query at p sees slot(k) for table positions k <= p, p - k < window."""
    dense = torch.zeros(batch.num_tokens, cache.num_blocks * BLOCK, dtype=torch.bool)
    row = 0
    for chunk in batch.chunks:
        for p in range(chunk.start_position, chunk.end_position):
            for k in range(chunk.first_block * BLOCK, p + 1):
                if window is None or p - k < window:
                    dense[row, chunk.block_table[k // BLOCK - chunk.first_block] * BLOCK + k % BLOCK] = True
            row += 1
    return dense


def make_cache() -> PagedKVCache:
    return PagedKVCache(
        KVCacheSpec(1, KV_HEADS, HEAD_DIM, torch.float32, BLOCK), num_blocks=20, device=torch.device("cpu")
    )


@pytest.mark.parametrize("window", [None, 3, 5, 8], ids=lambda w: f"window{w}")
def test_xformers_masks_equal_torch_masks_and_hf_rule(window: int | None) -> None:
    batch, cache = packed_batch(), make_cache()
    expected = expected_mask(batch, cache, window)
    cpu = torch.device("cpu")
    torch_mask = TorchPagedAttention(cache, batch, window, cpu).dense_mask(batch.num_tokens)
    assert torch.equal(torch_mask, expected)
    xformers_mask = XformersPagedAttention(cache, batch, window, cpu).dense_mask()
    assert torch.equal(xformers_mask, expected)


@pytest.mark.parametrize("window", [None, 3, 5, 8], ids=lambda w: f"window{w}")
def test_attention_through_xformers_reference_equals_torch_backend(window: int | None) -> None:
    batch = packed_batch()
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(batch.num_tokens, HEADS, HEAD_DIM, generator=gen)
    k = torch.randn(batch.num_tokens, KV_HEADS, HEAD_DIM, generator=gen)
    v = torch.randn(batch.num_tokens, KV_HEADS, HEAD_DIM, generator=gen)
    torch_cache, xformers_cache = make_cache(), make_cache()
    for cache in (torch_cache, xformers_cache):  # earlier context: same random history in both
        history = torch.randn(cache.keys[0].shape, generator=torch.Generator().manual_seed(1))
        cache.keys[0].copy_(history)
        cache.values[0].copy_(history.flip(0))
    cpu = torch.device("cpu")
    expected = TorchPagedAttention(torch_cache, batch, window, cpu)(0, q, k, v)
    got = XformersPagedAttention(xformers_cache, batch, window, cpu, kernel=reference_kernel)(0, q, k, v)
    assert torch.equal(torch_cache.keys[0], xformers_cache.keys[0])
    assert (got - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("window", [1, 2, 5, 16])
def test_xformers_window_counting_against_hf(window: int) -> None:
    """HF: query i sees keys i - W < j <= i. xformers' window_size masks count the same W keys;
    its window_left masks count keys behind the query, so W - 1 is the equivalent, not W."""
    n = 20
    hf = window_mask(torch.arange(n), torch.arange(n), window)
    local = fmha.attn_bias.BlockDiagonalCausalMask.from_seqlens([n]).make_local_attention(window)
    assert torch.equal(local.materialize((n, n)) == 0, hf)
    left = fmha.attn_bias.LocalAttentionFromBottomRightMask(window_left=window - 1, window_right=0)
    assert torch.equal(left.materialize((n, n)) == 0, hf)
    naive = fmha.attn_bias.LocalAttentionFromBottomRightMask(window_left=window, window_right=0)
    extra = (naive.materialize((n, n)) == 0) & ~hf
    assert extra.sum().item() == n - window  # one key too many for every query that has one more behind it


def test_window_chunk_is_split_into_one_entry_per_query() -> None:
    """A chunk whose window cuts into its table becomes per-query gappy entries."""
    cache = make_cache()
    batch = Batch([Chunk(list(range(5)), 9, [5, 6, 7, 8])])
    unsplit = XformersPagedAttention(cache, batch, None, torch.device("cpu"))
    split = XformersPagedAttention(cache, batch, 5, torch.device("cpu"))
    assert unsplit.context_bias is not None and split.context_bias is not None
    assert unsplit.context_bias.q_seqinfo.seqstart_py == [0, 5]
    assert split.context_bias.q_seqinfo.seqstart_py == [0, 1, 2, 3, 4, 5]
    # key starts (columns of the table) are position - window + 1: 5, 6, 7, 8, 9
    assert list(split.context_bias.k_seqinfo.seqstart_py[:-1]) == [5, 6, 7, 8, 9]
    first_row = split.context_materialized()[0]  # query at position 9 sees positions 5..9
    assert math.isinf(first_row[6 * BLOCK + 0].item())  # position 4: logical block 1 = block 6, column 0
    assert first_row[6 * BLOCK + 1].item() == 0  # position 5
