"""200 streams cancelled at random moments: every block comes back, the server keeps serving."""

from __future__ import annotations

import asyncio
import random
import time

import grpc
import pytest
from mistralserve.v1 import generation_pb2 as pb
from mistralserve.v1 import generation_pb2_grpc as pb_grpc

from tests.server_process import ServerProcess


async def storm(target: str, count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    outcomes: list[str] = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)

        async def one(i: int) -> None:
            request = pb.GenerateStreamRequest(
                prompt="cancel me " * rng.randint(1, 20), stopping=pb.StoppingOptions(max_tokens=200, ignore_eos=True)
            )
            call = stub.GenerateStream(request)
            keep = rng.choice([0, 0, 1, 2, 5, 20])
            delay = rng.random() * 0.05
            received = 0
            try:
                if keep == 0:
                    await asyncio.sleep(delay)  # cancel before or while it is queued or prefilling
                    call.cancel()
                async for _ in call:
                    received += 1
                    if received >= keep:
                        call.cancel()
                        break
            except asyncio.CancelledError:
                pass
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.CANCELLED, error
            outcomes.append("cancelled")

        await asyncio.gather(*(one(i) for i in range(count)))
    return outcomes


def free_blocks(server: ServerProcess) -> tuple[int, int]:
    with server.channel() as channel:
        info = server.stub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    return info.kv_cache_free_blocks, info.kv_cache_blocks


@pytest.mark.slow
def test_cancellation_storm_returns_every_block(server: ServerProcess) -> None:
    outcomes = asyncio.run(storm(server.target, 200, seed=7))
    assert len(outcomes) == 200
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        free, total = free_blocks(server)
        if free == total:
            break
        time.sleep(0.2)
    assert free == total
    assert server.health() == "SERVING"
    with server.channel() as channel:  # and it still generates
        response = server.stub(channel).Generate(
            pb.GenerateRequest(prompt="after", stopping=pb.StoppingOptions(max_tokens=3, ignore_eos=True)), timeout=30
        )
    assert len(response.completions[0].token_ids) == 3


def wait_for_free_pool(server: ServerProcess) -> bool:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        free, total = free_blocks(server)
        if free == total:
            return True
        time.sleep(0.2)
    return False


LONG = 8000  # tokens: seconds of work on any machine (the tiny model decodes thousands a second)


def test_deadline_aborts_frees_blocks_and_returns_deadline_exceeded(long_server: ServerProcess) -> None:
    server = long_server
    request = pb.GenerateStreamRequest(prompt="slow", stopping=pb.StoppingOptions(max_tokens=LONG, ignore_eos=True))
    received = 0
    with server.channel() as channel, pytest.raises(grpc.RpcError) as error:
        for _ in server.stub(channel).GenerateStream(request, timeout=0.5):
            received += 1
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert received < LONG  # cut short (a slow machine may not even reach the first token)
    assert wait_for_free_pool(server)


def test_client_disconnect_aborts_the_request(long_server: ServerProcess) -> None:
    server = long_server
    request = pb.GenerateStreamRequest(prompt="bye", stopping=pb.StoppingOptions(max_tokens=LONG, ignore_eos=True))
    with server.channel() as channel:  # how long the whole generation takes here and now
        start = time.monotonic()
        assert sum(len(r.token_ids) for r in server.stub(channel).GenerateStream(request, timeout=120)) == LONG
        full = time.monotonic() - start
    channel = server.channel()
    stream = server.stub(channel).GenerateStream(request)
    next(stream)
    closed = time.monotonic()
    channel.close()  # the connection goes away mid-stream
    assert wait_for_free_pool(server)
    assert time.monotonic() - closed < full / 2  # freed by the abort, not by finishing
    assert server.health() == "SERVING"
