"""Hostile input and hostile clients against real servers: text that is not Unicode, JSON nested
deeper than a parser recurses, redirects, bearer-token variants on both protocols, connections
that idle or trickle, a regex past the grammar engine's limits, parallel samples against
``--max-num-seqs``, and SIGTERM while a competing process saturates the CPU."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from mistralserve.v1 import generation_pb2 as pb
from mistralserve.v1 import generation_pb2_grpc as pb_grpc

from tests.http_client import request, sse
from tests.prometheus_text import scrape
from tests.server_process import ServerProcess

TIMEOUT = 1.5  # the test server's HTTP keep-alive, header and body timeouts


@pytest.fixture(scope="module")
def hostile(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    token = tmp_path_factory.mktemp("token") / "token"
    token.write_text("s3cret-token\n")
    server = ServerProcess(tiny_checkpoint, "--auth-token-file", str(token), "--served-model-name", "tiny",
                           "--http-timeout-keep-alive", str(TIMEOUT), "--http-timeout-header", str(TIMEOUT),
                           "--http-timeout-body", str(TIMEOUT), "--max-num-seqs", "64")  # fmt: skip
    try:
        server.wait_serving()
        yield server
    finally:
        server.close()


AUTH = {"Authorization": "Bearer s3cret-token"}
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


@pytest.mark.parametrize(
    ("path", "raw", "param", "index"),
    [
        (COMPLETIONS, json.dumps({"prompt": "\ud800", "max_tokens": 2}).encode(), "prompt", 0),
        (COMPLETIONS, json.dumps({"prompt": "a\udfffb"}).encode(), "prompt", 1),
        (COMPLETIONS, b'{"prompt": "\xed\xa0\x80", "max_tokens": 2}', "prompt", 0),  # raw CESU bytes
        (COMPLETIONS, json.dumps({"prompt": "hi", "stop": ["ok", "x\udc00"]}).encode(), "stop[1]", 1),
        (CHAT, json.dumps({"messages": [{"role": "user", "content": "\udc00"}]}).encode(), "messages[0].content", 0),
        (CHAT, json.dumps({"messages": [{"role": "user", "content": "hi"}], "tools": [
            {"type": "function", "function": {"name": "get\ud800weather"}}]}).encode(), "tools[0].function.name", 3),
        (COMPLETIONS, json.dumps({"prompt": "hi", "structured_outputs": {"choice": ["\ud800"]}}).encode(),
         "structured_outputs.choice[0]", 0),
        (COMPLETIONS, json.dumps({"prompt": "hi", "structured_outputs": {"regex": "a\ud800"}}).encode(),
         "structured_outputs.regex", 1),
        ("/ai/run/tiny", json.dumps({"prompt": "\ud800"}).encode(), "prompt", 0),
        (COMPLETIONS, json.dumps({"prompt": "hi", "\ud800": 1}).encode(), "\\ud800", 0),
    ],
)  # fmt: skip
def test_lone_surrogates_are_400_naming_the_field(
    hostile: ServerProcess, path: str, raw: bytes, param: str, index: int
) -> None:
    reply = request(hostile.http_url, path, raw=raw, headers=AUTH)
    assert reply.status == 400 and reply.headers["content-type"] == "application/json"
    message = f"{param}: not valid Unicode (lone surrogate at character {index})"
    body = reply.json()
    if path.startswith("/ai/run"):
        assert body["errors"][0]["message"] == message
    else:
        assert body["error"]["message"] == message and body["error"]["param"] == param


@pytest.mark.parametrize("depth", [65, 10_000, 100_000])
@pytest.mark.parametrize("bracket", ["[", '{"a":'])
def test_json_nested_past_the_limit_is_400_before_parsing(hostile: ServerProcess, depth: int, bracket: str) -> None:
    closing = "]" if bracket == "[" else "}"
    raw = ('{"prompt": "hi", "x": ' + bracket * depth + "1" + closing * depth + "}").encode()
    reply = request(hostile.http_url, COMPLETIONS, raw=raw, headers=AUTH)
    assert reply.status == 400
    assert reply.json()["error"]["message"] == f"the request body nests {depth + 1} levels deep; at most 64 are allowed"
    inside = json.dumps({"prompt": "[[[[[{{{{{" * 20, "max_tokens": 1})  # brackets in strings do not count
    assert request(hostile.http_url, COMPLETIONS, raw=inside.encode(), headers=AUTH).status == 200


def test_a_trailing_slash_is_404_and_no_redirect_echoes_the_host(hostile: ServerProcess) -> None:
    for method, path in (("GET", "/v1/models/"), ("POST", "/v1/completions/")):
        reply = request(hostile.http_url, path, method=method, headers={**AUTH, "Host": "evil.example"},
                        body={"prompt": "hi"} if method == "POST" else None)  # fmt: skip
        assert reply.status == 404 and "location" not in reply.headers
        assert reply.json()["error"]["code"] == "not_found"


ACCEPTED = ["Bearer s3cret-token", "bearer s3cret-token", "BEARER s3cret-token", "Bearer   s3cret-token",
            "Bearer s3cret-token   ", "  Bearer s3cret-token"]  # fmt: skip
REFUSED = ["Basic s3cret-token", "Bearers3cret-token", "Bearer", "Bearer s3cret-token2", "Bearer s3cret",
           "s3cret-token", "Bearer s3cret-token extra"]  # fmt: skip


def test_one_bearer_token_rule_on_both_protocols(hostile: ServerProcess) -> None:
    """RFC 6750: the scheme in any case, spaces after it, whitespace around the value; nothing else."""

    def http_ok(value: str) -> bool:
        reply = request(hostile.http_url, "/v1/models", method="GET", headers={"Authorization": value})
        assert reply.status in (200, 401)
        return reply.status == 200

    def grpc_ok(value: str) -> bool:
        with hostile.channel() as channel:
            try:
                hostile.stub(channel).GetModelInfo(pb.GetModelInfoRequest(), metadata=[("authorization", value)],
                                                   timeout=10)  # fmt: skip
                return True
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.UNAUTHENTICATED
                return False

    assert [http_ok(v) for v in ACCEPTED] == [True] * len(ACCEPTED)
    assert [grpc_ok(v) for v in ACCEPTED] == [True] * len(ACCEPTED)
    assert [http_ok(v) for v in REFUSED] == [False] * len(REFUSED)
    assert [grpc_ok(v) for v in REFUSED] == [False] * len(REFUSED)


def connect(server: ServerProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.http_port or 0), timeout=30)
    return sock


def closed_by_server(sock: socket.socket, within: float) -> tuple[bool, bytes]:
    """Whether the server closes ``sock`` within ``within`` s, and what it sent before."""
    sock.settimeout(within)
    received = b""
    try:
        while chunk := sock.recv(4096):
            received += chunk
        return True, received
    except TimeoutError:
        return False, received
    except ConnectionResetError:
        return True, received


def test_idle_and_trickling_connections_are_cut_while_others_are_served(hostile: ServerProcess) -> None:
    idle = [connect(hostile) for _ in range(300)]
    slowloris = connect(hostile)
    no_body = connect(hostile)
    no_body.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret-token\r\n"
                    b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\"")  # fmt: skip
    start = time.monotonic()
    stop = threading.Event()

    def trickle() -> None:  # one byte of the request line every 0.2 s: it never ends
        line = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000
        for byte in line:
            if stop.is_set():
                return
            try:
                slowloris.send(bytes([byte]))
            except OSError:
                return
            time.sleep(0.2)

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        served = request(hostile.http_url, COMPLETIONS, {"prompt": "hi", "max_tokens": 2}, headers=AUTH)
        assert served.status == 200  # during both
        results = [closed_by_server(sock, TIMEOUT + 3) for sock in idle]
        assert all(closed for closed, _ in results) and all(data == b"" for _, data in results)
        closed, answer = closed_by_server(slowloris, TIMEOUT + 3)
        assert closed and answer.startswith(b"HTTP/1.1 408 ") and b'"code": "request_timeout"' in answer
        closed, answer = closed_by_server(no_body, TIMEOUT + 3)
        assert closed and answer.startswith(b"HTTP/1.1 408 ") and b"the request body stopped arriving" in answer
        assert time.monotonic() - start < 2 * TIMEOUT + 6
        again = request(hostile.http_url, COMPLETIONS, {"prompt": "hi", "max_tokens": 2}, headers=AUTH)
        assert again.status == 200
    finally:
        stop.set()
        for sock in [*idle, slowloris, no_body]:
            sock.close()


def test_a_regex_past_the_grammar_engines_limits_is_400_without_its_internals(hostile: ServerProcess) -> None:
    body = {"prompt": "hi", "max_tokens": 8, "structured_outputs": {"regex": "(a|aa){1000}"}}
    reply = request(hostile.http_url, COMPLETIONS, body, headers=AUTH)
    assert reply.status == 400
    assert reply.json()["error"]["message"] == "regex: lexer error: too many expressions constructed"
    with hostile.channel() as channel, pytest.raises(grpc.RpcError) as error:
        hostile.stub(channel).Generate(pb.GenerateRequest(prompt="hi", regex="(a|aa){1000}"), metadata=[
            ("authorization", "Bearer s3cret-token")], timeout=30)  # fmt: skip
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details() == "regex: lexer error: too many expressions constructed"


def test_parallel_samples_never_run_past_max_num_seqs(hostile: ServerProcess) -> None:
    """50 requests with n = 16 under --max-num-seqs 64: the running gauge never passes 64, all finish."""
    seen: list[float] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.append(scrape(hostile.metrics_url()).value("mistralserve_num_requests_running"))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    body = {"prompt": "Once upon", "n": 16, "max_tokens": 24, "temperature": 1.0, "ignore_eos": True}
    try:
        with ThreadPoolExecutor(50) as pool:
            replies = list(pool.map(lambda i: request(hostile.http_url, COMPLETIONS, {**body, "seed": i},
                                                      headers=AUTH, timeout=600), range(50)))  # fmt: skip
    finally:
        done.set()
        watcher.join()
    assert [r.status for r in replies] == [200] * 50
    assert all(len(r.json()["choices"]) == 16 for r in replies)
    assert 0 < max(seen) <= 64


def cpu_hogs() -> list[subprocess.Popen[bytes]]:
    """A busy loop per core: the machine's CPU saturated by another program."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)]


