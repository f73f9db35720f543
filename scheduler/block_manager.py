"""Block manager: which KV-cache blocks each sequence holds. Integers only, no tensors.

Logical block ``b`` of a sequence holds positions ``[b * block_size, (b + 1) * block_size)``.
A sequence's table lists the physical blocks of logical blocks ``first_block,
first_block + 1, ...``; ``first_block`` grows as a sliding window releases blocks
no future query can see. Example, block_size 4, window 6, 13 tokens computed:
the next query (position 13) sees positions 8..13, so logical blocks 0 and 1
(positions 0..7) go back to the pool and ``first_block`` becomes 2.

Full computed blocks are content-addressed for prefix caching: block ``b``'s hash
chains its token ids with block ``b-1``'s hash. A block whose last holder lets go
joins the free queue but keeps its hash, so a later request with the same prefix
can take it back, until allocation evicts it, least recently freed first.

Out of blocks is an ordinary answer (``False``), never an exception.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field


def hash_block(parent: bytes | None, token_ids: Sequence[int]) -> bytes:
    """SHA-256 of the parent hash and this block's tokens: collisions would leak KV across requests."""
    digest = hashlib.sha256(parent or b"")
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


@dataclass(frozen=True)
class PrefixHit:
    """Cached blocks a new sequence can start from (``lookup_prefix``)."""

    blocks: tuple[int, ...] = ()  # physical ids of logical blocks first_block..first_block+len-1
    first_block: int = 0
    num_tokens: int = 0  # tokens whose KV is already computed
    hashes: tuple[bytes, ...] = ()  # chained hashes of logical blocks 0..num_tokens/block_size-1


@dataclass
class _Table:
    blocks: list[int]
    first_block: int
    num_tokens: int  # tokens that have a slot
    hashes: list[bytes] = field(default_factory=list)  # hashes of logical blocks 0.. (computed, full)


@dataclass
class CacheCounters:
    prefix_queried_tokens: int = 0
    prefix_hit_tokens: int = 0
    window_released_blocks: int = 0


