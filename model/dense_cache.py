"""Contiguous KV cache for one sequence: the simple reference path (offline generate, tests).

Not the serving path: that is the paged cache, where many sequences share one block pool.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.attention import window_mask
from model.config import ModelConfig


class DenseKVCache:
    """Per-layer K/V tensors of one sequence, grown by concatenation."""

    def __init__(self, config: ModelConfig) -> None:
        self.windows = config.windows
        self.keys: list[torch.Tensor | None] = [None] * config.num_layers
        self.values: list[torch.Tensor | None] = [None] * config.num_layers
        self.length = 0

    def attention(self, num_new_tokens: int) -> DenseAttention:
        """The attention object for a forward pass over the next ``num_new_tokens`` positions."""
        attn = DenseAttention(self, self.length, num_new_tokens)
        self.length += num_new_tokens
        return attn


class DenseAttention:
    """Attention for positions ``[start, start + T)`` of the cache's sequence."""

    def __init__(self, cache: DenseKVCache, start: int, num_tokens: int) -> None:
        self.cache = cache
        self.start = start
        self.num_tokens = num_tokens
        self._masks: dict[int | None, torch.Tensor] = {}  # per window

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        cache = self.cache
        old_k, old_v = cache.keys[layer], cache.values[layer]
        keys = k if old_k is None else torch.cat([old_k, k])
        values = v if old_v is None else torch.cat([old_v, v])
        cache.keys[layer], cache.values[layer] = keys, values
        window = cache.windows[layer]
        if window not in self._masks:
            query_pos = torch.arange(self.start, self.start + self.num_tokens, device=q.device)
            key_pos = torch.arange(keys.shape[0], device=q.device)
            self._masks[window] = window_mask(query_pos, key_pos, window)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1),  # (n_heads, T, head_dim)
            keys.transpose(0, 1),  # (n_kv_heads, S, head_dim)
            values.transpose(0, 1),
            attn_mask=self._masks[window],
            enable_gqa=True,
        )
        return out.transpose(0, 1)
