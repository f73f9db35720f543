"""Model runner: one forward pass over a packed ``Batch``, logits for the rows that need them.

Backends: ``cpu`` runs the whole decoder through the compiled CPU kernels (``model.cpu_decoder``);
``torch`` (CPU or CUDA) and ``xformers`` (CUDA) run ``MistralModel`` with that attention.
Host-side preparation happens once per step (token ids, positions, slot mapping and the
attention metadata), never per layer.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch

from model.attention import Attention, PerLayerWindows
from model.attention_torch import TorchPagedAttention
from model.batch import Batch
from model.cpu_decoder import KERNEL_DTYPES, CpuDecoder
from model.kernels import cpu_kernels
from model.kv_cache import PagedKVCache
from model.mistral import MistralModel
from model.moe import SparseMoE

BACKENDS = ("auto", "cpu", "torch", "xformers")
AttentionFactory = Callable[[PagedKVCache, Batch, int | None, torch.device], Attention]


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """``auto``: on CUDA xformers when it is installed, else torch; on CPU the compiled kernels
    for float32 and bfloat16 models where they build, else torch."""
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is not one of: {', '.join(BACKENDS)}")
    has_xformers = importlib.util.find_spec("xformers") is not None
    cpu_ok = device.type == "cpu" and dtype in KERNEL_DTYPES
    if name == "auto":
        if device.type == "cuda":
            return "xformers" if has_xformers else "torch"
        return "cpu" if cpu_ok and cpu_kernels() is not None else "torch"
    if name == "xformers" and (device.type != "cuda" or not has_xformers):
        raise ValueError("attention backend 'xformers' needs a CUDA device and the xformers package")
    if name == "cpu" and not cpu_ok:
        raise ValueError("attention backend 'cpu' needs the CPU device and a float32 or bfloat16 model")
    if name == "cpu" and cpu_kernels() is None:
        raise ValueError("attention backend 'cpu' needs the compiled CPU kernels, which failed to build (see the log)")
    return name


def cache_layout(backend: str) -> str:
    """The ``PagedKVCache`` layout a resolved backend reads."""
    return "cpu" if backend == "cpu" else "flat"


def attention_factory(name: str) -> AttentionFactory:
    if name == "xformers":
        from model.attention_xformers import XformersPagedAttention

        return XformersPagedAttention
    return TorchPagedAttention


class ModelRunner:
    def __init__(
        self,
        model: MistralModel,
        cache: PagedKVCache,
        backend: str = "auto",
        attention: AttentionFactory | None = None,
        release_weights: bool = False,
    ) -> None:
        """``attention`` overrides the backend's factory (tests run xformers' masks on CPU this way).
        ``release_weights``: the cpu backend frees the model's weights once packed (one copy in memory)."""
        self.model = model
        self.cache = cache
        self.backend = resolve_backend(backend, model.device, model.dtype) if attention is None else backend
        self._attention = attention or attention_factory(self.backend)
        if cache.layout != cache_layout(self.backend):
            raise ValueError(
                f"backend {self.backend!r} needs a {cache_layout(self.backend)!r} KV cache, got {cache.layout!r}"
            )
        if model.quantized and self.backend != "cpu":
            raise ValueError(
                f"quantized weights run on the cpu backend, not {self.backend!r}; load with quantization 'none' "
                "to dequantize them"
            )
        self.decoder: CpuDecoder | None = None
        if self.backend == "cpu":
            kernels = cpu_kernels()
            assert kernels is not None
            self.decoder = CpuDecoder(model, kernels, cache, release_weights)
        self.num_computed_tokens = 0  # every token that went through a forward pass

    def execute(self, batch: Batch) -> torch.Tensor:
        """Logits (batch.num_logits, vocab) in fp32, in chunk order, last rows of each chunk."""
        self.cache.copy_blocks(list(batch.block_copies))
        if self.decoder is not None:
            with torch.inference_mode():
                logits = self.decoder.execute(batch)
            self.num_computed_tokens += batch.num_tokens
            return logits
        device = self.model.device
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
            attention = self._layer_attention(batch, device)
            hidden = self.model(ids, pos, attention)
            logits = self.model.compute_logits(hidden[torch.tensor(logit_rows, dtype=torch.long, device=device)])
        self.num_computed_tokens += len(token_ids)
        return logits

    def expert_tokens(self) -> tuple[tuple[int, ...], ...]:
        """Mixture-of-experts models: tokens routed to each expert of each layer so far; else ()."""
        return tuple(tuple(layer.mlp.expert_tokens) for layer in self.model.layers if isinstance(layer.mlp, SparseMoE))

    def _layer_attention(self, batch: Batch, device: torch.device) -> Attention:
        config = self.model.config
        if not config.layer_windows:
            return self._attention(self.cache, batch, config.sliding_window, device)
        return PerLayerWindows(lambda window: self._attention(self.cache, batch, window, device), config.windows)
