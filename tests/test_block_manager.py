"""Block manager: exact block ids, ref counts, free order (in the style of vLLM's
test_prefix_caching.py), sliding-window release, copy-on-write, and GQA cache sizing."""

from __future__ import annotations

import torch

from model.kv_cache import KVCacheSpec, parse_bytes
from scheduler.block_manager import BlockManager, hash_block

SIZE = 4
TOKENS = list(range(100, 140))


def manager(num: int = 8, window: int | None = None, caching: bool = True) -> BlockManager:
    return BlockManager(range(1, num + 1), SIZE, window, caching)


def free_order(bm: BlockManager) -> list[int]:
    return list(bm._free)


def test_allocation_takes_lowest_free_blocks_and_grows_by_block() -> None:
    bm = manager()
    assert bm.allocate_slots("a", 10)
    assert bm.block_table("a") == ([1, 2, 3], 0)
    assert [bm.ref_count(b) for b in (1, 2, 3, 4)] == [1, 1, 1, 0]
    assert bm.allocate_slots("a", 2)  # 12 tokens: still three blocks
    assert bm.block_table("a")[0] == [1, 2, 3]
    assert bm.allocate_slots("a", 1)
    assert bm.block_table("a")[0] == [1, 2, 3, 4]
    assert bm.num_free_blocks == 4


def test_out_of_blocks_is_false_and_changes_nothing() -> None:
    bm = manager(num=3)
    assert bm.allocate_slots("a", 8)
    assert not bm.allocate_slots("b", 5)
    assert not bm.has("b")
    assert not bm.allocate_slots("a", 5)
    assert bm.block_table("a")[0] == [1, 2] and bm.num_tokens("a") == 8
    assert bm.num_free_blocks == 1


def test_free_returns_blocks_last_first_and_keeps_hashes() -> None:
    bm = manager()
    assert bm.allocate_slots("a", 10)
    bm.commit("a", TOKENS[:10], 10)
    h0 = hash_block(None, TOKENS[0:4])
    h1 = hash_block(h0, TOKENS[4:8])
    assert bm.cached_block(h0) == 1 and bm.cached_block(h1) == 2
    bm.free("a")
    assert free_order(bm) == [4, 5, 6, 7, 8, 3, 2, 1]
    assert bm.cached_block(h0) == 1  # still reusable after free


def test_prefix_hit_reuses_cached_blocks() -> None:
    bm = manager()
    assert bm.allocate_slots("a", 10)
    bm.commit("a", TOKENS[:10], 10)
    bm.free("a")
    prompt = [*TOKENS[:8], 7, 7, 7]
    hit = bm.lookup_prefix(prompt)
    assert (hit.blocks, hit.num_tokens, hit.first_block) == ((1, 2), 8, 0)
    assert bm.allocate_slots("b", 3, hit)
    assert bm.block_table("b")[0] == [1, 2, 4]  # cached 1, 2 taken back; 4 is the LRU head
    assert [bm.ref_count(b) for b in (1, 2, 3, 4)] == [1, 1, 0, 1]
    assert free_order(bm) == [5, 6, 7, 8, 3]
    assert bm.counters.prefix_hit_tokens == 8


def test_shared_prefix_blocks_are_ref_counted() -> None:
    bm = manager()
    assert bm.allocate_slots("a", 10)
    bm.commit("a", TOKENS[:10], 10)
    hit = bm.lookup_prefix([*TOKENS[:8], 1, 2])
    assert hit.blocks == (1, 2)
    assert bm.allocate_slots("b", 2, hit)
    assert [bm.ref_count(b) for b in (1, 2, 3, 4)] == [2, 2, 1, 1]
    bm.free("a")
    assert [bm.ref_count(b) for b in (1, 2, 3)] == [1, 1, 0]
    assert free_order(bm) == [5, 6, 7, 8, 3]


def test_a_hit_always_leaves_one_token_to_compute() -> None:
    bm = manager()
    assert bm.allocate_slots("a", 8)
    bm.commit("a", TOKENS[:8], 8)
    bm.free("a")
    assert bm.lookup_prefix(TOKENS[:8]).num_tokens == 4  # not 8: the last token needs logits
    assert bm.lookup_prefix(TOKENS[:9]).num_tokens == 8