class BlockManager:
    def __init__(
        self,
        block_ids: Sequence[int],
        block_size: int,
        sliding_window: int | None = None,
        enable_prefix_caching: bool = True,
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if not block_ids:
            raise ValueError("the block manager needs at least one block")
        self.block_size = block_size
        self.sliding_window = sliding_window
        self.enable_prefix_caching = enable_prefix_caching
        self.num_blocks = len(block_ids)
        self._ref: dict[int, int] = dict.fromkeys(block_ids, 0)
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(block_ids)  # head = evicted first
        self._cached: dict[bytes, int] = {}
        self._hash_of: dict[int, bytes] = {}
        self._tables: dict[str, _Table] = {}
        self._copies: list[tuple[int, int]] = []
        self.counters = CacheCounters()

    # -- queries -------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds, cached ones included (they are evictable)."""
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def ref_count(self, block: int) -> int:
        return self._ref[block]

    def has(self, seq_id: str) -> bool:
        return seq_id in self._tables

    def block_table(self, seq_id: str) -> tuple[list[int], int]:
        """(physical blocks, logical index of the first one)."""
        table = self._tables[seq_id]
        return table.blocks, table.first_block

    def num_tokens(self, seq_id: str) -> int:
        return self._tables[seq_id].num_tokens

    def cached_block(self, block_hash: bytes) -> int | None:
        return self._cached.get(block_hash)

    def take_copies(self) -> list[tuple[int, int]]:
        """Copy-on-write block copies (src, dst) to perform before the next forward pass."""
        copies, self._copies = self._copies, []
        return copies

    # -- prefix caching ------------------------------------------------------------------

    def lookup_prefix(self, token_ids: Sequence[int]) -> PrefixHit:
        """The longest cached prefix of ``token_ids`` a new sequence can reuse (read-only).

        At least one token is always left to compute, so the last prompt token gets logits.
        With a sliding window only the blocks the next query can see must still be cached.
        """
        if not self.enable_prefix_caching:
            return PrefixHit()
        size = self.block_size
        max_blocks = (len(token_ids) - 1) // size
        hashes: list[bytes] = []
        best, run_start = 0, 0
        parent: bytes | None = None
        for b in range(max_blocks):
            parent = hash_block(parent, token_ids[b * size : (b + 1) * size])
            hashes.append(parent)
            if parent not in self._cached:
                if self.sliding_window is None:
                    break
                run_start = b + 1
                continue
            if run_start <= self._first_needed_block((b + 1) * size):
                best = b + 1
        first = self._first_needed_block(best * size) if best else 0
        blocks = tuple(self._cached[h] for h in hashes[first:best])
        return PrefixHit(blocks, first, best * size, tuple(hashes[:best]))

    def _first_needed_block(self, next_position: int) -> int:
        """Logical index of the first block the query at ``next_position`` (or later) can see."""
        if self.sliding_window is None:
            return 0
        return max(0, next_position - self.sliding_window + 1) // self.block_size

    # -- allocation ----------------------------------------------------------------------

    def allocate_slots(self, seq_id: str, num_new_tokens: int, prefix: PrefixHit | None = None) -> bool:
        """Give ``seq_id`` slots for ``num_new_tokens`` more tokens; False if blocks run out.

        A new sequence starts from ``prefix`` (its cached blocks are taken back from the
        free queue). Nothing changes when the answer is False.
        """
        table = self._tables.get(seq_id)
        prefix = prefix or PrefixHit()
        if table is None:
            taken_from_free = sum(1 for b in prefix.blocks if self._ref[b] == 0)
            first_block, num_tokens, held = prefix.first_block, prefix.num_tokens, len(prefix.blocks)
            copy_on_write = False
        else:
            taken_from_free = 0
            first_block, num_tokens, held = table.first_block, table.num_tokens, len(table.blocks)
            copy_on_write = num_new_tokens > 0 and num_tokens % self.block_size != 0 and self._ref[table.blocks[-1]] > 1
        needed_blocks = -(-(num_tokens + num_new_tokens) // self.block_size) - first_block
        new_blocks = max(0, needed_blocks - held)
        if taken_from_free + new_blocks + copy_on_write > len(self._free):
            return False

        if table is None:
            for block in prefix.blocks:
                self._take(block)
            table = _Table(list(prefix.blocks), first_block, num_tokens, list(prefix.hashes))
            self._tables[seq_id] = table
            self.counters.prefix_hit_tokens += prefix.num_tokens
        if copy_on_write:
            shared = table.blocks[-1]
            fresh = self._pop_free()
            self._ref[shared] -= 1
            table.blocks[-1] = fresh
            self._copies.append((shared, fresh))
        table.blocks.extend(self._pop_free() for _ in range(new_blocks))
        table.num_tokens += num_new_tokens
        return True

    def count_prefix_query(self, num_tokens: int) -> None:
        """Record that a new request's ``num_tokens`` prompt tokens were looked up."""
        self.counters.prefix_queried_tokens += num_tokens

    def commit(self, seq_id: str, token_ids: Sequence[int], num_computed: int) -> None:
        """After a forward pass: cache newly completed blocks, release blocks behind the window.

        ``token_ids``: the sequence's tokens so far (at least ``num_computed`` of them);
        ``num_computed``: how many now have their KV in the cache.
        """
        table = self._tables[seq_id]
        assert num_computed <= table.num_tokens, (num_computed, table.num_tokens)
        size = self.block_size
        while self.enable_prefix_caching and (len(table.hashes) + 1) * size <= num_computed:
            b = len(table.hashes)
            parent = table.hashes[-1] if table.hashes else None
            block_hash = hash_block(parent, token_ids[b * size : (b + 1) * size])
            table.hashes.append(block_hash)
            if b >= table.first_block:
                block = table.blocks[b - table.first_block]
                if block_hash not in self._cached and block not in self._hash_of:
                    self._cached[block_hash] = block
                    self._hash_of[block] = block_hash
        first_needed = self._first_needed_block(num_computed)
        while table.first_block < first_needed and table.blocks:
            self._release(table.blocks.pop(0))
            table.first_block += 1
            self.counters.window_released_blocks += 1

    def fork(self, parent_id: str, child_id: str) -> None:
        """``child_id`` shares every block of ``parent_id``; a shared partial block is copied on write."""
        assert child_id not in self._tables, child_id
        parent = self._tables[parent_id]
        for block in parent.blocks:
            self._ref[block] += 1
        self._tables[child_id] = _Table(list(parent.blocks), parent.first_block, parent.num_tokens, list(parent.hashes))

    def free(self, seq_id: str) -> None:
        """Let go of every block; blocks nobody else holds join the free queue, last block first."""
        table = self._tables.pop(seq_id)
        for block in reversed(table.blocks):
            self._release(block)

    # -- internals -----------------------------------------------------------------------

    def _take(self, block: int) -> None:
        if self._ref[block] == 0:
            del self._free[block]
        self._ref[block] += 1

    def _pop_free(self) -> int:
        block, _ = self._free.popitem(last=False)
        evicted = self._hash_of.pop(block, None)
        if evicted is not None:
            del self._cached[evicted]
        self._ref[block] = 1
        return block

    def _release(self, block: int) -> None:
        self._ref[block] -= 1
        assert self._ref[block] >= 0, f"block {block} freed twice"
        if self._ref[block] == 0:
            self._free[block] = None
