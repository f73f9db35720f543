"""A real ``mistral-serve serve`` process on 127.0.0.1 for end-to-end tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from mistralserve.v1 import generation_pb2_grpc as pb_grpc

SCRIPT = Path(sys.executable).parent / "mistral-serve"


def free_port() -> int:
    """A port nothing listens on now (the HTTP port: 0 turns the HTTP front-end off)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def check_health(channel: grpc.Channel, service: str) -> str:
    response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


class ServerProcess:
    def __init__(
        self, model: Path, *args: str, env: dict[str, str] | None = None, start_timeout: float = 120.0
    ) -> None:
        self.http_port: int | None = None
        self.stderr_file: IO[str] = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)  # noqa: SIM115
        command = [str(SCRIPT), "serve", "--model", str(model), "--host", "127.0.0.1", "--port", "0"]
        command += ["--log-format", "json", "--kv-cache-memory", "32MiB", "--metrics-port", "0"]
        if "--http-port" not in args:
            command += ["--http-port", str(free_port())]
        command += args
        self.process = subprocess.Popen(
            command, stdout=self.stderr_file, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, text=True
        )
        try:
            self.port, self.health_port = self._wait_for_port(start_timeout)
        except BaseException:  # never leave a server behind
            self.process.kill()
            self.process.wait()
            raise
        self.target = f"127.0.0.1:{self.port}"

    def log_lines(self) -> list[dict[str, Any]]:
        lines = []
        for line in Path(self.stderr_file.name).read_text().splitlines():
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return lines

    def _wait_for_port(self, timeout: float = 120.0) -> tuple[int, int | None]:
        """The gRPC port and the plaintext health port (None without ``--health-port``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log_lines():
                if line.get("event") == "grpc server listening":
                    health_port = line.get("health_port")
                    self.http_port = line.get("http_port")
                    return int(line["port"]), None if health_port is None else int(health_port)
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"server exited {self.process.returncode}: {Path(self.stderr_file.name).read_text()}"
                )
            time.sleep(0.05)
        raise TimeoutError("the server did not report its port")

    @property
    def http_url(self) -> str:
        """The HTTP front-end's base address, e.g. ``http://127.0.0.1:8123``."""
        assert self.http_port is not None, "the server was started with --http-port 0"
        return f"http://127.0.0.1:{self.http_port}"

    def channel(self, credentials: grpc.ChannelCredentials | None = None, **options: Any) -> grpc.Channel:
        opts = [("grpc.ssl_target_name_override", "localhost")] if credentials else []
        opts += list(options.items())
        if credentials is None:
            return grpc.insecure_channel(self.target, options=opts)
        return grpc.secure_channel(self.target, credentials, options=opts)

    def health(self, credentials: grpc.ChannelCredentials | None = None, service: str = "") -> str:
        with self.channel(credentials) as channel:
            return check_health(channel, service)

    def plaintext_health(self, service: str = "") -> str:
        """Health through ``--health-port`` (plaintext, whatever the main port does)."""
        assert self.health_port is not None, "the server was started without --health-port"
        with grpc.insecure_channel(f"127.0.0.1:{self.health_port}") as channel:
            return check_health(channel, service)

    def wait_serving(self, timeout: float = 300.0, credentials: grpc.ChannelCredentials | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"server exited {self.process.returncode}: {Path(self.stderr_file.name).read_text()}"
                )
            try:
                if self.health(credentials) == "SERVING":
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
        raise TimeoutError("the server never became SERVING")

    def metrics_url(self) -> str:
        """The /metrics address (from the ``serving`` log line; call after ``wait_serving``)."""
        for line in self.log_lines():
            if line.get("event") == "serving":
                return f"http://127.0.0.1:{line['metrics_port']}/metrics"
        raise RuntimeError("the server has not logged 'serving' yet")

    def stub(self, channel: grpc.Channel) -> pb_grpc.GenerationServiceStub:
        return pb_grpc.GenerationServiceStub(channel)

    def terminate(self, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def close(self) -> None:
        if self.process.poll() is None:
            self.terminate()
        os.unlink(self.stderr_file.name)
