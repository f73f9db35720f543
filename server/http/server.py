"""uvicorn running the HTTP front-end's app on the event loop the gRPC server runs on."""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import uvicorn
from starlette.types import ASGIApp


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
        keepalive: float,
    ) -> None:
        config = uvicorn.Config(
            app,
            log_config=None,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_keep_alive=int(max(1, keepalive)),
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
