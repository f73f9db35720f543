"""Decode-step time of the paged runner vs Hugging Face transformers with its own KV cache.

Same weights (the default model, fp32; the paged runner on its default backend, the compiled
CPU kernels), same shapes: ``batch`` sequences with a
``context``-token prompt each, then one new token per sequence per step. Steps of the
two alternate, so both see the same machine load; the result is the ratio of medians,
HF time / our time.

    .venv/bin/python -m bench.decode_bench [--batches 1 8 32 64] [--context 128] [--steps 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

from model.batch import Batch, Chunk
from model.default_model import default_cache_dir, ensure_default_model
from model.kv_cache import KVCacheSpec, PagedKVCache
from model.loader import load_model
from model.mistral import MistralModel
from model.runner import ModelRunner, cache_layout, resolve_backend

BLOCK = 16


def paged_decoder(model: MistralModel, batch: int, context: int, steps: int) -> Callable[[], None]:
    """Prefill ``batch`` sequences (not timed); return one decode step of all of them."""
    return paged_runner(model, batch, context, steps)[1]


def paged_runner(
    model: MistralModel, batch: int, context: int, steps: int, distinct: bool = False
) -> tuple[ModelRunner, Callable[[], None]]:
    """``paged_decoder`` and the runner it steps. ``distinct``: each sequence its own prompt and
    decode tokens (else all the same, as the HF comparison feeds)."""
    per_seq = -(-(context + steps + 4) // BLOCK)
    spec = KVCacheSpec.for_model(model.config, model.dtype, BLOCK)
    backend = resolve_backend("auto", model.device, model.dtype)
    cache = PagedKVCache(spec, batch * per_seq + 1, model.device, cache_layout(backend))
    runner = ModelRunner(model, cache, backend)
    tables = [list(range(1 + i * per_seq, 1 + (i + 1) * per_seq)) for i in range(batch)]
    for i, table in enumerate(tables):
        start = 1000 + (97 * i if distinct else 0)
        runner.execute(Batch([Chunk(list(range(start, start + context)), 0, table)]))
    position = [context]

    def step() -> None:
        tokens = [42 + (position[0] * 31 + 17 * i if distinct else 0) for i in range(batch)]
        runner.execute(Batch([Chunk([t], position[0], table) for t, table in zip(tokens, tables, strict=True)]))
        position[0] += 1

    return runner, step


def hf_decoder(hf: Any, batch: int, context: int) -> Callable[[], None]:
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.inference_mode():
        hf(input_ids=torch.arange(1000, 1000 + context).repeat(batch, 1), past_key_values=cache, use_cache=True)
    token = torch.full((batch, 1), 42)

    def step() -> None:
        with torch.inference_mode():
            hf(input_ids=token, past_key_values=cache, use_cache=True)

    return step


def alternate_ms(first: Callable[[], None], second: Callable[[], None], steps: int) -> tuple[float, float]:
    """Median milliseconds of each, their steps interleaved, after one warm-up step each."""
    first()
    second()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(steps):
        for fn, record in ((first, times[0]), (second, times[1])):
            start = time.perf_counter()
            fn()
            record.append(1000 * (time.perf_counter() - start))
    return statistics.median(times[0]), statistics.median(times[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' past_key_values rename
    from bench.hf_twin import hf_twin

    model = load_model(ensure_default_model(default_cache_dir(os.environ))).model
    hf = hf_twin(model)
    print(f"default model, fp32, {args.threads} threads, context {args.context}, median of {args.steps} steps")
    print("| batch | paged runner ms/step | HF transformers ms/step | HF / paged |")
    print("| ---: | ---: | ---: | ---: |")
    for batch in args.batches:
        ours, theirs = alternate_ms(
            paged_decoder(model, batch, args.context, args.steps), hf_decoder(hf, batch, args.context), args.steps
        )
        print(f"| {batch} | {ours:.1f} | {theirs:.1f} | {theirs / ours:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
