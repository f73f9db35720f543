"""gRPC load test on loopback: workload W through a real server at N = 1, 8, 32, 64 streams.

For each N, ``min(64, 2N)`` requests of W (128 random prompt tokens, exactly 128 greedy
generated tokens) run with at most N streams open at once. Reported per N: output tokens
per second, time to first token and inter-token latency (p50, p99), and the status codes.
The same 64-request workload also runs through the in-process engine (no gRPC) first, in
the same run; the N = 64 throughput is compared with it.

    .venv/bin/python -m bench.load [--concurrency 1 8 32 64]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import time
import warnings
from dataclasses import dataclass, field

import grpc
import torch
from mistralserve.v1 import generation_pb2 as pb
from mistralserve.v1 import generation_pb2_grpc as pb_grpc

from bench.engine_bench import OUTPUT, REQUESTS, engine_run, prompts
from model.default_model import default_cache_dir, ensure_default_model
from server.runtime import RuntimeOptions, build_runtime
from tests.server_process import ServerProcess


@dataclass
class Run:
    tokens: int = 0
    elapsed: float = 0.0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    codes: collections.Counter[str] = field(default_factory=collections.Counter)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def load(target: str, workload: list[list[int]], concurrency: int) -> Run:
    run = Run()
    gate = asyncio.Semaphore(concurrency)
    stopping = pb.StoppingOptions(max_tokens=OUTPUT, min_tokens=OUTPUT, ignore_eos=True)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)

        async def one(prompt: list[int]) -> None:
            async with gate:
                request = pb.GenerateStreamRequest(
                    prompt_token_ids=pb.TokenIds(ids=prompt),
                    sampling=pb.SamplingOptions(temperature=0.0),
                    stopping=stopping,
                )
                last = time.perf_counter()
                seen_token = False
                try:
                    async for response in stub.GenerateStream(request):
                        now = time.perf_counter()
                        if response.token_ids:
                            (run.itl if seen_token else run.ttft).append(now - last)
                            seen_token = True
                            run.tokens += len(response.token_ids)
                            last = now
                    run.codes["OK"] += 1
                except grpc.RpcError as error:
                    run.codes[error.code().name] += 1

        start = time.perf_counter()
        await asyncio.gather(*(one(p) for p in workload))
        run.elapsed = time.perf_counter() - start
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    path = ensure_default_model(default_cache_dir(os.environ))
    options = RuntimeOptions(path, max_num_seqs=REQUESTS, enable_prefix_caching=False)
    runtime = build_runtime(options)
    workload = prompts(runtime.loaded.config.vocab_size)
    in_process, _ = engine_run(runtime, workload)
    dtype = runtime.dtype_name
    del runtime

    server = ServerProcess(
        path, "--max-num-seqs", str(REQUESTS), "--enable-prefix-caching", "false", "--kv-cache-memory", "1GiB",
        env={"OMP_NUM_THREADS": str(args.threads)},
    )  # fmt: skip
    try:
        server.wait_serving()
        results = {}
        for n in args.concurrency:
            results[n] = asyncio.run(load(server.target, workload[: min(REQUESTS, 2 * n)], n))
    finally:
        server.close()

    print(f"W over gRPC on loopback, default model, {dtype}, {args.threads} threads")
    print(f"in-process engine on the same 64 requests: {in_process:.1f} output tokens/s")
    print("| streams | requests | output tokens/s | TTFT p50 / p99 (s) | ITL p50 / p99 (ms) | status codes |")
    print("| ---: | ---: | ---: | ---: | ---: | --- |")
    for n, run in results.items():
        codes = ", ".join(f"{code} {count}" for code, count in sorted(run.codes.items()))
        print(
            f"| {n} | {min(REQUESTS, 2 * n)} | {run.tokens / run.elapsed:.1f} | "
            f"{percentile(run.ttft, 0.5):.2f} / {percentile(run.ttft, 0.99):.2f} | "
            f"{1000 * percentile(run.itl, 0.5):.0f} / {1000 * percentile(run.itl, 0.99):.0f} | {codes} |"
        )
    if REQUESTS in results:
        full = results[REQUESTS]
        share = full.tokens / full.elapsed / in_process
        print(f"\nend-to-end at {REQUESTS} streams: {share:.1%} of the in-process engine's throughput")


if __name__ == "__main__":
    main()
