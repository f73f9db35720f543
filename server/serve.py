"""``mistral-serve serve``: the grpc.aio server, health, reflection, warm-up, graceful drain.

Order of a life: the port opens with health NOT_SERVING; the model loads (off the event
loop); the engine thread starts; a short warm-up generation runs (it also compiles the
CPU attention kernel); health turns SERVING. On SIGTERM or SIGINT: health NOT_SERVING, new
calls get UNAVAILABLE, calls in flight get ``--shutdown-grace`` seconds to finish, then
the server stops and the process exits 0. A dead engine thread turns health NOT_SERVING.

Health service names: "" and the generation service follow the life above (readiness);
"liveness" is SERVING until the engine thread dies. ``--health-port`` adds a plaintext
port with only the health service, for probes that cannot do TLS or send a token.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from mistralserve.v1 import generation_pb2 as pb

from scheduler.request import SamplingParams
from server.auth import BearerTokenInterceptor
from server.metrics import ServerMetrics
from server.runtime import Runtime, build_runtime, runtime_options
from server.servicer import SERVICE, GenerationServicer, ServerState

log = structlog.get_logger(__name__)
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


def model_info_labels(runtime: Runtime) -> dict[str, str]:
    from importlib.metadata import version

    return {
        "dtype": runtime.dtype_name,
        "device": runtime.device_name,
        "attention_backend": runtime.engine.runner.backend,
        "block_size": str(runtime.cache.spec.block_size),
        "version": version("mistral-serve"),
    }


async def warm_up(runtime: Runtime) -> None:
    prompt = runtime.tokenizer.encode("Hello") or [0]
    request = runtime.request("warmup", prompt, SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    async for _ in runtime.engine.add(request):
        pass


async def serve(args: argparse.Namespace, model_path: Path) -> int:
    token = read(args.auth_token_file).decode().strip() if args.auth_token_file else None
    interceptors = [BearerTokenInterceptor(token)] if token is not None else []
    tls = credentials(args)
    state = ServerState(log_prompts=args.log_prompts)
    server = grpc.aio.server(options=server_options(args), interceptors=interceptors)
    server.add_generic_rpc_handlers((GenerationServicer(state).handler(),))
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(SERVICE_NAMES, server)
    address = f"{args.host}:{args.port}"
    port = server.add_secure_port(address, tls) if tls else server.add_insecure_port(address)
    if port == 0:
        raise ValueError(f"cannot listen on {address}")

    # The kubelet's gRPC probes speak neither TLS nor tokens: an optional plaintext port
    # serves the same health statuses and nothing else.
    health_server = None
    health_port = None
    if args.health_port is not None:
        health_server = grpc.aio.server(options=server_options(args))
        health_pb2_grpc.add_HealthServicer_to_server(health, health_server)
        health_port = health_server.add_insecure_port(f"{args.host}:{args.health_port}")
        if health_port == 0:
            raise ValueError(f"cannot listen on {args.host}:{args.health_port}")

    async def set_health(status: int) -> None:
        for name in ("", SERVICE):
            await health.set(name, status)

    await set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
    # "liveness": SERVING from the start (loading is the startup probe's business) until the
    # engine thread dies; draining does not fail it, so a liveness probe never kills a drain.
    await health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
    await server.start()
    if health_server is not None:
        await health_server.start()
    log.info(
        "grpc server listening",
        host=args.host,
        port=port,
        health_port=health_port,
        tls=tls is not None,
        auth=token is not None,
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    runtime = await asyncio.to_thread(build_runtime, runtime_options(args, model_path))
    runtime.engine.start()
    if args.warmup:
        await warm_up(runtime)
    state.model_name = args.served_model_name or runtime.loaded.name
    metrics = ServerMetrics(state.model_name, runtime.engine.max_model_len)
    metrics.attach(runtime.engine, model_info_labels(runtime))
    metrics_port = metrics.serve(args.host, args.metrics_port)
    state.metrics = metrics
    state.runtime = runtime
    await set_health(health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "serving",
        model=state.model_name,
        port=port,
        metrics_port=metrics_port,
        context_length=runtime.engine.max_model_len,
    )

    async def drain_metrics() -> None:
        while not stop.is_set():
            metrics.drain()
            await asyncio.sleep(1.0)

    drainer = asyncio.create_task(drain_metrics())

    async def watch_engine() -> None:
        while not stop.is_set():
            if not runtime.engine.alive:
                log.error("engine thread died: reporting NOT_SERVING")
                await set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
                await health.set(LIVENESS, health_pb2.HealthCheckResponse.NOT_SERVING)
                return
            await asyncio.sleep(0.5)

    watchdog = asyncio.create_task(watch_engine())
    await stop.wait()

    log.info("draining", inflight=state.inflight, grace_seconds=args.shutdown_grace)
    state.draining = True
    await set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
    deadline = loop.time() + args.shutdown_grace
    try:
        await asyncio.wait_for(state.idle.wait(), timeout=args.shutdown_grace)
    except TimeoutError:
        log.warning("grace period over, cancelling calls in flight", inflight=state.inflight)
    await server.stop(grace=max(0.0, deadline - loop.time()))
    if health_server is not None:
        await health_server.stop(grace=None)
    watchdog.cancel()
    drainer.cancel()
    runtime.engine.shutdown(timeout=10)
    log.info("stopped")
    return 0


def run_server(args: argparse.Namespace, model_path: Path) -> int:
    return asyncio.run(serve(args, model_path))


__all__ = ["pb", "run_server"]
