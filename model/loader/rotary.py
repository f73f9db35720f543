"""Converting Q/K projection rows from the interleaved RoPE layout to the rotate-half layout.

Mistral consolidated checkpoints and GGUF files rotate pairs of adjacent rows
(2i, 2i+1) of each head; Hugging Face checkpoints (and our model) rotate row i
with row i + head_dim/2. For head_dim = 4, one head:

    interleaved rows  [a0, b0, a1, b1]   ->   rotate-half rows  [a0, a1, b0, b1]

This undoes llama.cpp's ``permute`` in ``convert_hf_to_gguf.py`` and equals the
permutation Hugging Face's Mistral conversion script applies.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from model.loader.checkpoint import RowSource
from model.quant import QuantParts


def interleaved_to_half(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    rows, cols = weight.shape
    head_dim = rows // num_heads
    return weight.reshape(num_heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def permuted_rows(source: RowSource, head_dim: int) -> RowSource:
    """``source`` read in whole heads and converted to the rotate-half layout."""

    def read(start: int, end: int) -> torch.Tensor:
        return interleaved_to_half(source.read(start, end), (end - start) // head_dim)

    quantized = source.quantized
    if quantized is None:
        return replace(source, read=read, row_align=head_dim)

    def read_quantized(start: int, end: int) -> QuantParts:
        return quantized(start, end).map_rows(lambda t: interleaved_to_half(t, (end - start) // head_dim))

    return replace(source, read=read, quantized=read_quantized, row_align=head_dim)
