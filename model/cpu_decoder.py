"""The decoder on CPU through the compiled kernels of ``model.kernels`` (the ``cpu`` backend).

Weights are packed once, here, for the kernels (fp32 or bf16, as the model holds them), and
with ``release_weights`` the model's own copies are freed as each is packed, so memory holds
one copy; weights kept quantized come packed from the loader (``model.quantized``).
Activations and the residual stream are fp32; the KV cache has the cache's dtype.
Per layer, with every intermediate in a buffer kept from step to step::

    h = rmsnorm(x);  qkv = h Wqkv^T;  rotate q, k and write k, v to their cache slots
    a = paged_attention(q);  x += a Wo^T                       (residual add in the GEMM)
    h = rmsnorm(x);  x += (silu(h Wgate^T) * (h Wup^T)) Wdown^T  (SiLU-and-mul in the GEMM)

Logits: only the rows that need them are normed and multiplied by the output head.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from types import ModuleType
from typing import Any, cast

import structlog
import torch
from torch import nn

from model.batch import Batch
from model.kv_cache import PagedKVCache
from model.mistral import DecoderLayer, MistralModel
from model.moe import SparseMoE, count_tokens, route_host

log = structlog.get_logger(__name__)
KERNEL_DTYPES = (torch.float32, torch.bfloat16)
STORE, ACCUMULATE, SILU_MUL = 0, 1, 2  # GEMM epilogues


@dataclass(frozen=True)
class StepMetadata:
    """One step's inputs as int64 tensors (see ``csrc/attention.cpp`` for the index arithmetic)."""

    token_ids: torch.Tensor  # (T,)
    positions: torch.Tensor  # (T,)
    slots: torch.Tensor  # (T,) cache row of each new token's key and value
    logit_rows: torch.Tensor  # rows of the batch whose logits are returned
    row_start: torch.Tensor  # (chunks,) first query row of each chunk
    num_queries: torch.Tensor
    start_pos: torch.Tensor
    first_block: torch.Tensor
    table_offset: torch.Tensor  # where each chunk's block table starts in ``tables``
    table_len: torch.Tensor
    tables: torch.Tensor

    @classmethod
    def of(cls, batch: Batch, block_size: int) -> StepMetadata:
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logit_rows: list[int] = []
        row_start, num_queries, start_pos, first_block, table_offset, table_len = [], [], [], [], [], []
        tables: list[int] = []
        for chunk in batch.chunks:
            row_start.append(len(ids))
            num_queries.append(len(chunk.token_ids))
            start_pos.append(chunk.start_position)
            first_block.append(chunk.first_block)
            table_offset.append(len(tables))
            table_len.append(len(chunk.block_table))
            tables.extend(chunk.block_table)
            ids.extend(chunk.token_ids)
            positions.extend(range(chunk.start_position, chunk.end_position))
            slots.extend(chunk.slots(block_size))
            logit_rows.extend(range(len(ids) - chunk.num_logits, len(ids)))

        def t(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64)

        return cls(t(ids), t(positions), t(slots), t(logit_rows), t(row_start), t(num_queries), t(start_pos),
                   t(first_block), t(table_offset), t(table_len), t(tables or [0]))  # fmt: skip


@dataclass
class _Experts:
    """A Mixtral layer's feed-forward: the router (fp32, (experts, hidden)) and each expert's packed
    gate_up and down; ``tokens`` counts the tokens routed to each expert."""

    router: Any  # kernels.PackedLinear, fp32 (experts, hidden)
    top_k: int
    gate_up: list[Any]
    down: list[Any]
    tokens: list[int]


@dataclass
class _Layer:
    input_norm: torch.Tensor
    qkv: Any  # kernels.PackedLinear
    o: Any
    post_norm: torch.Tensor
    gate_up: Any  # None in MoE layers
    down: Any
    window: int  # 0: none
    experts: _Experts | None = None


class _Buffers:
    """Activations for up to ``capacity`` tokens and ``logit_capacity`` logit rows, grown on demand."""

    def __init__(self, hidden: int, qkv: int, attention: int, intermediate: int, vocab: int) -> None:
        self.widths = {"x": hidden, "h": hidden, "qkv": qkv, "attn": attention, "act": intermediate}
        self.vocab = vocab
        self.capacity = -1  # nothing allocated yet
        self.logit_capacity = -1
        self.tensors: dict[str, torch.Tensor] = {}

    def take(self, tokens: int, logit_rows: int) -> dict[str, torch.Tensor]:
        if tokens > self.capacity:
            self.capacity = max(tokens, 2 * self.capacity, 64)
            for name, width in self.widths.items():
                self.tensors[name] = torch.empty(self.capacity, width)
        if logit_rows > self.logit_capacity:
            self.logit_capacity = max(logit_rows, 2 * self.logit_capacity, 8)
            self.tensors["final"] = torch.empty(self.logit_capacity, self.widths["x"])
            self.tensors["normed"] = torch.empty(self.logit_capacity, self.widths["x"])
            self.tensors["logits"] = torch.empty(self.logit_capacity, self.vocab)
        views = {name: self.tensors[name][:tokens] for name in self.widths}
        views.update({name: self.tensors[name][:logit_rows] for name in ("final", "normed", "logits")})
        return views


