"""The engine core in its own process: its death under load, and nothing left behind at shutdown."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import grpc
from mistralserve.v1 import generation_pb2 as pb
from mistralserve.v1 import generation_pb2_grpc as pb_grpc

from tests.server_process import ServerProcess

LONG = pb.GenerateStreamRequest(prompt="go", stopping=pb.StoppingOptions(max_tokens=8000, ignore_eos=True))


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def engine_core_pid(server: ServerProcess) -> int:
    pids = [line["pid"] for line in server.log_lines() if line.get("event") == "engine core started"]
    assert len(pids) == 1
    return int(pids[0])


def all_gone(pids: list[int], within: float = 10.0) -> bool:
    """Every process exits within ``within`` s (a helper notices its parent's exit a moment later)."""
    deadline = time.monotonic() + within
    while not all(gone(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"  # a zombie is gone too


async def final_status(call: Any) -> grpc.StatusCode:
    """How a streaming call ends, once read to its end."""
    try:
        while await call.read() != grpc.aio.EOF:
            pass
        return grpc.StatusCode.OK
    except grpc.aio.AioRpcError as error:
        return error.code()


def test_killed_engine_core_turns_health_not_serving_and_fails_calls_unavailable(long_tiny_checkpoint: Path) -> None:
    """With ``--exit-on-engine-death false``: the front-end stays up, reporting NOT_SERVING."""
    server = ServerProcess(long_tiny_checkpoint, "--exit-on-engine-death", "false")
    try:
        server.wait_serving()
        core = engine_core_pid(server)
        assert core in children(server.process.pid)

        async def scenario() -> tuple[list[grpc.StatusCode], float, list[str]]:
            async with grpc.aio.insecure_channel(server.target) as channel:
                stub = pb_grpc.GenerationServiceStub(channel)
                calls = [stub.GenerateStream(LONG) for _ in range(4)]
                for call in calls:  # all four are streaming
                    await call.read()
                os.kill(core, signal.SIGKILL)
                killed = time.monotonic()
                health = []
                while True:
                    statuses = [await asyncio.to_thread(server.health, None, name) for name in ("", "liveness")]
                    if statuses == ["NOT_SERVING", "NOT_SERVING"]:
                        break
                    health.append(f"{time.monotonic() - killed:.2f}: {statuses}")
                    await asyncio.sleep(0.02)
                took = time.monotonic() - killed
                codes = [await final_status(call) for call in calls]
                return codes, took, health

        codes, took, health = asyncio.run(asyncio.wait_for(scenario(), timeout=30))
        assert took < 1.0, health
        assert codes == [grpc.StatusCode.UNAVAILABLE] * 4
        with server.channel() as channel:  # new calls are refused, nothing hangs
            try:
                server.stub(channel).Generate(pb.GenerateRequest(prompt="x"), timeout=10)
                raise AssertionError("a call succeeded without an engine")
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.UNAVAILABLE
                assert error.details() == "the engine is not running"
        died = [line for line in server.log_lines() if line.get("event") == "engine core died"]
        assert len(died) == 1 and died[0]["exit_code"] == -signal.SIGKILL
        helpers = children(server.process.pid)
        assert server.terminate(timeout=30) == 0
        assert all_gone([core, *helpers])
    finally:
        server.close()


def test_killed_engine_core_makes_the_server_exit_1_after_failing_its_calls(long_tiny_checkpoint: Path) -> None:
    """The default: the calls in flight end UNAVAILABLE, then the process exits 1 (within 2 s of
    them), so that Kubernetes, systemd or a shell loop starts a fresh one."""
    server = ServerProcess(long_tiny_checkpoint)
    try:
        server.wait_serving()
        core = engine_core_pid(server)

        async def scenario() -> tuple[list[grpc.StatusCode], float]:
            async with grpc.aio.insecure_channel(server.target) as channel:
                stub = pb_grpc.GenerationServiceStub(channel)
                calls = [stub.GenerateStream(LONG) for _ in range(3)]
                for call in calls:
                    await call.read()
                os.kill(core, signal.SIGKILL)
                codes = [await final_status(call) for call in calls]
                return codes, time.monotonic()

        codes, failed = asyncio.run(asyncio.wait_for(scenario(), timeout=30))
        assert codes == [grpc.StatusCode.UNAVAILABLE] * 3
        assert server.process.wait(timeout=10) == 1
        assert time.monotonic() - failed < 2.0
        events = [line.get("event") for line in server.log_lines()]
        assert "engine core stopped: exiting so that a supervisor restarts the server" in events
        assert events[-1] == "stopped"
    finally:
        server.close()


def test_sigterm_stops_the_engine_core_and_leaves_no_process(long_tiny_checkpoint: Path) -> None:
    server = ServerProcess(long_tiny_checkpoint)
    try:
        server.wait_serving()
        core = engine_core_pid(server)
        helpers = children(server.process.pid)
        assert core in helpers
        with server.channel() as channel:
            response = server.stub(channel).Generate(pb.GenerateRequest(prompt="hi"), timeout=30)
            assert response.completions[0].token_ids
        assert server.terminate(timeout=30) == 0
        deadline = time.monotonic() + 5
        while not all(gone(pid) for pid in helpers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(gone(pid) for pid in helpers)
        assert not any(line.get("event") == "engine core died" for line in server.log_lines())
    finally:
        server.close()
