"""xformers' own reference attention (``xformers.attn_bias_utils.ref_attention``), as a kernel.

Stands in for the CUDA kernels on CPU: it materializes the very bias objects the
xformers backend built and runs plain softmax attention with them.
"""

from __future__ import annotations

import torch
from xformers.attn_bias_utils import ref_attention
from xformers.ops import fmha


def reference_kernel(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: fmha.attn_bias.AttentionBias
) -> torch.Tensor:
    """q (1, M, G, H, D); k, v (1, N, G, H, D), possibly the whole paged cache."""
    _, m, groups, heads, _ = q.shape
    if isinstance(bias, fmha.attn_bias.PagedBlockDiagonalGappyKeysMask):
        notional = (len(bias.q_seqinfo.seqstart_py) - 1) * bias.block_tables.shape[1] * bias.page_size
        dense = bias.materialize((m, notional))  # (M, physical slots used), additive
        k, v = k[:, : dense.shape[1]], v[:, : dense.shape[1]]
    else:
        dense = bias.materialize((m, k.shape[1]))
    tensor_bias = dense[None, None, None].expand(1, groups, heads, m, dense.shape[1])
    return ref_attention(q, k, v, attn_bias=tensor_bias).to(q.dtype)  # type: ignore[no-any-return]