def pick_bf16_compute(kernels: ModuleType) -> int:
    """0: widen bf16 weights to fp32 and FMA; 1: vdpbf16ps. Measured once: vdpbf16ps only when it
    takes under 0.75x the time, since it also rounds the activations to bf16 (less exact). Each
    mode's time is its best of 5 rounds, interleaved: load from other processes only slows a
    round, so one slow burst can no longer flip the choice.

    Where AVX512-BF16 exists its dot-product instruction is not always the faster one: on an
    Intel Xeon with AVX-512 it runs at about half the fp32 FMA rate, on AMD Zen 4 at twice it. A
    plain "faster wins" let a noisy timing on a Xeon switch the arithmetic (and a parity test
    failed on it); the margin keeps the choice to machines where the instruction truly pays.
    """
    if not kernels.has_bf16_dot():
        return 0
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(1536, 1024, generator=generator).bfloat16()
    x = torch.randn(64, 1024, generator=generator)
    out = torch.empty(64, 1536)
    layers = [kernels.PackedLinear(weight, False, True, mode) for mode in (0, 1)]
    timings = [float("inf"), float("inf")]
    for _ in range(5):
        for mode, packed in enumerate(layers):
            packed.forward(x, out, STORE)
            start = time.perf_counter()
            for _ in range(10):
                packed.forward(x, out, STORE)
            timings[mode] = min(timings[mode], time.perf_counter() - start)
    mode = 1 if timings[1] < 0.75 * timings[0] else 0
    log.info("bf16 products", mode=("widen+fma", "vdpbf16ps")[mode], widen_s=timings[0], dot_s=timings[1])
    return mode


