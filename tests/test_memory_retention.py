"""2,000 mixed requests leave nothing behind: after a warm-up, neither server process (front-end,
engine core) holds more live Python objects of any type or more traced memory than a small,
fixed allowance, whatever the number of requests. A per-request leak (a log record, a detokenizer,
a stream, a generator, a prefix-cache entry, a call object kept) grows with the count and fails.

The heap is read through ``--debug-heap``: SIGUSR1 makes each process log a ``heap`` line.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from mistralserve.v1 import generation_pb2 as pb
from mistralserve.v1 import generation_pb2_grpc as pb_grpc

from tests.http_client import sse
from tests.prometheus_text import scrape
from tests.server_process import ServerProcess

# Objects a process may gain between the samples (asyncio and grpc pools, interned strings);
# a leak of one object per request adds 1,500.
OBJECT_ALLOWANCE = 300
TRACED_ALLOWANCE = 2 << 20  # bytes


async def mixed(server: ServerProcess, count: int, seed: int) -> None:
    rng = random.Random(seed)
    gate = asyncio.Semaphore(32)
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)

        async def one(i: int) -> None:
            prompt = " ".join(
                rng.choice(["a", "dragon", "ran", "over", "the", "hill"]) for _ in range(rng.randint(1, 40))
            )
            stopping = pb.StoppingOptions(max_tokens=rng.randint(1, 12), stop=rng.choice([[], ["a"]]))
            sampling = pb.SamplingOptions(temperature=rng.choice([0.0, 0.8]), seed=rng.randrange(1000))
            n = rng.choice([1, 2])
            roll = rng.random()
            async with gate:
                if roll < 0.2:  # HTTP, sometimes closed early
                    body = {"prompt": prompt, "max_tokens": stopping.max_tokens, "n": n, "stream": True}
                    await sse(server.http_port or 0, "/v1/completions", body,
                              close_after_events=2 if roll < 0.05 else None)  # fmt: skip
                    return
                request = pb.GenerateStreamRequest(prompt=prompt, stopping=stopping, sampling=sampling, n=n)
                call = stub.GenerateStream(request, timeout=0.05 if roll < 0.3 else 60)
                try:
                    received = 0
                    async for _ in call:
                        received += 1
                        if roll > 0.9 and received == 2:
                            call.cancel()
                            break
                except grpc.RpcError as error:
                    assert error.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED), error

        await asyncio.gather(*(one(i) for i in range(count)))


def heaps(server: ServerProcess) -> dict[str, dict[str, Any]]:
    """Both processes' heap lines, taken now."""
    seen = len(server.log_lines())
    server.process.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        lines = [line for line in server.log_lines()[seen:] if line.get("event") == "heap"]
        if len(lines) == 2:
            return {line["process"]: line for line in lines}
        time.sleep(0.1)
    raise AssertionError("no heap lines within 60 s")


def settle(server: ServerProcess) -> None:
    """Wait until every request has finished in the engine (the pool is full again), then scrape
    /metrics: the scrape moves the finished-request records the metrics keep into histograms."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with server.channel() as channel:
            info = server.stub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
        if info.kv_cache_free_blocks == info.kv_cache_blocks:
            scrape(server.metrics_url())
            return
        time.sleep(0.2)
    raise AssertionError("the KV pool did not come back")


@pytest.mark.slow
def test_2000_requests_leave_no_objects_behind(tiny_checkpoint: Path) -> None:
    # 1 MiB of KV cache: 256 blocks, which the warm-up's prompts fill, so the prefix cache is at its
    # bound before the first sample (a full pool is not a leak; a growing one would be).
    args = ["--debug-heap", "true", "--max-queued-requests", "4096", "--kv-cache-memory", "1MiB"]
    server = ServerProcess(tiny_checkpoint, *args)
    try:
        server.wait_serving()
        asyncio.run(mixed(server, 500, seed=1))  # warm-up: pools, caches, lazily built objects
        settle(server)
        before = heaps(server)
        asyncio.run(mixed(server, 1500, seed=2))
        settle(server)
        after = heaps(server)
    finally:
        server.close()
    report = {}
    for process in ("front-end", "engine-core"):
        first, last = before[process], after[process]
        grown = {t: last["types"][t] - first["types"][t] for t in set(first["types"]) & set(last["types"])}
        report[process] = {
            "gc_objects": last["gc_objects"] - first["gc_objects"],
            "traced_bytes": last["traced_bytes"] - first["traced_bytes"],
            "largest": sorted(grown.items(), key=lambda kv: -kv[1])[:5],
        }
    message = json.dumps(report, indent=1)
    print(message)  # pytest -s shows the growth
    for process, growth in report.items():
        assert growth["gc_objects"] < OBJECT_ALLOWANCE, (process, message)
        assert growth["traced_bytes"] < TRACED_ALLOWANCE, (process, message)
        assert all(count < OBJECT_ALLOWANCE for _, count in growth["largest"]), (process, message)
