"""uvicorn running the HTTP front-end's app on the event loop the gRPC server runs on, with the
connection timeouts uvicorn lacks (``TimedH11Protocol``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h11
import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, with the timeouts nginx has and uvicorn does not:

    - keep-alive: a connection that sends no request is closed after ``timeout_keep_alive``
      seconds from its start too (uvicorn arms that timer only after a response, so 300 idle
      connections stayed open indefinitely);
    - headers: a request whose line and headers have not all arrived ``header_timeout`` seconds
      after its first byte gets a 408 and is closed (a slowloris client sending one byte a second
      used to hold its connection forever); the body's timeout is the app's (between two reads).

    Its protocol-level 400 answers JSON, as every other error does.
    """

    header_timeout = 30.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        waiting = self.conn.their_state is h11.IDLE  # a request begun but its headers not complete
        if waiting and self._header_timer is None and not self.transport.is_closing():
            self._header_timer = self.loop.call_later(self.header_timeout, self._header_timed_out)
        elif not waiting and self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._answer(408, f"the request's headers did not arrive within {self.header_timeout:g} s")

    def send_400_response(self, msg: str) -> None:
        self._answer(400, msg)

    def _answer(self, status: int, message: str) -> None:
        code = "request_timeout" if status == 408 else "invalid_http"
        error = {"message": message, "type": "invalid_request_error", "param": None, "code": code}
        body = json.dumps({"error": error}).encode()
        head = f"HTTP/1.1 {status} {'Request Timeout' if status == 408 else 'Bad Request'}\r\n"
        head += f"content-type: application/json\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
        self.transport.write(head.encode() + body)
        self.transport.close()


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # SIGTERM and SIGINT are the process's (server.serve drains both front-ends)


def listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port} for HTTP ({exc.strerror})") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class HttpServer:
    def __init__(
        self,
        app: ASGIApp,
        sock: socket.socket,
        tls_cert: Path | None,
        tls_key: Path | None,
        tls_client_ca: Path | None,
        keep_alive_timeout: float,
        header_timeout: float,
    ) -> None:
        protocol: Any = type("Protocol", (TimedH11Protocol,), {"header_timeout": header_timeout})
        config = uvicorn.Config(
            app,
            http=protocol,
            log_config=None,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_keep_alive=keep_alive_timeout,  # type: ignore[arg-type]  # a float works: call_later
            ssl_certfile=str(tls_cert) if tls_cert else None,
            ssl_keyfile=str(tls_key) if tls_key else None,
            ssl_ca_certs=str(tls_client_ca) if tls_client_ca else None,
            ssl_cert_reqs=ssl.CERT_REQUIRED if tls_client_ca else ssl.CERT_NONE,
        )
        self.server = _Server(config)
        self.sock = sock
        self.port = int(sock.getsockname()[1])

    async def serve(self) -> None:
        await self.server.serve(sockets=[self.sock])

    def stop(self, grace: float) -> None:
        """Close the listener; responses in flight get ``grace`` seconds before being cancelled."""
        self.server.config.timeout_graceful_shutdown = max(1, int(grace))
        self.server.should_exit = True
