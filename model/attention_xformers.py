"""Paged attention with xformers ``memory_efficient_attention`` (CUDA kernels).

Two kinds of rows, at most two kernel calls per layer:

* fresh prompts (a chunk that starts at position 0) attend to their own new K/V,
  packed: ``BlockDiagonalCausalMask``, made local for a sliding window;
* rows with cached context (decode tokens, later prefill chunks) read the paged cache
  through block tables: ``PagedBlockDiagonalCausalWithOffsetGappyKeysMask``, whose
  per-entry key start expresses the window. A chunk whose window cuts into its table
  is split into one entry per query, each with its own key start.

Window arithmetic: Hugging Face lets a query at ``i`` see keys ``j`` with
``i - W < j <= i`` (W keys). xformers' ``make_local_attention(W)`` /
``BlockDiagonalCausalLocalAttentionMask`` count the same W keys, but its ``window_left``
masks (``LocalAttentionFromBottomRightMask``) count the keys *behind* the query, so the
equivalent there is ``window_left = W - 1``; a gappy entry starts at key ``i - W + 1``.

GQA: queries are viewed as (1, T, n_kv_heads, heads_per_group, head_dim) and K/V
expanded along the group dimension with stride 0, never copied. The masks are plain
CPU objects, so their construction is tested without a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from xformers.ops import fmha

from model.batch import Batch
from model.kv_cache import NULL_BLOCK, PagedKVCache


@dataclass(frozen=True)
class _Entry:
    rows: list[int]  # packed query rows of this entry
    key_start: int  # first visible key, in columns of the sequence's table
    key_end: int  # one past the last visible key
    table: list[int]


# (query, key, value, attn_bias) -> output; xformers' CUDA kernels unless a test swaps in a reference
Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, fmha.attn_bias.AttentionBias], torch.Tensor]


def _cuda_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: fmha.attn_bias.AttentionBias) -> torch.Tensor:
    out: torch.Tensor = fmha.memory_efficient_attention_forward(q, k, v, attn_bias=bias)
    return out


class XformersPagedAttention:
    def __init__(
        self,
        cache: PagedKVCache,
        batch: Batch,
        sliding_window: int | None,
        device: torch.device,
        kernel: Kernel = _cuda_kernel,
    ) -> None:
        self.cache = cache
        self.kernel = kernel
        block_size = cache.spec.block_size
        slots: list[int] = []
        fresh_rows: list[int] = []
        fresh_lengths: list[int] = []
        entries: list[_Entry] = []
        row = 0
        for chunk in batch.chunks:
            n = len(chunk.token_ids)
            slots.extend(chunk.slots(block_size))
            rows = list(range(row, row + n))
            table_start = chunk.first_block * block_size  # position of the table's first column
            if chunk.start_position == 0:
                fresh_rows.extend(rows)
                fresh_lengths.append(n)
            elif sliding_window is None or chunk.end_position - sliding_window <= table_start:
                entries.append(_Entry(rows, 0, chunk.end_position - table_start, list(chunk.block_table)))
            else:  # the window hides part of the table from some queries: one entry per query
                for i, position in enumerate(range(chunk.start_position, chunk.end_position)):
                    start = max(table_start, position - sliding_window + 1) - table_start
                    entries.append(_Entry([rows[i]], start, position + 1 - table_start, list(chunk.block_table)))
            row += n
        self.num_rows = row
        self.slot_mapping = torch.tensor(slots, dtype=torch.long, device=device)
        self.fresh_rows = torch.tensor(fresh_rows, dtype=torch.long, device=device)
        self.fresh_bias: fmha.attn_bias.AttentionBias | None = None
        if fresh_lengths:
            causal = fmha.attn_bias.BlockDiagonalCausalMask.from_seqlens(fresh_lengths, device=device)
            self.fresh_bias = causal if sliding_window is None else causal.make_local_attention(sliding_window)
        self.context_rows = torch.tensor([r for e in entries for r in e.rows], dtype=torch.long, device=device)
        self.context_bias: fmha.attn_bias.PagedBlockDiagonalCausalWithOffsetGappyKeysMask | None = None
        if entries:
            width = max(len(e.table) for e in entries)
            tables = torch.full((len(entries), width), NULL_BLOCK, dtype=torch.int32)
            for i, entry in enumerate(entries):
                tables[i, : len(entry.table)] = torch.tensor(entry.table, dtype=torch.int32)
            # Built unpaged over a notional layout (entry i's keys at i * padding + column), then
            # made paged: in xformers 0.0.35 the paged class's own from_seqlens rejects every input.
            padding = width * block_size
            unpaged = fmha.attn_bias.BlockDiagonalCausalWithOffsetGappyKeysMask.from_seqlens(
                q_seqlen=[len(e.rows) for e in entries],
                kv_seqstarts=[i * padding + e.key_start for i, e in enumerate(entries)] + [len(entries) * padding],
                kv_seqlen=[e.key_end - e.key_start for e in entries],
                device=device,
            )
            self.context_bias = unpaged.make_paged(
                block_tables=tables.to(device),
                page_size=block_size,
                notional_padding=padding,
                paged_type=fmha.attn_bias.PagedBlockDiagonalCausalWithOffsetGappyKeysMask,
            )

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        num_kv_heads, head_dim = k.shape[1], k.shape[2]
        group = q.shape[1] // num_kv_heads
        key_cache = self.cache.keys[layer].view(-1, num_kv_heads, head_dim)
        value_cache = self.cache.values[layer].view(-1, num_kv_heads, head_dim)
        key_cache.index_copy_(0, self.slot_mapping, k)
        value_cache.index_copy_(0, self.slot_mapping, v)
        out = torch.empty_like(q)

        def grouped(x: torch.Tensor, heads: int) -> torch.Tensor:  # (N, G*heads, D) -> (1, N, G, heads, D)
            return x.reshape(1, x.shape[0], num_kv_heads, heads, head_dim)

        def expanded(x: torch.Tensor) -> torch.Tensor:  # (N, G, D) -> (1, N, G, group, D), stride 0
            return x[None, :, :, None, :].expand(1, x.shape[0], num_kv_heads, group, head_dim)

        if self.fresh_bias is not None:
            rows = self.fresh_rows
            attended = self.kernel(grouped(q[rows], group), expanded(k[rows]), expanded(v[rows]), self.fresh_bias)
            out[rows] = attended.reshape(len(rows), -1, head_dim)
        if self.context_bias is not None:
            rows = self.context_rows
            attended = self.kernel(
                grouped(q[rows], group), expanded(key_cache), expanded(value_cache), self.context_bias
            )
            out[rows] = attended.reshape(len(rows), -1, head_dim)
        return out

    def dense_mask(self) -> torch.Tensor:
        """(rows, cache slots) booleans from xformers' own ``materialize`` of both masks (for tests)."""
        block_size = self.cache.spec.block_size
        total = self.cache.num_blocks * block_size
        dense = torch.zeros(self.num_rows, total, dtype=torch.bool)
        if self.fresh_bias is not None:
            n = len(self.fresh_rows)
            visible = self.fresh_bias.materialize((n, n)) == 0
            fresh_slots = self.slot_mapping[self.fresh_rows].cpu()
            for i, row in enumerate(self.fresh_rows.tolist()):
                dense[row, fresh_slots[visible[i]]] = True
        if self.context_bias is not None:
            visible = self.context_materialized() == 0
            dense[self.context_rows.cpu(), : visible.shape[1]] = visible
        return dense

    def context_materialized(self) -> torch.Tensor:
        """Additive (rows, physical slots) bias of the paged mask, as xformers materializes it."""
        assert self.context_bias is not None
        bias = self.context_bias
        notional = len(bias.q_seqinfo.seqstart_py[:-1]) * bias.block_tables.shape[1] * bias.page_size
        dense: torch.Tensor = bias.materialize((len(self.context_rows), notional))
        return dense