def test_eviction_is_least_recently_freed_first() -> None:
    bm = manager(num=6)
    assert bm.allocate_slots("a", 8)  # blocks 1, 2
    bm.commit("a", TOKENS[:8], 8)
    assert bm.allocate_slots("b", 8)  # blocks 3, 4
    bm.commit("b", TOKENS[20:28], 8)
    bm.free("a")  # free queue: 5, 6, 2, 1
    bm.free("b")  # free queue: 5, 6, 2, 1, 4, 3
    assert free_order(bm) == [5, 6, 2, 1, 4, 3]
    assert bm.allocate_slots("c", 12)  # takes 5, 6 and evicts 2 (a's second block)
    assert bm.block_table("c")[0] == [5, 6, 2]
    assert bm.lookup_prefix(TOKENS[:9]).num_tokens == 4  # a's first block survives
    assert bm.lookup_prefix(TOKENS[20:29]).num_tokens == 8  # b fully cached
    assert bm.allocate_slots("d", 4)  # evicts 1 next
    assert bm.block_table("d")[0] == [1]
    assert bm.lookup_prefix(TOKENS[:9]).num_tokens == 0


def test_fork_shares_blocks_and_copies_the_partial_block_on_write() -> None:
    bm = manager()
    assert bm.allocate_slots("a", 6)  # blocks 1, 2 (2 holds 2 tokens)
    bm.fork("a", "b")
    assert [bm.ref_count(b) for b in (1, 2)] == [2, 2]
    assert bm.allocate_slots("b", 1)
    assert bm.block_table("b")[0] == [1, 3]
    assert bm.take_copies() == [(2, 3)]
    assert [bm.ref_count(b) for b in (1, 2, 3)] == [2, 1, 1]
    assert bm.allocate_slots("a", 1)  # a is now the only holder of block 2: no copy
    assert bm.block_table("a")[0] == [1, 2] and bm.take_copies() == []
    bm.free("a")
    bm.free("b")
    assert bm.num_free_blocks == 8


def test_sliding_window_releases_blocks_no_query_can_see() -> None:
    bm = manager(window=6)
    assert bm.allocate_slots("a", 13)  # blocks 1..4 for positions 0..12
    bm.commit("a", TOKENS[:13], 13)  # next query at 13 sees 8..13: logical blocks 0, 1 go
    assert bm.block_table("a") == ([3, 4], 2)
    assert [bm.ref_count(b) for b in (1, 2, 3, 4)] == [0, 0, 1, 1]
    assert bm.counters.window_released_blocks == 2
    assert bm.allocate_slots("a", 4)  # positions 13..16: one more block
    assert bm.block_table("a") == ([3, 4, 5], 2)


def test_sliding_window_hit_needs_only_blocks_in_the_window() -> None:
    bm = manager(num=10, window=6)
    assert bm.allocate_slots("a", 17)  # blocks 1..5
    bm.commit("a", TOKENS[:17], 17)  # blocks 1..4 cached; next query 17 sees 12..17: 1, 2, 3 released
    assert bm.block_table("a") == ([4, 5], 3)
    bm.free("a")
    assert free_order(bm) == [6, 7, 8, 9, 10, 1, 2, 3, 5, 4]
    assert bm.allocate_slots("x", 7 * 4)  # takes 6..10, then evicts 1 and 2 (logical blocks 0, 1 of a)
    assert bm.block_table("x")[0] == [6, 7, 8, 9, 10, 1, 2]
    hit = bm.lookup_prefix(TOKENS[:17])
    # 16 tokens are cached where it matters: the next query (16) sees 11..16, logical blocks 2 and 3
    assert (hit.num_tokens, hit.first_block, hit.blocks) == (16, 2, (3, 4))
    assert bm.allocate_slots("b", 1, hit)
    assert bm.block_table("b") == ([3, 4, 5], 2)


def test_gqa_cache_sizing_for_mistral_7b() -> None:
    spec = KVCacheSpec(num_layers=32, num_kv_heads=8, head_dim=128, dtype=torch.float16, block_size=16)
    assert spec.bytes_per_token == 131_072
    assert spec.block_bytes == 131_072 * 16
    for budget in (parse_bytes("2GiB"), 10**9, spec.block_bytes * 7 - 1):
        assert spec.num_blocks_for(budget) == budget // spec.block_bytes
    assert spec.num_blocks_for(parse_bytes("2GiB")) == 1024


def test_parse_bytes_units_and_errors() -> None:
    assert parse_bytes("2GiB") == 2 * 1024**3
    assert parse_bytes("512MiB") == 512 * 1024**2
    assert parse_bytes("1.5GB") == 1_500_000_000
    assert parse_bytes("1000000") == 1_000_000
    for bad in ("", "two", "-1GiB", "5XB", "0"):
        try:
            parse_bytes(bad)
        except ValueError as exc:
            assert "size" in str(exc)
        else:
            raise AssertionError(f"{bad!r} accepted")
