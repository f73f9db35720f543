"""Server-sent-event streams under load: 64 at once on the default model with exact counts,
100 closed by their clients at random moments (every KV block comes back), SIGTERM with 16 in
flight (all finish, new requests 503), and the engine core's death (503, an error event)."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.http_client import Stream, request, sse
from tests.server_process import ServerProcess
from tests.test_engine_core import engine_core_pid
from tests.test_server_cancel import free_blocks

COMPLETIONS = "/v1/completions"


@pytest.mark.slow
def test_64_concurrent_streams_on_the_default_model_have_exact_counts(default_server: ServerProcess) -> None:
    port = default_server.http_port or 0
    lengths = [8 + i % 25 for i in range(64)]

    async def run() -> list[Stream]:
        streams = []
        for i, length in enumerate(lengths):
            body: dict[str, Any] = {
                "max_tokens": length,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
                "temperature": 0.0 if i % 2 else 0.8,
                "seed": i,
            }
            if i % 3:
                streams.append(sse(port, COMPLETIONS, {**body, "prompt": f"Story number {i}: once upon a time"}))
            else:
                message = {"role": "user", "content": f"Question {i}: what is attention?"}
                streams.append(sse(port, "/v1/chat/completions", {**body, "messages": [message]}))
        return list(await asyncio.gather(*streams))

    results = asyncio.run(run())
    for length, stream in zip(lengths, results, strict=True):
        assert stream.status == 200 and stream.events[-1] == "[DONE]", stream.events[-2:]
        payloads = stream.payloads()
        assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] == length
        reasons = [c["finish_reason"] for p in payloads[:-1] for c in p["choices"]]
        assert reasons[-1] == "length" and set(reasons[:-1]) <= {None}
    free, total = free_blocks(default_server)
    assert free == total


@pytest.mark.slow
def test_100_streams_closed_by_clients_return_the_kv_pool(long_server: ServerProcess) -> None:
    port = long_server.http_port or 0
    rng = random.Random(12)
    before = len([line for line in long_server.log_lines() if line.get("event") == "request finished"])

    async def one(i: int) -> None:
        body = {"prompt": "close me " * rng.randint(1, 30), "max_tokens": 4000, "ignore_eos": True, "stream": True}
        how = rng.choice(["events", "events", "time", "headers"])
        if how == "events":
            stream = await sse(port, COMPLETIONS, body, close_after_events=rng.randint(1, 30))
            assert stream.status == 200 and stream.closed_early
        elif how == "headers":
            stream = await sse(port, COMPLETIONS, body, close_after_events=0)
            assert stream.status == 200
        else:  # whenever the timer fires: queued, prefilling or decoding
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(sse(port, COMPLETIONS, body), timeout=0.1 + rng.random() * 0.5)

    async def run() -> None:
        await asyncio.gather(*(one(i) for i in range(100)))

    asyncio.run(run())
    deadline = time.monotonic() + 30
    while free_blocks(long_server)[0] != free_blocks(long_server)[1] and time.monotonic() < deadline:
        time.sleep(0.1)
    free, total = free_blocks(long_server)
    assert free == total
    while time.monotonic() < deadline:
        finished = [line for line in long_server.log_lines() if line.get("event") == "request finished"][before:]
        if len(finished) >= 100:
            break
        time.sleep(0.1)
    assert len(finished) == 100
    assert {line["finish_reason"] for line in finished} == {"abort"}  # none ran to its 4,000 tokens
    assert request(long_server.http_url, COMPLETIONS, {"prompt": "still here", "max_tokens": 3}).status == 200


@pytest.mark.slow
def test_sigterm_finishes_16_http_streams_and_refuses_new_ones(tiny_checkpoint: Path) -> None:
    server = ServerProcess(tiny_checkpoint, "--shutdown-grace", "60")
    try:
        server.wait_serving()
        port = server.http_port or 0
        body = {"prompt": "go", "max_tokens": 400, "ignore_eos": True, "temperature": 0, "stream": True}
        body["stream_options"] = {"include_usage": True}

        async def run() -> tuple[list[Stream], int, Any, int]:
            firsts = [asyncio.Event() for _ in range(16)]
            streams = [asyncio.ensure_future(sse(port, COMPLETIONS, body, first_event=f)) for f in firsts]
            await asyncio.wait_for(asyncio.gather(*(f.wait() for f in firsts)), timeout=120)
            os.kill(server.process.pid, signal.SIGTERM)
            await asyncio.sleep(0.3)
            late = await asyncio.to_thread(request, server.http_url, COMPLETIONS, {"prompt": "late", "max_tokens": 2})
            health = await asyncio.to_thread(request, server.http_url, "/health", method="GET")
            done = await asyncio.wait_for(asyncio.gather(*streams), timeout=120)
            return list(done), late.status, late.json(), health.status

        streams, late_status, late_body, health_status = asyncio.run(run())
        assert late_status == 503 and late_body["error"]["message"] == "the server is shutting down"
        assert health_status == 503
        for stream in streams:
            assert stream.status == 200 and stream.events[-1] == "[DONE]"
            assert stream.payloads()[-1]["usage"]["completion_tokens"] == 400
        assert server.process.wait(timeout=60) == 0
        events = [line["event"] for line in server.log_lines()]
        assert "draining" in events and events[-1] == "stopped"
    finally:
        server.close()


def test_a_dead_engine_core_is_503_and_an_error_event(long_tiny_checkpoint: Path) -> None:
    server = ServerProcess(long_tiny_checkpoint, "--exit-on-engine-death", "false")
    try:
        server.wait_serving()
        port = server.http_port or 0
        body = {"prompt": "go", "max_tokens": 6000, "ignore_eos": True, "stream": True}

        async def run() -> Stream:
            first = asyncio.Event()
            stream = asyncio.ensure_future(sse(port, COMPLETIONS, body, first_event=first))
            await asyncio.wait_for(first.wait(), timeout=60)
            os.kill(engine_core_pid(server), signal.SIGKILL)
            return await asyncio.wait_for(stream, timeout=60)

        stream = asyncio.run(run())
        assert stream.events[-1] == "[DONE]"
        error = stream.payloads()[-1]["error"]
        assert error["type"] == "service_unavailable" and "engine" in error["message"]
        reply = request(server.http_url, COMPLETIONS, {"prompt": "hi", "max_tokens": 2})
        assert reply.status == 503 and reply.json()["error"]["message"] == "the engine is not running"
        assert request(server.http_url, "/health", method="GET").status == 503
    finally:
        server.close()