class CpuDecoder:
    def __init__(self, model: MistralModel, kernels: ModuleType, cache: PagedKVCache, release_weights: bool) -> None:
        cfg = model.config
        if model.dtype not in KERNEL_DTYPES or cache.spec.dtype not in KERNEL_DTYPES:
            raise ValueError(f"the cpu backend runs float32 and bfloat16 models and caches, not {model.dtype}")
        assert cache.layout == "cpu", "the cpu backend reads the 'cpu' KV-cache layout"
        self.config = cfg
        self.cache = cache
        self.kernels = kernels
        bf16 = model.dtype == torch.bfloat16
        compute = pick_bf16_compute(kernels) if bf16 else 0

        def pack(target: str, gated: bool = False) -> Any:
            if target in model.quantized:  # packed by the loader
                return model.quantized[target]
            parameter = model.get_parameter(target)
            packed = kernels.PackedLinear(parameter.detach(), gated, bf16, compute)
            if release_weights:
                parameter.data = torch.empty(0, dtype=parameter.dtype)
            return packed

        def norm(parameter: nn.Parameter) -> torch.Tensor:
            return parameter.detach().float().contiguous()

        def experts(i: int, layer: DecoderLayer) -> _Experts:
            moe = cast(SparseMoE, layer.mlp)
            count = cfg.num_experts
            return _Experts(
                router=kernels.PackedLinear(norm(moe.router.weight), False, False, 0),
                top_k=moe.top_k,
                gate_up=[pack(f"layers.{i}.mlp.experts.{e}.gate_up_proj", gated=True) for e in range(count)],
                down=[pack(f"layers.{i}.mlp.experts.{e}.down_proj") for e in range(count)],
                tokens=moe.expert_tokens,
            )

        decoder_layers = [cast(DecoderLayer, layer) for layer in model.layers]
        self.layers = [
            _Layer(
                input_norm=norm(layer.input_layernorm.weight),
                qkv=pack(f"layers.{i}.self_attn.qkv_proj"),
                o=pack(f"layers.{i}.self_attn.o_proj"),
                post_norm=norm(layer.post_attention_layernorm.weight),
                gate_up=None if cfg.is_moe else pack(f"layers.{i}.mlp.gate_up_proj", gated=True),
                down=None if cfg.is_moe else pack(f"layers.{i}.mlp.down_proj"),
                window=cfg.window_of(i) or 0,
                experts=experts(i, layer) if cfg.is_moe else None,
            )
            for i, layer in enumerate(decoder_layers)
        ]
        self.final_norm = norm(model.norm.weight)
        self.embedding: torch.Tensor | None = None
        self.embedding_rows: Any = None  # a packed (quantized) embedding table, rows gathered from it
        if cfg.tie_word_embeddings:
            self.head = pack("embed_tokens")  # embedding rows are gathered from the packed head
            self.embedding_rows = self.head
        else:
            self.head = pack("lm_head")
            if "embed_tokens" in model.quantized:
                self.embedding_rows = model.quantized["embed_tokens"]
            else:
                self.embedding = model.embed_tokens.detach()
        half = cfg.head_dim // 2
        self.cos = model.rotary.cos[:, :half].float().contiguous()
        self.sin = model.rotary.sin[:, :half].float().contiguous()
        self.scale = cfg.head_dim**-0.5
        self.buffers = _Buffers(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, cfg.q_size, cfg.intermediate_size,
                                cfg.vocab_size)  # fmt: skip
        self.weight_bytes = sum(p.nbytes for layer in self.layers for p in _packed(layer)) + self.head.nbytes
        if self.embedding_rows is not None and self.embedding_rows is not self.head:
            self.weight_bytes += self.embedding_rows.nbytes

    def execute(self, batch: Batch) -> torch.Tensor:
        """Logits (rows that need them, vocab) fp32; a view of a buffer valid until the next call."""
        meta = StepMetadata.of(batch, self.cache.spec.block_size)
        k, cfg, eps = self.kernels, self.config, self.config.rms_norm_eps
        b = self.buffers.take(len(meta.token_ids), len(meta.logit_rows))
        x = b["x"]
        if self.embedding is None:
            self.embedding_rows.gather_rows(meta.token_ids, x)
        else:
            x.copy_(self.embedding.index_select(0, meta.token_ids))
        for i, layer in enumerate(self.layers):
            key_cache, value_cache = self.cache.keys[i], self.cache.values[i]
            k.rms_norm(x, layer.input_norm, eps, b["h"])
            layer.qkv.forward(b["h"], b["qkv"], STORE)
            k.rotary_cache(b["qkv"], meta.positions, self.cos, self.sin, meta.slots, key_cache, value_cache,
                           cfg.num_heads)  # fmt: skip
            k.paged_attention(b["qkv"], key_cache, value_cache, meta.row_start, meta.num_queries, meta.start_pos,
                              meta.first_block, meta.table_offset, meta.table_len, meta.tables, cfg.num_heads,
                              layer.window, self.scale, b["attn"])  # fmt: skip
            layer.o.forward(b["attn"], x, ACCUMULATE)
            k.rms_norm(x, layer.post_norm, eps, b["h"])
            if layer.experts is None:
                layer.gate_up.forward(b["h"], b["act"], SILU_MUL)
                layer.down.forward(b["act"], x, ACCUMULATE)
            else:
                self._experts(layer.experts, b["h"], x, b["act"])
        torch.index_select(x, 0, meta.logit_rows, out=b["final"])
        k.rms_norm(b["final"], self.final_norm, eps, b["normed"])
        self.head.forward(b["normed"], b["logits"], STORE)
        return b["logits"]

    def _experts(self, experts: _Experts, h: torch.Tensor, x: torch.Tensor, scratch: torch.Tensor) -> None:
        """``x += MoE(h)``: one gate_up and one down product per expert that has tokens this step.
        The router weight scales the expert's activations before ``down`` (a linear map, so the same
        sum); an expert every token chose (always, with one token) accumulates straight into ``x``.
        ``scratch``: (tokens, intermediate) for the activations."""
        num_tokens = h.shape[0]
        logits = torch.empty(num_tokens, len(experts.gate_up))
        experts.router.forward(h, logits, STORE)
        routing = route_host(logits, experts.top_k)
        count_tokens(experts.tokens, routing)
        for index, tokens, weights in routing.groups():
            every = len(tokens) == num_tokens  # then tokens == arange(num_tokens): see route_host()
            rows = h if every else h.index_select(0, tokens)
            act = scratch[: rows.shape[0]]
            experts.gate_up[index].forward(rows, act, SILU_MUL)
            act.mul_(weights.view(-1, 1))
            if every:
                experts.down[index].forward(act, x, ACCUMULATE)
            else:
                out = torch.empty(rows.shape[0], rows.shape[1])
                experts.down[index].forward(act, out, STORE)
                x.index_add_(0, tokens, out)


def _packed(layer: _Layer) -> list[Any]:
    """Every packed weight of a layer."""
    if layer.experts is None:
        return [layer.qkv, layer.o, layer.gate_up, layer.down]
    return [layer.qkv, layer.o, *layer.experts.gate_up, *layer.experts.down]
