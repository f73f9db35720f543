"""A minimal scheduler for tests: drives sequences through the block manager and the runner.

Each step takes an explicit plan ``{seq_id: tokens to compute}``, so tests choose chunk
boundaries and interleavings; a sequence whose prompt is computed decodes greedily.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from model.batch import Batch, Chunk
from model.kv_cache import KVCacheSpec, PagedKVCache
from model.mistral import MistralModel
from model.runner import AttentionFactory, ModelRunner, cache_layout, resolve_backend
from scheduler.block_manager import BlockManager


@dataclass
class Sequence:
    tokens: list[int]
    prompt_len: int
    max_new: int
    computed: int = 0
    logits: list[torch.Tensor] = field(default_factory=list)  # one per generated token

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len :]

    @property
    def finished(self) -> bool:
        return len(self.generated) >= self.max_new


class PagedDriver:
    def __init__(
        self,
        model: MistralModel,
        num_blocks: int,
        block_size: int,
        *,
        prefix_caching: bool = True,
        backend: str = "torch",
        attention: AttentionFactory | None = None,
        on_step: Callable[[PagedDriver], None] | None = None,
    ) -> None:
        spec = KVCacheSpec.for_model(model.config, model.dtype, block_size)
        layout = "flat" if attention is not None else cache_layout(resolve_backend(backend, model.device, model.dtype))
        self.cache = PagedKVCache(spec, num_blocks, model.device, layout)
        self.blocks = BlockManager(self.cache.usable_block_ids, block_size, model.config.sliding_window, prefix_caching)
        self.runner = ModelRunner(model, self.cache, backend, attention=attention)
        self.seqs: dict[str, Sequence] = {}
        self.on_step = on_step
        self.forward_blocks: dict[str, int] = {}  # blocks each sequence held during the last forward pass

    def add(self, seq_id: str, prompt: list[int], max_new: int) -> None:
        self.seqs[seq_id] = Sequence(list(prompt), len(prompt), max_new)

    def step(self, plan: dict[str, int]) -> None:
        chunks: list[Chunk] = []
        self.forward_blocks = {}
        for seq_id, wanted in plan.items():
            seq = self.seqs[seq_id]
            assert not seq.finished
            hit = None
            if not self.blocks.has(seq_id):
                hit = self.blocks.lookup_prefix(seq.tokens)
                self.blocks.count_prefix_query(len(seq.tokens))
                seq.computed = hit.num_tokens
            n = min(wanted, len(seq.tokens) - seq.computed)
            assert n > 0 and self.blocks.allocate_slots(seq_id, n, hit), "out of blocks"
            table, first = self.blocks.block_table(seq_id)
            self.forward_blocks[seq_id] = len(table)
            done = seq.computed + n == len(seq.tokens)
            chunks.append(
                Chunk(seq.tokens[seq.computed : seq.computed + n], seq.computed, list(table), first, int(done))
            )
        logits = self.runner.execute(Batch(chunks, self.blocks.take_copies()))
        row = 0
        for (seq_id, _), chunk in zip(plan.items(), chunks, strict=True):
            seq = self.seqs[seq_id]
            seq.computed += len(chunk.token_ids)
            self.blocks.commit(seq_id, seq.tokens, seq.computed)
            if chunk.num_logits:
                seq.logits.append(logits[row].clone())  # the runner reuses its logits buffer
                seq.tokens.append(int(logits[row].argmax()))
                row += 1
                if seq.finished:
                    self.blocks.free(seq_id)
        if self.on_step:
            self.on_step(self)

    def fork(self, parent_id: str, child_id: str) -> None:
        """The child shares the parent's blocks (copy-on-write) and continues from its state."""
        self.blocks.fork(parent_id, child_id)
        parent = self.seqs[parent_id]
        self.seqs[child_id] = Sequence(list(parent.tokens), parent.prompt_len, parent.max_new, parent.computed)

    def remaining(self, seq_id: str) -> int:
        seq = self.seqs[seq_id]
        return len(seq.tokens) - seq.computed

    def run_to_completion(self, seq_ids: list[str], chunk: int = 10_000) -> None:
        while active := [s for s in seq_ids if not self.seqs[s].finished]:
            self.step({s: chunk for s in active})
