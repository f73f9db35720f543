"""Real server processes: graceful drain on SIGTERM, overload, TLS, mutual TLS, bearer tokens."""

from __future__ import annotations

import asyncio
import http.client
import json
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from mistralserve.v1 import generation_pb2 as pb
from mistralserve.v1 import generation_pb2_grpc as pb_grpc

from tests.certificates import Pki, make_pki
from tests.http_client import request
from tests.server_process import ServerProcess

LONG = pb.StoppingOptions(max_tokens=400, ignore_eos=True)


def long_stream(target: str) -> pb.GenerateStreamRequest:
    return pb.GenerateStreamRequest(prompt="go", sampling=pb.SamplingOptions(temperature=0.0), stopping=LONG)


@pytest.mark.slow
def test_sigterm_drains_in_flight_streams_and_exits_zero(tiny_checkpoint: Path) -> None:
    server = ServerProcess(tiny_checkpoint, "--shutdown-grace", "60")
    try:
        server.wait_serving()
        results: dict[int, list[pb.GenerateStreamResponse]] = {}
        producing: set[int] = set()
        all_producing = threading.Event()

        async def client() -> None:
            async with grpc.aio.insecure_channel(server.target) as channel:
                stub = pb_grpc.GenerationServiceStub(channel)

                async def one(i: int) -> None:
                    received = []
                    async for response in stub.GenerateStream(long_stream(server.target)):
                        received.append(response)
                        if len(received) == 1:
                            producing.add(i)
                            if len(producing) == 16:
                                all_producing.set()
                    results[i] = received

                await asyncio.gather(*(one(i) for i in range(16)))

        thread = threading.Thread(target=lambda: asyncio.run(client()))
        thread.start()
        assert all_producing.wait(timeout=120)  # all 16 streams are producing
        signalled = time.monotonic()
        server.process.send_signal(15)
        time.sleep(0.3)
        with server.channel() as channel, pytest.raises(grpc.RpcError) as refused:
            server.stub(channel).Generate(
                pb.GenerateRequest(prompt="late", stopping=pb.StoppingOptions(max_tokens=2)), timeout=10
            )
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert server.health() == "NOT_SERVING"  # readiness: out of the Service's endpoints
        assert server.health(service="liveness") == "SERVING"  # a liveness probe must not kill the drain
        thread.join(timeout=120)
        assert server.process.wait(timeout=60) == 0
        assert time.monotonic() - signalled < 60
        assert len(results) == 16
        for received in results.values():
            assert received[-1].finish_reason == pb.FINISH_REASON_LENGTH
            assert sum(len(r.token_ids) for r in received) == 400
        events = [line["event"] for line in server.log_lines()]
        assert "draining" in events and events[-1] == "stopped"
    finally:
        server.close()


@pytest.mark.slow
def test_full_queue_rejects_the_sixth_request_at_once(long_tiny_checkpoint: Path) -> None:
    server = ServerProcess(long_tiny_checkpoint, "--max-num-seqs", "1", "--max-queued-requests", "4")
    very_long = pb.GenerateStreamRequest(prompt="go", stopping=pb.StoppingOptions(max_tokens=8000, ignore_eos=True))

    async def scenario() -> tuple[grpc.StatusCode, str, float]:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            # the first runs (max_num_seqs 1) before the next four arrive: sent together, the
            # fifth could find four others still waiting for their first step and be refused
            calls = [stub.GenerateStream(very_long)]
            await calls[0].read()
            calls += [stub.GenerateStream(very_long) for _ in range(4)]
            await asyncio.sleep(3)  # let the busy server take in the other four (the first runs for 20+ s)
            start = time.monotonic()
            try:
                await stub.Generate(
                    pb.GenerateRequest(prompt="sixth", stopping=pb.StoppingOptions(max_tokens=2)), timeout=30
                )
                outcome = (grpc.StatusCode.OK, "", time.monotonic() - start)
            except grpc.aio.AioRpcError as error:
                outcome = (error.code(), error.details() or "", time.monotonic() - start)
            for call in calls:
                call.cancel()
            return outcome

    try:
        server.wait_serving()
        code, details, elapsed = asyncio.run(scenario())
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert details == "the waiting queue is full (4 requests)"
        assert elapsed < 2.0
    finally:
        server.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls(pki: Pki, client_cert: bool = False, ca: Path | None = None) -> grpc.ChannelCredentials:
    if client_cert:
        return grpc.ssl_channel_credentials(
            (ca or pki.ca).read_bytes(), pki.client_key.read_bytes(), pki.client_cert.read_bytes()
        )
    return grpc.ssl_channel_credentials((ca or pki.ca).read_bytes())


