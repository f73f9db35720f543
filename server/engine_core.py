"""The engine core process: model, scheduler, runner and sampler, away from the front-end's GIL.

Started by ``server.engine_client`` (multiprocessing, spawn). One thread: it takes in the
front-end's messages between steps (blocking only when there is nothing to step), runs an
engine step, and sends what the step produced as one ``StepUpdate``. It exits on ``Shutdown``
or when the front-end's end of the socket closes (the front-end died), so it never outlives
its server. Ctrl-C in a terminal reaches the whole process group: the core ignores SIGINT and
lets the front-end drain and stop it.
"""

from __future__ import annotations

import pickle
import select
import signal
import socket
import sys
from typing import Any

import structlog

from model.config import CheckpointError
from scheduler.engine import Engine
from scheduler.request import FinishReason, RequestOutput
from server import heap_debug
from server.engine_protocol import (
    HEADER,
    Abort,
    ModelInfo,
    Ready,
    RequestSpec,
    Shutdown,
    StartupFailed,
    StepUpdate,
    frame,
)
from server.logging_setup import configure_logging
from server.runtime import Runtime, RuntimeOptions, build_runtime

log = structlog.get_logger(__name__)
GRAMMAR_POLL = 0.001  # seconds


class _Collect:
    """The sink of every request: outputs wait here until the step's update is sent."""

    def __init__(self) -> None:
        self.outputs: list[RequestOutput] = []

    def put(self, output: RequestOutput) -> None:
        self.outputs.append(output)


def _recv_exactly(sock: socket.socket, n: int) -> bytes | None:
    chunks = bytearray()
    while len(chunks) < n:
        chunk = sock.recv(n - len(chunks))
        if not chunk:
            return None
        chunks += chunk
    return bytes(chunks)


def _receive(sock: socket.socket) -> Any | None:
    """One message, or None when the front-end closed its end."""
    header = _recv_exactly(sock, HEADER.size)
    if header is None:
        return None
    payload = _recv_exactly(sock, HEADER.unpack(header)[0])
    return None if payload is None else pickle.loads(payload)


def model_info(runtime: Runtime) -> ModelInfo:
    return ModelInfo(
        name=runtime.loaded.name,
        checkpoint_format=runtime.loaded.format,
        config=runtime.loaded.config,
        dtype=runtime.dtype_name,
        weight_types=runtime.weight_types,
        kv_cache_dtype=runtime.kv_dtype_name,
        device=runtime.device_name,
        attention_backend=runtime.engine.runner.backend,
        block_size=runtime.cache.spec.block_size,
        num_blocks=runtime.blocks.num_blocks,
        max_model_len=runtime.engine.max_model_len,
        max_num_seqs=runtime.engine.config.scheduler.max_num_seqs,
    )


class EngineCore:
    def __init__(self, runtime: Runtime, sock: socket.socket) -> None:
        self.runtime = runtime
        self.engine: Engine = runtime.engine
        self.sock = sock
        self.sink = _Collect()

    def run(self) -> None:
        while True:
            if not self._take_in(block=not self.engine.has_work):
                return
            self.engine.step()
            self._send_update()

    def _take_in(self, block: bool) -> bool:
        """Handle every message waiting (the first may be waited for); False: stop.

        While a grammar compiles on its thread the wait is a 1 ms poll, so the request it
        belongs to is admitted as soon as the compiler posts to the engine's inbox."""
        timeout = (GRAMMAR_POLL if self.engine.compiling else None) if block else 0.0
        while select.select([self.sock], [], [], timeout)[0]:
            message = _receive(self.sock)
            if message is None or isinstance(message, Shutdown):
                return False
            if isinstance(message, RequestSpec):
                self._submit(message)
            elif isinstance(message, Abort):
                self.engine.abort(message.request_id)
            timeout = 0.0
        return True

    def _submit(self, spec: RequestSpec) -> None:
        request = self.runtime.request(spec.request_id, spec.prompt_token_ids, spec.params, spec.priority)
        request.arrival_time = spec.arrival_time
        try:
            self.engine.submit(request, self.sink)
        except ValueError as exc:  # the front-end checks the same rules first; never lose the request silently
            for index in range(spec.params.n):
                self.sink.put(RequestOutput(spec.request_id, index, (), "", finish_reason=FinishReason.ERROR,
                                            error=str(exc)))  # fmt: skip

    def _send_update(self) -> None:
        engine = self.engine
        finished = tuple(engine.finished_requests.popleft() for _ in range(len(engine.finished_requests)))
        steps = tuple(engine.recent_steps.popleft() for _ in range(len(engine.recent_steps)))
        if not (self.sink.outputs or finished or steps):
            return
        update = StepUpdate(tuple(self.sink.outputs), finished, steps, engine.stats())
        self.sink.outputs.clear()
        self.sock.sendall(frame(update))


def run_engine_core(
    options: RuntimeOptions, log_level: str, log_format: str, sock: socket.socket, debug_heap: bool = False
) -> None:
    """The process entry point (``multiprocessing`` target)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_logging(log_level, log_format, sys.stdout)
    if debug_heap:
        heap_debug.install("engine-core")
    try:
        runtime = build_runtime(options)
    except (CheckpointError, ValueError) as exc:
        sock.sendall(frame(StartupFailed(str(exc), invalid_input=True)))
        return
    except Exception as exc:
        log.error("engine core failed to start", exc_info=exc)
        sock.sendall(frame(StartupFailed(f"{type(exc).__name__}: {exc}", invalid_input=False)))
        return
    sock.sendall(frame(Ready(model_info(runtime), runtime.engine.stats())))
    try:
        EngineCore(runtime, sock).run()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the front-end is gone
    finally:
        sock.close()