def test_sigterm_under_a_saturated_cpu_ends_every_stream_with_its_final_event(long_tiny_checkpoint: Path) -> None:
    server = ServerProcess(long_tiny_checkpoint, "--shutdown-grace", "2")
    hogs: list[subprocess.Popen[bytes]] = []
    try:
        server.wait_serving()
        port = server.http_port or 0
        long = {"prompt": "go", "max_tokens": 7000, "ignore_eos": True, "stream": True}

        async def scenario() -> tuple[list[Any], list[Any]]:
            async with grpc.aio.insecure_channel(server.target) as channel:
                stub = pb_grpc.GenerationServiceStub(channel)
                calls = [stub.GenerateStream(pb.GenerateStreamRequest(prompt="go", stopping=pb.StoppingOptions(
                    max_tokens=7000, ignore_eos=True))) for _ in range(4)]  # fmt: skip
                for call in calls:
                    await call.read()
                firsts = [asyncio.Event() for _ in range(4)]
                streams = [asyncio.ensure_future(sse(port, "/v1/completions", long, first_event=e)) for e in firsts]
                await asyncio.wait_for(asyncio.gather(*(e.wait() for e in firsts)), timeout=60)
                hogs.extend(cpu_hogs())
                server.process.send_signal(15)
                ends: list[Any] = []
                for call in calls:
                    try:
                        while await call.read() != grpc.aio.EOF:
                            pass
                        ends.append("ok")
                    except grpc.aio.AioRpcError as error:
                        ends.append((error.code(), error.details()))
                return ends, list(await asyncio.wait_for(asyncio.gather(*streams), timeout=120))

        grpc_ends, http_ends = asyncio.run(asyncio.wait_for(scenario(), timeout=240))
        assert server.process.wait(timeout=60) == 0
        finished = [line for line in server.log_lines() if line.get("event") == "request finished"]
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
        server.close()
    unavailable = (grpc.StatusCode.UNAVAILABLE, "the server shut down before this request finished")
    assert grpc_ends == [unavailable] * 4
    for stream in http_ends:
        assert stream.events[-1] == "[DONE]"
        error = stream.payloads()[-1]["error"]
        assert error["message"] == "the server shut down before this request finished"
    assert len(finished) >= 8 and all(line["finish_reason"] == "abort" for line in finished[-8:])


