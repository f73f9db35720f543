"""What the scheduler hands the model runner each step: plain integers, no tensors.

Each chunk is the next ``len(token_ids)`` tokens of one sequence: a whole prompt, a
piece of a prompt (chunked prefill) or one decode token. Example, block_size 4, a
sequence with 6 computed tokens and table [7, 2] sends 2 new tokens at positions 6, 7:
slots 2*4+2 = 10 and 2*4+3 = 11 (logical block 1 is physical block 2).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Chunk:
    token_ids: Sequence[int]
    start_position: int  # position of token_ids[0]; earlier positions are in the cache
    block_table: Sequence[int]  # physical blocks of logical blocks first_block, first_block + 1, ...
    first_block: int = 0  # logical blocks before it were released (sliding window)
    num_logits: int = 1  # the last num_logits tokens need logits (0: none, len(token_ids): all)

    def __post_init__(self) -> None:
        assert len(self.token_ids) > 0, "a chunk has at least one token"
        assert 0 <= self.num_logits <= len(self.token_ids)

    @property
    def end_position(self) -> int:
        return self.start_position + len(self.token_ids)

    def slots(self, block_size: int) -> list[int]:
        """Cache slot of every new token: ``block * block_size + offset``."""
        table, first = self.block_table, self.first_block
        return [
            table[p // block_size - first] * block_size + p % block_size
            for p in range(self.start_position, self.end_position)
        ]


@dataclass(frozen=True)
class Batch:
    chunks: Sequence[Chunk]
    block_copies: Sequence[tuple[int, int]] = field(default_factory=tuple)  # copy-on-write, before the pass

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)

    @property
    def num_logits(self) -> int:
        return sum(c.num_logits for c in self.chunks)
