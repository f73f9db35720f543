"""``mistral-serve serve``: both front-ends over one engine, warm-up, graceful drain.

Order of a life: the gRPC port (and the HTTP port, unless ``--http-port 0``) opens with health
NOT_SERVING (HTTP: 503); the engine core process starts and loads the model (and builds the
CPU kernels on a machine's first start); a short warm-up generation runs; health turns
SERVING. On SIGTERM or SIGINT: health NOT_SERVING, new calls get UNAVAILABLE / 503, calls and
streams in flight on either protocol get ``--shutdown-grace`` seconds to finish, then the
servers and the engine core stop and the process exits 0. If the engine core process dies,
health turns NOT_SERVING at once (readiness and liveness) and the calls in flight end
UNAVAILABLE / 503.

Health service names: "" and the generation service follow the life above (readiness);
"liveness" is SERVING until the engine core dies. ``--health-port`` adds a plaintext
port with only the health service, for probes that cannot do TLS or send a token.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
from pathlib import Path

import structlog

from scheduler.request import SamplingParams
from server import heap_debug
from server.engine_client import EngineClient
from server.engine_protocol import RequestSpec
from server.frontend import ServerState, Serving
from server.grpc.server import GrpcServer, read
from server.http.app import HttpFrontend
from server.http.server import HttpServer, listen
from server.metrics import ServerMetrics
from server.reasoning import reasoning_markers
from server.runtime import runtime_options
from server.tokenizer_loader import load_tokenizer
from server.tool_calls import call_style

log = structlog.get_logger(__name__)
FINAL_EVENTS_SECONDS = 5.0  # after the grace period: for the calls in flight to send their last message


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


def http_server(args: argparse.Namespace, state: ServerState, token: str | None) -> HttpServer | None:
    if args.http_port == 0:
        return None
    app = HttpFrontend(state, token, args.max_message_bytes, args.http_timeout_body).app()
    sock = listen(args.host, args.http_port)
    return HttpServer(app, sock, args.tls_cert, args.tls_key, args.tls_client_ca, args.http_timeout_keep_alive,
                      args.http_timeout_header)  # fmt: skip


async def serve(args: argparse.Namespace, model_path: Path) -> int:
    token = read(args.auth_token_file).decode().strip() if args.auth_token_file else None
    names = list(args.served_model_name or [])
    state = ServerState(log_prompts=args.log_prompts, default_max_tokens=args.default_max_tokens)
    grpc_server = GrpcServer(args, state, token)
    http = http_server(args, state, token)
    await grpc_server.start()
    http_task = asyncio.create_task(http.serve(), name="http-server") if http is not None else None
    log.info(
        "grpc server listening",
        host=args.host,
        port=grpc_server.port,
        health_port=grpc_server.health_port,
        http_port=None if http is None else http.port,
        tls=grpc_server.tls is not None,
        auth=token is not None,
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    async def close_servers(grace: float | None) -> None:
        if http is not None and http_task is not None:
            http.stop(grace or 0.0)
            await http_task
        await grpc_server.stop(grace)

    try:
        tokenizer = await asyncio.to_thread(load_tokenizer, model_path)
        state.reasoning = reasoning_markers(tokenizer, args.reasoning_parser)
        engine = await EngineClient.start(
            runtime_options(args, model_path), args.log_level, args.log_format, args.debug_heap
        )
    except BaseException:  # a bad checkpoint or option: close the ports, then report it
        await close_servers(None)
        raise
    serving = Serving(engine, tokenizer)
    if args.debug_heap:  # SIGUSR1: a heap line from this process, then from the engine core
        heap_debug.install("front-end", lambda: os.kill(engine.process.pid, signal.SIGUSR1))
    if args.warmup:
        await warm_up(serving)
    state.model_name = names[0] if names else engine.info.name
    state.aliases = tuple(dict.fromkeys(n for n in [*names[1:], engine.info.name] if n != state.model_name))
    metrics = ServerMetrics(state.model_name, engine.max_model_len)
    metrics.attach(engine, model_info_labels(engine))
    metrics_port = metrics.serve(args.host, args.metrics_port)
    state.metrics = metrics
    state.serving = serving
    await grpc_server.serving()
    log.info(
        "serving",
        model=state.model_name,
        aliases=list(state.aliases),
        port=grpc_server.port,
        http_port=None if http is None else http.port,
        metrics_port=metrics_port,
        context_length=engine.max_model_len,
        engine_core_pid=engine.process.pid,
        tool_call_format=call_style(tokenizer).format.value,
        reasoning=None if state.reasoning is None else f"{state.reasoning.start}...{state.reasoning.end}",
    )

    async def drain_metrics() -> None:
        while not stop.is_set():
            metrics.drain()
            await asyncio.sleep(1.0)

    drainer = asyncio.create_task(drain_metrics())

    exit_code = 0

    async def watch_engine() -> None:
        nonlocal exit_code
        await engine.dead.wait()  # set the moment the core's end of the socket closes; calls in flight fail
        if stop.is_set():
            return
        if not args.exit_on_engine_death:
            log.error("engine core stopped: reporting NOT_SERVING")
            await grpc_server.not_serving(liveness_too=True)
            return
        log.error("engine core stopped: exiting so that a supervisor restarts the server")
        exit_code = 1
        stop.set()

    watchdog = asyncio.create_task(watch_engine())
    await stop.wait()

    log.info("draining", inflight=state.inflight, grace_seconds=args.shutdown_grace)
    state.draining = True
    await grpc_server.not_serving(liveness_too=exit_code != 0)
    try:
        await asyncio.wait_for(state.idle.wait(), timeout=args.shutdown_grace)
    except TimeoutError:  # each call left gets its protocol's final event, and is logged as aborted
        log.warning("grace period over, ending the calls in flight", inflight=state.inflight)
        engine.end_all("the server shut down before this request finished")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(state.idle.wait(), timeout=FINAL_EVENTS_SECONDS)
    await close_servers(0.0)
    watchdog.cancel()
    drainer.cancel()
    await engine.close(timeout=10)
    log.info("stopped", exit_code=exit_code)
    return exit_code


def run_server(args: argparse.Namespace, model_path: Path) -> int:
    return asyncio.run(serve(args, model_path))