def resident_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.slow
def test_four_megabyte_prompts_never_stall_the_front_end(default_server: ServerProcess) -> None:
    """One 4 MB prompt, then four at once (refused by their size before tokenizing), and a 1.2 MB
    one under that bound, tokenized off the event loop: ``/health`` answers within 100 ms
    throughout, and the front-end's memory comes back within 50 MB."""
    url = default_server.http_url
    words = " ".join(["word"] * 800_000)  # 4.0 MB
    small = " ".join(["word"] * 240_000)  # 1.2 MB: under the byte bound, tokenized to learn it is too long
    request(url, COMPLETIONS, {"prompt": "warm", "max_tokens": 1})
    before = resident_mb(default_server.process.pid)
    latencies: list[float] = []
    done = threading.Event()

    def probe() -> None:
        while not done.is_set():
            start = time.monotonic()
            assert request(url, "/health", method="GET").status == 200
            latencies.append(time.monotonic() - start)
            time.sleep(0.01)

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    try:
        replies = [request(url, COMPLETIONS, {"prompt": words, "max_tokens": 1}, timeout=120)]
        with ThreadPoolExecutor(4) as pool:
            replies += list(pool.map(lambda _: request(url, COMPLETIONS, {"prompt": words, "max_tokens": 1},
                                                       timeout=120), range(4)))  # fmt: skip
        replies.append(request(url, COMPLETIONS, {"prompt": small, "max_tokens": 1}, timeout=120))
    finally:
        done.set()
        prober.join()
    assert [r.status for r in replies] == [400] * 6
    assert "characters cannot fit the context" in replies[0].json()["error"]["message"]
    assert "tokens; the context allows at most" in replies[-1].json()["error"]["message"]
    assert len(latencies) > 5 and max(latencies) < 0.1, sorted(latencies)[-5:]
    assert resident_mb(default_server.process.pid) - before < 50
