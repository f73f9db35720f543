"""The grpc.aio server: the GenerationService, health (readiness and liveness), reflection,
TLS, bearer tokens, and the optional plaintext health port for kubelet probes."""

from __future__ import annotations

import argparse
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from server.frontend import ServerState
from server.grpc.auth import BearerTokenInterceptor
from server.grpc.servicer import SERVICE, GenerationServicer

LIVENESS = "liveness"  # health service name for liveness probes
SERVICE_NAMES = (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)


def server_options(args: argparse.Namespace) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", args.max_message_bytes),
        ("grpc.max_send_message_length", args.max_message_bytes),
        ("grpc.keepalive_time_ms", int(args.keepalive_time * 1000)),
        ("grpc.keepalive_timeout_ms", int(args.keepalive_timeout * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5000),  # clients may ping this often
        ("grpc.http2.max_pings_without_data", 0),
    ]


def credentials(args: argparse.Namespace) -> grpc.ServerCredentials | None:
    if args.tls_cert is None and args.tls_key is None:
        if args.tls_client_ca is not None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if args.tls_cert is None or args.tls_key is None:
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    client_ca = read(args.tls_client_ca) if args.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(read(args.tls_key), read(args.tls_cert))],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read ({exc.strerror})") from None


class GrpcServer:
    """Listening from construction; ``start`` serves, ``set_health`` reports the life's stage."""

    def __init__(self, args: argparse.Namespace, state: ServerState, token: str | None) -> None:
        interceptors = [BearerTokenInterceptor(token)] if token is not None else []
        self.tls = credentials(args)
        self.server = grpc.aio.server(options=server_options(args), interceptors=interceptors)
        self.server.add_generic_rpc_handlers((GenerationServicer(state).handler(),))
        self.health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(SERVICE_NAMES, self.server)
        address = f"{args.host}:{args.port}"
        tls = self.tls
        self.port = self.server.add_secure_port(address, tls) if tls else self.server.add_insecure_port(address)
        if self.port == 0:
            raise ValueError(f"cannot listen on {address}")
        # The kubelet's gRPC probes speak neither TLS nor tokens: an optional plaintext port
        # serves the same health statuses and nothing else.
        self.health_server: grpc.aio.Server | None = None
        self.health_port: int | None = None
        if args.health_port is not None:
            self.health_server = grpc.aio.server(options=server_options(args))
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
            self.health_port = self.health_server.add_insecure_port(f"{args.host}:{args.health_port}")
            if self.health_port == 0:
                raise ValueError(f"cannot listen on {args.host}:{args.health_port}")

    async def start(self) -> None:
        await self.set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        # "liveness": SERVING from the start (loading is the startup probe's business) until the
        # engine dies; draining does not fail it, so a liveness probe never kills a drain.
        await self.health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        await self.server.start()
        if self.health_server is not None:
            await self.health_server.start()

    async def set_health(self, status: int) -> None:
        for name in ("", SERVICE):
            await self.health.set(name, status)

    async def serving(self) -> None:
        await self.set_health(health_pb2.HealthCheckResponse.SERVING)

    async def not_serving(self, liveness_too: bool = False) -> None:
        await self.set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if liveness_too:
            await self.health.set(LIVENESS, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def stop(self, grace: float | None) -> None:
        await self.server.stop(grace=grace)
        if self.health_server is not None:
            await self.health_server.stop(grace=None)
