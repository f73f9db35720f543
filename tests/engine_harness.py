"""Engines for tests: a tiny random model or the default model, stepped on the test's thread."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from model.kv_cache import KVCacheSpec, PagedKVCache
from model.mistral import MistralModel
from model.runner import ModelRunner, cache_layout, resolve_backend
from scheduler.block_manager import BlockManager
from scheduler.engine import Engine, EngineConfig, StepRecord
from scheduler.output_stream import SyncOutputStream
from scheduler.request import EngineRequest, RequestOutput, SamplingParams, TextUpdate
from scheduler.scheduler import SchedulerConfig


class NullText:
    """A text stream for token-level tests: no text, no stop strings."""

    def append(self, token_id: int, allow_stop: bool = True) -> TextUpdate:
        return TextUpdate("")

    def flush(self) -> str:
        return ""

    def fork(self) -> NullText:
        return self


@dataclass
class Result:
    outputs: dict[int, list[RequestOutput]] = field(default_factory=dict)

    def tokens(self, index: int = 0) -> list[int]:
        return [t for o in self.outputs[index] for t in o.token_ids]

    def final(self, index: int = 0) -> RequestOutput:
        return self.outputs[index][-1]

    def text(self, index: int = 0) -> str:
        return "".join(o.text for o in self.outputs[index])


def make_engine(
    model: MistralModel,
    *,
    num_blocks: int = 256,
    block_size: int = 4,
    max_num_batched_tokens: int = 512,
    max_num_seqs: int = 64,
    max_queued_requests: int = 1024,
    prefix_caching: bool = True,
    backend: str = "auto",
) -> Engine:
    """``auto``: the compiled CPU kernels where they build (what the server runs)."""
    spec = KVCacheSpec.for_model(model.config, model.dtype, block_size)
    backend = resolve_backend(backend, model.device, model.dtype)
    cache = PagedKVCache(spec, num_blocks, model.device, cache_layout(backend))
    blocks = BlockManager(cache.usable_block_ids, block_size, model.config.sliding_window, prefix_caching)
    config = EngineConfig(SchedulerConfig(max_num_batched_tokens, max_num_seqs), max_queued_requests, seed=1234)
    return Engine(ModelRunner(model, cache, backend), blocks, config)


def request(
    request_id: str, prompt: Sequence[int], params: SamplingParams, eos: tuple[int, ...] = (), priority: int = 0
) -> EngineRequest:
    return EngineRequest(request_id, list(prompt), params, NullText(), eos, priority)


def run(engine: Engine, requests: Sequence[EngineRequest]) -> dict[str, Result]:
    """Submit everything, step until idle on this thread, collect outputs per request and sample."""
    streams = {}
    for req in requests:
        stream = SyncOutputStream(req.params.n)
        engine.submit(req, stream)
        streams[req.request_id] = stream
    engine.run_until_idle()
    results = {}
    for request_id, stream in streams.items():
        result = Result()
        for output in stream:
            result.outputs.setdefault(output.index, []).append(output)
        results[request_id] = result
    return results


def record_steps(engine: Engine) -> list[StepRecord]:
    records: list[StepRecord] = []
    engine.step_listeners.append(records.append)
    return records


def tiny_prompts(count: int, vocab: int, seed: int = 0, lengths: Sequence[int] = (3, 40)) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(lengths[0], lengths[1], (count,), generator=gen).tolist()
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in sizes]
