"""The one interface between the decoder and any attention implementation.

The decoder hands each layer's projected ``q``, ``k``, ``v`` to an ``Attention``
object it receives as an argument, never from a global. The object owns the KV
storage (dense, paged) and the metadata that says which keys each query sees.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch


class Attention(Protocol):
    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store ``k``/``v`` of the new tokens and attend.

        Shapes: ``q`` (T, n_heads, head_dim); ``k``, ``v`` (T, n_kv_heads, head_dim);
        returns (T, n_heads, head_dim). T counts the new tokens of every sequence in the pass.
        """
        ...


def window_mask(query_pos: torch.Tensor, key_pos: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """Boolean (Tq, Tk) mask, True where a query may attend to a key.

    Same rule as Hugging Face's ``MistralForCausalLM``: causal, and with a window W
    a query at position i sees keys j with ``i - W < j <= i`` (W keys including itself).
    Example, W=3, query 5: keys 3, 4, 5.
    """
    diff = query_pos[:, None] - key_pos[None, :]
    mask = diff >= 0
    if sliding_window is not None:
        mask &= diff < sliding_window
    return mask


class PerLayerWindows:
    """Layers with different windows (Ministral): one attention object per distinct window, built
    by ``make(window)``, and each layer calls the one for its own window."""

    def __init__(self, make: Callable[[int | None], Attention], windows: Sequence[int | None]) -> None:
        by_window = {window: make(window) for window in dict.fromkeys(windows)}
        self.layers = [by_window[window] for window in windows]

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.layers[layer](layer, q, k, v)
