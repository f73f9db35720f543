"""Paged KV-cache tensors: per layer K and V, ``num_blocks`` blocks of ``block_size`` tokens.

Layouts: ``flat`` (the torch and xformers backends) keeps K and V as (num_blocks, block_size,
n_kv_heads, head_dim); ``cpu`` (the compiled CPU kernels) is head-major with each block's keys
transposed, K (num_blocks, n_kv_heads, head_dim, block_size) and V (num_blocks, n_kv_heads,
block_size, head_dim), so one vector load holds a dimension of 16 consecutive keys.

Sized for the KV heads, never the query heads: Mistral 7B (32 layers, 8 KV heads of 128,
fp16) needs 2 * 32 * 8 * 128 * 2 = 131,072 bytes per token, a quarter of what the same
model with 32 KV heads (MHA) would. Block 0 is reserved as the null block: padding
entries of block tables point at it and no sequence ever owns it.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog
import torch

from model.config import ModelConfig
from model.mistral import MistralModel

log = structlog.get_logger(__name__)

NULL_BLOCK = 0
LAYOUTS = ("flat", "cpu")


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    block_size: int

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")

    @classmethod
    def for_model(cls, config: ModelConfig, dtype: torch.dtype, block_size: int) -> KVCacheSpec:
        return cls(config.num_layers, config.num_kv_heads, config.head_dim, dtype, block_size)

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    @property
    def block_bytes(self) -> int:
        return self.bytes_per_token * self.block_size

    def num_blocks_for(self, budget_bytes: int) -> int:
        """How many blocks a memory budget holds: ``floor(budget / block_bytes)``."""
        return budget_bytes // self.block_bytes


class PagedKVCache:
    def __init__(self, spec: KVCacheSpec, num_blocks: int, device: torch.device, layout: str = "flat") -> None:
        if num_blocks < 2:
            raise ValueError(
                f"the KV cache needs at least 2 blocks of {spec.block_bytes} bytes (one is the null block), "
                f"got {num_blocks}: raise the KV-cache memory budget"
            )
        if layout not in LAYOUTS:
            raise ValueError(f"KV-cache layout {layout!r} is not one of: {', '.join(LAYOUTS)}")
        self.spec = spec
        self.num_blocks = num_blocks
        self.layout = layout
        blocks, size, heads, dim = num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim
        key_shape, value_shape = (
            ((blocks, size, heads, dim),) * 2
            if layout == "flat"
            else ((blocks, heads, dim, size), (blocks, heads, size, dim))
        )
        self.keys = [torch.zeros(key_shape, dtype=spec.dtype, device=device) for _ in range(spec.num_layers)]
        self.values = [torch.zeros(value_shape, dtype=spec.dtype, device=device) for _ in range(spec.num_layers)]
        log.info(
            "kv cache allocated",
            bytes_per_token=spec.bytes_per_token,
            block_bytes=spec.block_bytes,
            num_blocks=num_blocks,
            block_size=spec.block_size,
            token_capacity=self.token_capacity,
            dtype=str(spec.dtype).removeprefix("torch."),
            device=str(device),
            layout=layout,
        )

    @classmethod
    def from_budget(
        cls, spec: KVCacheSpec, budget_bytes: int, device: torch.device, layout: str = "flat"
    ) -> PagedKVCache:
        return cls(spec, spec.num_blocks_for(budget_bytes), device, layout)

    @property
    def usable_block_ids(self) -> range:
        """Blocks the block manager may hand out: all but the null block."""
        return range(NULL_BLOCK + 1, self.num_blocks)

    @property
    def token_capacity(self) -> int:
        return (self.num_blocks - 1) * self.spec.block_size

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate whole blocks (src -> dst) in every layer."""
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], device=self.keys[0].device)
        dst = torch.tensor([d for _, d in copies], device=self.keys[0].device)
        for cache in (*self.keys, *self.values):
            cache[dst] = cache[src]


def cuda_kv_budget(model: MistralModel, utilization: float, profile_tokens: int) -> int:
    """Bytes left for the KV cache on CUDA: ``utilization`` of the device's memory, minus what
    the weights and a forward pass over ``profile_tokens`` tokens (activations) peak at."""
    from model.dense_cache import DenseKVCache

    device = model.device
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    tokens = min(profile_tokens, model.config.max_position_embeddings)
    with torch.inference_mode():
        cache = DenseKVCache(model.config)
        ids = torch.zeros(tokens, dtype=torch.long, device=device)
        model.compute_logits(model(ids, torch.arange(tokens, device=device), cache.attention(tokens)))
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del cache
    torch.cuda.empty_cache()
    _, total = torch.cuda.mem_get_info(device)
    budget = int(total * utilization) - peak
    log.info(
        "cuda memory profiled", total_bytes=total, peak_bytes=peak, utilization=utilization, kv_budget_bytes=budget
    )
    if budget <= 0:
        raise ValueError(f"no GPU memory left for the KV cache at --gpu-memory-utilization {utilization}")
    return budget


def parse_bytes(text: str) -> int:
    """``2GiB``, ``512MiB``, ``1.5GB``, ``1000000`` -> bytes (binary and decimal units)."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip
    stripped = text.strip().upper()
    number = stripped.rstrip("KMGTIB")
    unit = stripped[len(number) :]
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"{text!r} is not a size (examples: 2GiB, 512MiB, 1.5GB, 1000000)") from None
    if unit not in units or value <= 0:
        raise ValueError(f"{text!r} is not a positive size (units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    return int(value * units[unit])
