"""Model runner: one forward pass over a packed ``Batch``, logits for the rows that need them.

Host-side preparation happens once per step (token ids, positions, slot mapping and the
attention metadata), never per layer.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch

from model.attention import Attention
from model.attention_torch import TorchPagedAttention
from model.batch import Batch
from model.kv_cache import PagedKVCache
from model.mistral import MistralModel

BACKENDS = ("auto", "torch", "xformers")
AttentionFactory = Callable[[PagedKVCache, Batch, int | None, torch.device], Attention]


def resolve_backend(name: str, device: torch.device) -> str:
    """``auto`` is xformers on CUDA when it is installed, else torch."""
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is not one of: {', '.join(BACKENDS)}")
    has_xformers = importlib.util.find_spec("xformers") is not None
    if name == "auto":
        return "xformers" if device.type == "cuda" and has_xformers else "torch"
    if name == "xformers" and (device.type != "cuda" or not has_xformers):
        raise ValueError("attention backend 'xformers' needs a CUDA device and the xformers package")
    return name


def attention_factory(name: str) -> AttentionFactory:
    if name == "xformers":
        from model.attention_xformers import XformersPagedAttention

        return XformersPagedAttention
    return TorchPagedAttention


class ModelRunner:
    def __init__(
        self, model: MistralModel, cache: PagedKVCache, backend: str = "auto", attention: AttentionFactory | None = None
    ) -> None:
        """``attention`` overrides the backend's factory (tests run xformers' masks on CPU this way)."""
        self.model = model
        self.cache = cache
        self.backend = resolve_backend(backend, model.device) if attention is None else backend
        self._attention = attention or attention_factory(self.backend)
        self.num_computed_tokens = 0  # every token that went through a forward pass

    def execute(self, batch: Batch) -> torch.Tensor:
        """Logits (batch.num_logits, vocab) in fp32, in chunk order, last rows of each chunk."""
        device = self.model.device
        self.cache.copy_blocks(list(batch.block_copies))
        token_ids: list[int] = []
        positions: list[int] = []
        logit_rows: list[int] = []
        for chunk in batch.chunks:
            row = len(token_ids)
            token_ids.extend(chunk.token_ids)
            positions.extend(range(chunk.start_position, chunk.end_position))
            logit_rows.extend(range(len(token_ids) - chunk.num_logits, len(token_ids)))
            assert row + len(chunk.token_ids) == len(token_ids)
        ids = torch.tensor(token_ids, dtype=torch.long, device=device)
        pos = torch.tensor(positions, dtype=torch.long, device=device)
        with torch.inference_mode():
            attention = self._attention(self.cache, batch, self.model.config.sliding_window, device)
            hidden = self.model(ids, pos, attention)
            logits = self.model.compute_logits(hidden[torch.tensor(logit_rows, dtype=torch.long, device=device)])
        self.num_computed_tokens += len(token_ids)
        return logits
