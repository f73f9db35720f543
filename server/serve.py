"""``mistral-serve serve``: the grpc.aio server, health, reflection, warm-up, graceful drain.

Order of a life: the port opens with health NOT_SERVING; the engine core process starts and
loads the model (and builds the CPU kernels on a machine's first start); a short warm-up
generation runs; health turns SERVING. On SIGTERM or SIGINT: health NOT_SERVING, new calls get
UNAVAILABLE, calls in flight get ``--shutdown-grace`` seconds to finish, then the server and the
engine core stop and the process exits 0. If the engine core process dies, health turns
NOT_SERVING at once (readiness and liveness) and the calls in flight end UNAVAILABLE.

Health service names: "" and the generation service follow the life above (readiness);
"liveness" is SERVING until the engine core dies. ``--health-port`` adds a plaintext
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
from server.engine_client import EngineClient
from server.engine_protocol import RequestSpec
from server.metrics import ServerMetrics
from server.runtime import runtime_options
from server.servicer import SERVICE, GenerationServicer, ServerState, Serving
from server.tokenizer_loader import load_tokenizer

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


def model_info_labels(engine: EngineClient) -> dict[str, str]:
    from importlib.metadata import version

    return {
        "dtype": engine.info.dtype,
        "weight_types": engine.info.weight_types,
        "device": engine.info.device,
        "attention_backend": engine.info.attention_backend,
        "block_size": str(engine.info.block_size),
        "version": version("mistral-serve"),
    }


async def warm_up(serving: Serving) -> None:
    prompt = tuple(serving.tokenizer.encode("Hello") or [0])
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    async for _ in serving.engine.add(RequestSpec("warmup", prompt, params)):
        pass


async def serve(args: argparse.Namespace, model_path: Path) -> int:
    token = read(args.auth_token_file).decode().strip() if args.auth_token_file else None
    interceptors = [BearerTokenInterceptor(token)] if token is not None else []
    tls = credentials(args)
    state = ServerState(log_prompts=args.log_prompts, default_max_tokens=args.default_max_tokens)
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

    try:
        tokenizer = await asyncio.to_thread(load_tokenizer, model_path)
        engine = await EngineClient.start(runtime_options(args, model_path), args.log_level, args.log_format)
    except BaseException:  # a bad checkpoint or option: close the ports, then report it
        await server.stop(grace=None)
        if health_server is not None:
            await health_server.stop(grace=None)
        raise
    serving = Serving(engine, tokenizer)
    if args.warmup:
        await warm_up(serving)
    state.model_name = args.served_model_name or engine.info.name
    metrics = ServerMetrics(state.model_name, engine.max_model_len)
    metrics.attach(engine, model_info_labels(engine))
    metrics_port = metrics.serve(args.host, args.metrics_port)
    state.metrics = metrics
    state.serving = serving
    await set_health(health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "serving",
        model=state.model_name,
        port=port,
        metrics_port=metrics_port,
        context_length=engine.max_model_len,
        engine_core_pid=engine.process.pid,
    )

    async def drain_metrics() -> None:
        while not stop.is_set():
            metrics.drain()
            await asyncio.sleep(1.0)

    drainer = asyncio.create_task(drain_metrics())

    async def watch_engine() -> None:
        await engine.dead.wait()  # set the moment the core's end of the socket closes
        if not stop.is_set():
            log.error("engine core stopped: reporting NOT_SERVING")
            await set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
            await health.set(LIVENESS, health_pb2.HealthCheckResponse.NOT_SERVING)

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
    await engine.close(timeout=10)
    log.info("stopped")
    return 0


def run_server(args: argparse.Namespace, model_path: Path) -> int:
    return asyncio.run(serve(args, model_path))


__all__ = ["pb", "run_server"]
