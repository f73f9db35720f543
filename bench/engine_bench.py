"""Workload W through the engine vs Hugging Face transformers ``generate``, same run.

W: 64 requests, each 128 prompt tokens and exactly 128 generated tokens (greedy, EOS
ignored), on the default model (the engine in its default dtype, transformers in fp32), 2 threads. Reported:

  (a) the engine's output tokens per second over the whole workload;
  (b) transformers ``generate`` one request at a time;
  (c) transformers ``generate`` in static batches of 16;

the ratios a/b and a/c, the engine's mean batch size and the share of each step spent
outside the model forward (all steps, and the steps running 64 sequences). (b) and (c)
run a sample of the workload (``--hf-single``, ``--hf-batches``) and report its rate.

    .venv/bin/python -m bench.engine_bench
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from typing import Any

import torch

from model.default_model import default_cache_dir, ensure_default_model
from scheduler.engine import StepRecord
from scheduler.output_stream import SyncOutputStream
from scheduler.request import SamplingParams
from server.runtime import Runtime, RuntimeOptions, build_runtime

REQUESTS, PROMPT, OUTPUT = 64, 128, 128


def prompts(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(100, vocab, (PROMPT,), generator=gen).tolist() for _ in range(REQUESTS)]


def engine_run(runtime: Runtime, workload: list[list[int]]) -> tuple[float, list[StepRecord]]:
    engine = runtime.engine
    records: list[StepRecord] = []
    engine.step_listeners.append(records.append)
    params = SamplingParams(temperature=0.0, max_tokens=OUTPUT, ignore_eos=True)
    streams = []
    start = time.perf_counter()
    for i, prompt in enumerate(workload):
        stream = SyncOutputStream(1)
        engine.submit(runtime.request(f"w{i}", prompt, params), stream)
        streams.append(stream)
    engine.run_until_idle()
    elapsed = time.perf_counter() - start
    produced = sum(len(o.token_ids) for stream in streams for o in stream)
    assert produced == REQUESTS * OUTPUT, produced
    return REQUESTS * OUTPUT / elapsed, records


def hf_rate(hf: Any, workload: list[list[int]], batch: int, batches: int) -> float:
    tokens = 0
    start = time.perf_counter()
    for b in range(batches):
        ids = torch.tensor(workload[b * batch : (b + 1) * batch])
        with torch.inference_mode():
            out = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=OUTPUT,
                min_new_tokens=OUTPUT,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        tokens += (out.shape[1] - PROMPT) * out.shape[0]
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hf-single", type=int, default=2, help="requests measured one at a time (b)")
    parser.add_argument("--hf-batches", type=int, default=1, help="batches of 16 measured (c)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    path = ensure_default_model(default_cache_dir(os.environ))
    runtime = build_runtime(
        RuntimeOptions(
            path, max_num_seqs=REQUESTS, max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=False
        )
    )
    workload = prompts(runtime.loaded.config.vocab_size)
    engine_tps, records = engine_run(runtime, workload)
    from bench.hf_twin import hf_twin
    from model.loader import load_model

    hf = hf_twin(load_model(path).model)  # the runtime's own weights were packed and released
    single_tps = hf_rate(hf, workload, 1, args.hf_single)
    batched_tps = hf_rate(hf, workload, 16, args.hf_batches)

    outside = [1 - r.forward / r.duration for r in records]
    full = [1 - r.forward / r.duration for r in records if len(r.scheduled) == REQUESTS]
    rows = [
        ("(a) mistral-serve engine", engine_tps),
        (f"(b) transformers generate, one request at a time ({args.hf_single} measured)", single_tps),
        (f"(c) transformers generate, static batches of 16 ({args.hf_batches} measured)", batched_tps),
    ]
    print(f"W = {REQUESTS} x {PROMPT} prompt x {OUTPUT} generated tokens, default model, engine {runtime.dtype_name} "
          f"({runtime.engine.runner.backend} backend), transformers float32, {args.threads} threads")  # fmt: skip
    print("| system | output tokens/s | engine / it |")
    print("| --- | ---: | ---: |")
    for name, rate in rows:
        print(f"| {name} | {rate:.1f} | {engine_tps / rate:.2f}x |")
    print()
    batch_size = statistics.mean(len(r.scheduled) for r in records)
    tokens = statistics.mean(r.num_tokens for r in records)
    print(f"engine steps: {len(records)}, mean batch size {batch_size:.1f} sequences, mean {tokens:.0f} tokens")
    at_full = statistics.mean(full) if full else float("nan")
    print(f"time outside the model forward: {statistics.mean(outside):.1%} of a step on average, "
          f"{at_full:.1%} at batch {REQUESTS} ({len(full)} steps)")  # fmt: skip


if __name__ == "__main__":
    main()