def generate(
    server: ServerProcess, credentials: grpc.ChannelCredentials | None, metadata: tuple[tuple[str, str], ...] = ()
) -> pb.GenerateResponse:
    with server.channel(credentials) as channel:
        request = pb.GenerateRequest(prompt="secure", stopping=pb.StoppingOptions(max_tokens=3, ignore_eos=True))
        response: pb.GenerateResponse = server.stub(channel).Generate(request, timeout=30, metadata=metadata)
        return response


def https_completion(server: ServerProcess, pki: Pki, client_cert: bool = False) -> dict[str, Any]:
    """POST /v1/completions over TLS to the HTTP port, trusting the test CA (host name localhost)."""
    context = ssl.create_default_context(cafile=str(pki.ca))
    if client_cert:
        context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    connection = http.client.HTTPSConnection("localhost", server.http_port, timeout=30, context=context)
    try:
        body = json.dumps({"prompt": "secure", "max_tokens": 3, "ignore_eos": True})
        connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200
        return dict(json.loads(response.read()))
    finally:
        connection.close()


@pytest.mark.slow
def test_tls(tiny_checkpoint: Path, pki: Pki) -> None:
    server = ServerProcess(tiny_checkpoint, "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key))
    try:
        server.wait_serving(credentials=tls(pki))
        assert len(generate(server, tls(pki)).completions[0].token_ids) == 3
        with pytest.raises(grpc.RpcError) as plaintext:
            generate(server, None)
        assert plaintext.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError) as untrusted:
            generate(server, tls(pki, ca=pki.other_ca))
        assert untrusted.value.code() == grpc.StatusCode.UNAVAILABLE
        # the HTTP front-end: the same certificate, no plaintext
        assert https_completion(server, pki)["usage"]["completion_tokens"] == 3
        with pytest.raises(http.client.RemoteDisconnected):
            request(server.http_url, "/v1/completions", {"prompt": "plain", "max_tokens": 2})
    finally:
        server.close()


@pytest.mark.slow
def test_mutual_tls(tiny_checkpoint: Path, pki: Pki) -> None:
    args = ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key), "--tls-client-ca", str(pki.ca)]
    server = ServerProcess(tiny_checkpoint, *args, "--health-port", "0")
    try:
        server.wait_serving(credentials=tls(pki, client_cert=True))
        assert len(generate(server, tls(pki, client_cert=True)).completions[0].token_ids) == 3
        with pytest.raises(grpc.RpcError) as no_client_cert:
            generate(server, tls(pki))
        assert no_client_cert.value.code() == grpc.StatusCode.UNAVAILABLE
        assert https_completion(server, pki, client_cert=True)["usage"]["completion_tokens"] == 3
        with pytest.raises((ssl.SSLError, ConnectionError)):
            https_completion(server, pki)
        # The kubelet's probes: plaintext, no client certificate, on the health-only port.
        assert server.health_port not in (None, server.port)
        assert server.plaintext_health() == "SERVING"
        assert server.plaintext_health("liveness") == "SERVING"
        assert server.plaintext_health("mistralserve.v1.GenerationService") == "SERVING"
        with grpc.insecure_channel(f"127.0.0.1:{server.health_port}") as channel, pytest.raises(grpc.RpcError) as only:
            server.stub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
        assert only.value.code() == grpc.StatusCode.UNIMPLEMENTED  # nothing but health there
    finally:
        server.close()


@pytest.mark.slow
def test_bearer_token(tiny_checkpoint: Path, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    server = ServerProcess(tiny_checkpoint, "--auth-token-file", str(token_file))
    try:
        server.wait_serving()  # health needs no token
        for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", "s3cret-token"),)):
            with pytest.raises(grpc.RpcError) as error:
                generate(server, None, metadata)
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "bearer token" in (error.value.details() or "")
        with server.channel() as channel, pytest.raises(grpc.RpcError) as stream_error:
            list(server.stub(channel).GenerateStream(long_stream(server.target), timeout=30))
        assert stream_error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = generate(server, None, (("authorization", "Bearer s3cret-token"),))
        assert len(ok.completions[0].token_ids) == 3
    finally:
        server.close()
