"""Where a forward pass of the cpu backend spends its time, kernel by kernel (default model).

Three steps of workload W's shapes, each the median of a few runs: a prefill step (16 prompts of
128 tokens, 2,048 tokens: what the scheduler packs), a decode step at batch 64 (context 192)
and a decode step of one sequence. Every kernel call is timed around its Python call (the
kernels are synchronous); "other" is the rest of the step (metadata, embedding, Python).

    .venv/bin/python -m bench.step_profile [--dtype auto|float32|bfloat16] [--quantization auto|none]
"""

from __future__ import annotations

import argparse
import collections
import os
import random
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
from model.runner import ModelRunner
from server.runtime import pick_dtype

BLOCK, SEQS, PROMPT, CONTEXT = 16, 64, 128, 192


class Timer:
    """Wraps a kernel module or a packed linear layer: every call adds its seconds under a name."""

    def __init__(self, target: Any, totals: dict[str, float], name: str | None = None) -> None:
        self.target, self.totals, self.name = target, totals, name

    def __getattr__(self, attribute: str) -> Callable[..., Any]:
        function = getattr(self.target, attribute)
        name = self.name or attribute

        def timed(*args: Any) -> Any:
            start = time.perf_counter()
            result = function(*args)
            self.totals[name] += time.perf_counter() - start
            return result

        return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    parser.add_argument("--quantization", default="none", choices=("auto", "none"))
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(os.cpu_count() or 1)
    dtype = pick_dtype(args.dtype, torch.device("cpu"))
    model = load_model(ensure_default_model(default_cache_dir(os.environ)), dtype, "cpu", args.quantization).model
    per_seq = -(-(CONTEXT + 1) // BLOCK)
    cache = PagedKVCache(KVCacheSpec.for_model(model.config, dtype, BLOCK), SEQS * per_seq + 1, model.device, "cpu")
    runner = ModelRunner(model, cache, "cpu", release_weights=True)
    decoder = runner.decoder
    assert decoder is not None
    totals: dict[str, float] = collections.defaultdict(float)
    # the timers stand in for the objects they wrap (duck typing; the decoder only calls methods)
    decoder.kernels = Timer(decoder.kernels, totals)  # type: ignore[assignment]
    for layer in decoder.layers:
        layer.qkv, layer.o = Timer(layer.qkv, totals, "qkv linear"), Timer(layer.o, totals, "o linear + residual")
        layer.gate_up = Timer(layer.gate_up, totals, "gate_up linear + silu*up")
        layer.down = Timer(layer.down, totals, "down linear + residual")
    decoder.head = Timer(decoder.head, totals, "output head")
    rng = random.Random(0)
    tables = [list(range(1 + i * per_seq, 1 + (i + 1) * per_seq)) for i in range(SEQS)]
    prompts = [[rng.randrange(100, model.config.vocab_size) for _ in range(PROMPT)] for _ in range(SEQS)]
    context = [p + [rng.randrange(100, model.config.vocab_size) for _ in range(CONTEXT - PROMPT)] for p in prompts]
    for i in range(SEQS):  # fill every sequence's cache up to CONTEXT tokens
        runner.execute(Batch([Chunk(context[i], 0, tables[i], num_logits=1)]))
    steps = {
        f"prefill: 16 prompts x {PROMPT} tokens": Batch(
            [Chunk(prompts[i], 0, tables[i], num_logits=1) for i in range(16)]
        ),
        f"decode: {SEQS} sequences, context {CONTEXT}": Batch([Chunk([5], CONTEXT, tables[i]) for i in range(SEQS)]),
        f"decode: 1 sequence, context {CONTEXT}": Batch([Chunk([5], CONTEXT, tables[0])]),
    }
    print(f"default model, {str(dtype).removeprefix('torch.')}, quantization {args.quantization}, "
          f"{torch.get_num_threads()} threads, "
          f"median of {args.runs} runs, milliseconds")  # fmt: skip
    for label, batch in steps.items():
        runs: list[tuple[float, dict[str, float]]] = []
        for _ in range(args.runs + 1):
            totals.clear()
            start = time.perf_counter()
            runner.execute(batch)
            runs.append((time.perf_counter() - start, dict(totals)))
        runs = runs[1:]  # the first is a warm-up
        total = statistics.median(t for t, _ in runs)
        names = sorted(
            {n for _, parts in runs for n in parts}, key=lambda n: -statistics.median(p.get(n, 0.0) for _, p in runs)
        )
        parts = {n: statistics.median(p.get(n, 0.0) for _, p in runs) for n in names}
        other = total - sum(parts.values())
        print(f"\n{label}: {1000 * total:.1f}")
        for name, seconds in [*parts.items(), ("other", other)]:
            print(f"  {name:28s} {1000 * seconds:8.1f}  {seconds / total:6.1%}")


if __name__ == "__main__":
    main()
