"""Load test on loopback: workload W through a real server at N = 1, 8, 32, 64 streams, over
gRPC (``GenerateStream``) and HTTP (``/v1/completions`` with ``stream: true``, server-sent events).

For each N and protocol, ``min(64, 2N)`` requests of W (128 random prompt tokens, exactly 128
greedy generated tokens) run with at most N streams open at once. Reported per N: output tokens
per second, time to first token and inter-token latency (p50, p99), and the statuses. The same
64-request workload also runs through the in-process engine (no server) first, in the same run;
the N = 64 throughput of each protocol is compared with it. Over HTTP the token count is the
final usage chunk's; TTFT and ITL are measured between events that carry text.

    .venv/bin/python -m bench.load [--concurrency 1 8 32 64] [--protocol grpc http]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
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


async def load(target: str, workload: list[list[int]], concurrency: int, json_schema: str | None = None) -> Run:
    """``json_schema``: every request constrained by it (``bench.structured``)."""
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
                    json_schema=json_schema,
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


async def load_http(port: int, workload: list[list[int]], concurrency: int) -> Run:
    run = Run()
    gate = asyncio.Semaphore(concurrency)

    async def one(prompt: list[int]) -> None:
        body = json.dumps(
            {
                "prompt": prompt,
                "max_tokens": OUTPUT,
                "min_tokens": OUTPUT,
                "ignore_eos": True,
                "temperature": 0.0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        ).encode()
        async with gate:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            head = f"POST /v1/completions HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
            writer.write(head.encode() + b"\r\n\r\n" + body)
            last = time.perf_counter()
            seen_token = False
            status = (await reader.readline()).split()[1].decode()
            while (await reader.readline()) not in (b"\r\n", b""):
                pass
            buffer = b""
            while chunk := await reader.read(65536):
                buffer += chunk
                while b"\n\n" in buffer:
                    block, buffer = buffer.split(b"\n\n", 1)
                    data = block.removeprefix(b"data: ")
                    if data == b"[DONE]":
                        continue
                    payload = json.loads(data)
                    now = time.perf_counter()
                    if payload.get("usage"):
                        run.tokens += payload["usage"]["completion_tokens"]
                    if any(choice["text"] for choice in payload.get("choices", [])):
                        (run.itl if seen_token else run.ttft).append(now - last)
                        seen_token = True
                        last = now
            writer.close()
            run.codes["200" if status == "200" else status] += 1

    start = time.perf_counter()
    await asyncio.gather(*(one(p) for p in workload))
    run.elapsed = time.perf_counter() - start
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--protocol", nargs="+", choices=["grpc", "http"], default=["grpc", "http"])
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
        results: dict[tuple[int, str], Run] = {}
        for n in args.concurrency:
            for protocol in args.protocol:
                requests = workload[: min(REQUESTS, 2 * n)]
                if protocol == "grpc":
                    results[n, protocol] = asyncio.run(load(server.target, requests, n))
                else:
                    results[n, protocol] = asyncio.run(load_http(server.http_port or 0, requests, n))
    finally:
        server.close()

    print(f"W on loopback, default model, {dtype}, {args.threads} threads")
    print(f"in-process engine on the same 64 requests: {in_process:.1f} output tokens/s")
    print("| streams | protocol | requests | output tokens/s | TTFT p50 / p99 (s) | ITL p50 / p99 (ms) | statuses |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | --- |")
    for (n, protocol), run in results.items():
        codes = ", ".join(f"{code} {count}" for code, count in sorted(run.codes.items()))
        print(
            f"| {n} | {protocol} | {min(REQUESTS, 2 * n)} | {run.tokens / run.elapsed:.1f} | "
            f"{percentile(run.ttft, 0.5):.2f} / {percentile(run.ttft, 0.99):.2f} | "
            f"{1000 * percentile(run.itl, 0.5):.0f} / {1000 * percentile(run.itl, 0.99):.0f} | {codes} |"
        )
    print()
    for (n, protocol), run in results.items():
        if n == REQUESTS:
            share = run.tokens / run.elapsed / in_process
            print(
                f"end-to-end at {REQUESTS} streams over {protocol}: {share:.1%} of the in-process engine's throughput"
            )


if __name__ == "__main__":
    main()
