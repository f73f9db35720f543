"""Paged attention with PyTorch SDPA (CPU and CUDA).

Per step, metadata is built once from the batch; per layer the new K/V go into their
slots, then each query gathers its sequence's keys through the block table and runs
``scaled_dot_product_attention(..., enable_gqa=True)`` (KV heads are never repeated).

Single-token chunks (decode) are attended together as one padded SDPA batch. Longer chunks
(prefill, possibly continuing a cached prefix) go one by one through SDPA. (On CPU the
``cpu`` backend's compiled kernel reads the paged cache in place instead: ``model.cpu_decoder``.)
Key position ``kp`` of a
sequence whose table starts at logical block ``f`` is ``f * block_size + column``; query
at position ``qp`` sees it when ``kp <= qp`` and ``qp - kp < window``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.attention import window_mask
from model.batch import Batch, Chunk
from model.kv_cache import NULL_BLOCK, PagedKVCache


@dataclass(frozen=True)
class _Group:
    rows: torch.Tensor | slice  # query rows in the packed batch
    blocks: torch.Tensor  # (n, width) or (width,): physical blocks of each table, null-padded
    columns: int  # key columns used (width * block_size, or fewer for a single chunk)
    mask: torch.Tensor  # (n, 1, 1, columns) or (T, columns): True where the query sees the key


def slot_mapping(batch: Batch, block_size: int) -> list[int]:
    return [slot for chunk in batch.chunks for slot in chunk.slots(block_size)]


def padded_tables(chunks: list[Chunk], block_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Each chunk's block table padded with the null block, and the key position of every column.

    Returns ``blocks`` (n, width) and ``positions`` (n, width * block_size). Padding columns
    get positions past every query, so the causal test masks them.
    """
    width = max(len(c.block_table) for c in chunks)
    tables = torch.full((len(chunks), width), NULL_BLOCK, dtype=torch.long)
    for i, chunk in enumerate(chunks):
        tables[i, : len(chunk.block_table)] = torch.tensor(chunk.block_table, dtype=torch.long)
    first = torch.tensor([c.first_block for c in chunks], dtype=torch.long)
    positions = first[:, None] * block_size + torch.arange(width * block_size)[None, :]
    return tables.to(device), positions.to(device)


class TorchPagedAttention:
    """The ``Attention`` of one forward pass over a packed batch (see ``model.attention``)."""

    def __init__(
        self,
        cache: PagedKVCache,
        batch: Batch,
        sliding_window: int | None,
        device: torch.device,
    ) -> None:
        self.cache = cache
        block_size = cache.spec.block_size
        self.slot_mapping = torch.tensor(slot_mapping(batch, block_size), dtype=torch.long, device=device)
        self.groups: list[_Group] = []
        decode_rows: list[int] = []
        decode_chunks: list[Chunk] = []
        row = 0
        for chunk in batch.chunks:
            n = len(chunk.token_ids)
            if n == 1:
                decode_rows.append(row)
                decode_chunks.append(chunk)
            else:
                blocks, key_pos = padded_tables([chunk], block_size, device)
                end = chunk.end_position - chunk.first_block * block_size  # columns that hold keys
                query_pos = torch.arange(chunk.start_position, chunk.end_position, device=device)
                mask = window_mask(query_pos, key_pos[0, :end], sliding_window)
                self.groups.append(_Group(slice(row, row + n), blocks[0], end, mask))
            row += n
        if decode_chunks:
            blocks, key_pos = padded_tables(decode_chunks, block_size, device)
            query_pos = torch.tensor([c.start_position for c in decode_chunks], device=device)
            diff = query_pos[:, None] - key_pos
            mask = diff >= 0
            if sliding_window is not None:
                mask &= diff < sliding_window
            rows = torch.tensor(decode_rows, dtype=torch.long, device=device)
            self.groups.append(_Group(rows, blocks, key_pos.shape[1], mask[:, None, None, :]))

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        key_cache, value_cache = self.cache.keys[layer], self.cache.values[layer]  # (blocks, size, kv_heads, dim)
        num_kv_heads, head_dim = key_cache.shape[2:]
        key_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, self.slot_mapping, k)
        value_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, self.slot_mapping, v)
        out = torch.empty_like(q)
        for group in self.groups:
            # whole blocks gathered at once: 16x fewer index entries than per-slot gathers
            shape = (*group.blocks.shape[:-1], -1, num_kv_heads, head_dim)
            keys = key_cache.index_select(0, group.blocks.reshape(-1)).view(shape)[..., : group.columns, :, :]
            values = value_cache.index_select(0, group.blocks.reshape(-1)).view(shape)[..., : group.columns, :, :]
            if isinstance(group.rows, slice):  # one chunk: (n_heads, T, head_dim) against (n_kv_heads, L, head_dim)
                attended = F.scaled_dot_product_attention(
                    q[group.rows].transpose(0, 1),
                    keys.transpose(0, 1),
                    values.transpose(0, 1),
                    attn_mask=group.mask,
                    enable_gqa=True,
                )
                out[group.rows] = attended.transpose(0, 1)
            else:  # decode tokens: (n, n_heads, 1, head_dim) against (n, n_kv_heads, L, head_dim)
                attended = F.scaled_dot_product_attention(
                    q[group.rows].unsqueeze(2),
                    keys.transpose(1, 2),
                    values.transpose(1, 2),
                    attn_mask=group.mask,
                    enable_gqa=True,
                )
                out[group.rows] = attended.squeeze(2)
        return out

    def dense_mask(self, num_rows: int) -> torch.Tensor:
        """(rows, cache slots) booleans: which slot each query attends to (for tests)."""
        block_size = self.cache.spec.block_size
        dense = torch.zeros(num_rows, self.cache.num_blocks * block_size, dtype=torch.bool)
        offsets = torch.arange(block_size)
        for group in self.groups:
            slots = (group.blocks[..., :, None].cpu() * block_size + offsets).flatten(-2)[..., : group.columns]
            if isinstance(group.rows, slice):
                for i, row in enumerate(range(num_rows)[group.rows]):
                    dense[row, slots[group.mask[i].cpu()]] = True
            else:
                for i, row in enumerate(group.rows.tolist()):
                    dense[row, slots[i][group.mask[i, 0, 0].cpu()]] = True
        return dense
