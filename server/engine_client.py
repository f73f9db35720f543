"""The front-end's handle on the engine core process (``server.engine_core``).

The engine core runs in its own process (multiprocessing, spawn), as vLLM v1's does: protocol
work on the event loop never shares a GIL or a core's time slice with a forward pass. The two
talk over a socket pair with length-prefixed pickled messages (``server.engine_protocol``),
read on the event loop by one task. The client keeps what the servicer and the metrics ask of
an engine: ``add`` (an async iterator of outputs), ``abort``, ``stats``, ``alive``, the
finished-request and step records, and the waiting-queue bound, enforced here so that
RESOURCE_EXHAUSTED is decided at once.

If the core process dies, its end of the socket closes: ``dead`` is set at once, every
request in flight fails with ``EngineDeadError`` (the servicer answers UNAVAILABLE) and new
ones are refused.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import pickle
import socket
import sys
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import structlog

from model.config import CheckpointError
from scheduler.engine import EngineStats, StepRecord, validate_request
from scheduler.request import EngineDeadError, FinishedRequest, QueueFullError, RequestOutput
from server.engine_core import run_engine_core
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
from server.runtime import RuntimeOptions

log = structlog.get_logger(__name__)


class RequestStream:
    """Outputs of one request, in order; ends after the final output of every sample."""

    def __init__(self, num_samples: int) -> None:
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._remaining = num_samples

    def put(self, item: RequestOutput | BaseException) -> None:
        self._queue.put_nowait(item)

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._remaining == 0:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        if item.finished:
            self._remaining -= 1
        return item


class EngineClient:
    def __init__(
        self,
        process: Any,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        ready: Ready,
        max_queued_requests: int,
    ) -> None:
        self.process = process
        self.info: ModelInfo = ready.info
        self.max_model_len = ready.info.max_model_len
        self.max_queued_requests = max_queued_requests
        self.finished_requests: deque[FinishedRequest] = deque(maxlen=100_000)  # drained by the metrics
        self.recent_steps: deque[StepRecord] = deque(maxlen=100_000)
        self.dead = asyncio.Event()
        self.death_reason = ""
        self._stats = ready.stats
        self._reader = reader
        self._writer = writer
        self._streams: dict[str, tuple[RequestStream, int]] = {}  # request id -> (stream, samples not finished)
        self._waiting: set[str] = set()  # submitted, not admitted yet: the queue bound's count
        self._closing = False
        self._read_task = asyncio.get_running_loop().create_task(self._read_loop(), name="engine-core-reader")

    # -- life ----------------------------------------------------------------------------

    @classmethod
    async def start(
        cls, options: RuntimeOptions, log_level: str, log_format: str, debug_heap: bool = False
    ) -> EngineClient:
        """Spawn the core, wait until it has loaded the model; raise what made it fail."""
        ours, theirs = socket.socketpair()
        context = multiprocessing.get_context("spawn")
        core_options = replace(options, max_queued_requests=sys.maxsize)  # the bound is kept here
        process = context.Process(
            target=run_engine_core,
            args=(core_options, log_level, log_format, theirs, debug_heap),
            name="mistral-serve-engine-core",
            daemon=True,
        )
        process.start()
        theirs.close()
        log.info("engine core started", pid=process.pid)
        reader, writer = await asyncio.open_connection(sock=ours)
        try:
            first = await _read_message(reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            await asyncio.to_thread(process.join, 10)
            raise RuntimeError(
                f"the engine core exited while loading the model (exit code {process.exitcode})"
            ) from None
        if isinstance(first, StartupFailed):
            writer.close()
            await asyncio.to_thread(process.join, 10)
            raise (CheckpointError if first.invalid_input else RuntimeError)(first.error)
        assert isinstance(first, Ready), first
        return cls(process, reader, writer, first, options.max_queued_requests)

    async def close(self, timeout: float = 10.0) -> None:
        """Ask the core to stop after its current step; kill it if it does not within ``timeout``."""
        self._closing = True
        if not self.dead.is_set():
            self._send(Shutdown())
        await asyncio.to_thread(self.process.join, timeout)
        if self.process.is_alive():
            log.warning("engine core did not stop, killing it", pid=self.process.pid)
            self.process.kill()
            await asyncio.to_thread(self.process.join, 5)
        self._read_task.cancel()
        self._writer.close()

    @property
    def alive(self) -> bool:
        return not self.dead.is_set()

    # -- requests ------------------------------------------------------------------------

    def add(self, spec: RequestSpec) -> RequestStream:
        """Send a request; its outputs arrive on the returned stream. Raises like ``Engine.submit``."""
        vocab, seats = self.info.config.vocab_size, self.info.max_num_seqs
        validate_request(spec.prompt_token_ids, spec.params, vocab, self.max_model_len, seats)
        if not self.alive or self._closing:
            raise EngineDeadError(self.death_reason or "the engine is shutting down")
        if spec.request_id in self._streams:
            raise ValueError(f"request_id: {spec.request_id!r} is already running")
        if len(self._waiting) >= self.max_queued_requests:
            raise QueueFullError(f"the waiting queue is full ({self.max_queued_requests} requests)")
        stream = RequestStream(spec.params.n)
        self._streams[spec.request_id] = (stream, spec.params.n)
        self._waiting.add(spec.request_id)
        self._send(replace(spec, arrival_time=spec.arrival_time or time.monotonic()))
        return stream

    def abort(self, request_id: str) -> None:
        """Stop a request (cancelled, deadline, disconnect): its blocks are freed at the next step."""
        if self._streams.pop(request_id, None) is None:
            return
        self._waiting.discard(request_id)
        if self.alive:
            self._send(Abort(request_id))

    def end_all(self, reason: str) -> None:
        """End every request in flight now (the drain's grace is over): each caller gets
        ``EngineDeadError(reason)`` (UNAVAILABLE / 503), the core aborts them and frees their blocks."""
        for request_id, (stream, _) in list(self._streams.items()):
            stream.put(EngineDeadError(reason))
            self.abort(request_id)

    def stats(self) -> EngineStats:
        """As of the core's last step."""
        return self._stats

    # -- plumbing ------------------------------------------------------------------------

    def _send(self, message: object) -> None:
        self._writer.write(frame(message))  # buffered by the transport: never blocks the loop

    async def _read_loop(self) -> None:
        try:
            while True:
                update = await _read_message(self._reader)
                assert isinstance(update, StepUpdate), update
                self._apply(update)
        except (asyncio.IncompleteReadError, ConnectionError):
            self._died()

    def _apply(self, update: StepUpdate) -> None:
        self._stats = update.stats
        self.finished_requests.extend(update.finished)  # records first, then the outputs they count
        self.recent_steps.extend(update.steps)
        for step in update.steps:
            self._waiting.difference_update(step.admitted)
        for output in update.outputs:
            entry = self._streams.get(output.request_id)
            if entry is None:  # aborted here already
                continue
            stream, remaining = entry
            stream.put(output)
            if output.finished:
                remaining -= 1
                if remaining == 0:
                    del self._streams[output.request_id]
                    self._waiting.discard(output.request_id)
                else:
                    self._streams[output.request_id] = (stream, remaining)

    def _died(self) -> None:
        """The core's end closed: fail everything now, log the exit code once the process is reaped."""
        self.death_reason = "the engine core process stopped"
        self.dead.set()
        error = EngineDeadError(self.death_reason)
        inflight = len(self._streams)
        for stream, _ in self._streams.values():
            stream.put(error)
        self._streams.clear()
        self._waiting.clear()
        if not self._closing:
            asyncio.get_running_loop().create_task(self._log_death(inflight))

    async def _log_death(self, inflight: int) -> None:
        await asyncio.to_thread(self.process.join, 5)
        log.error("engine core died", pid=self.process.pid, exit_code=self.process.exitcode, inflight=inflight)


async def _read_message(reader: asyncio.StreamReader) -> Any:
    header = await reader.readexactly(HEADER.size)
    return pickle.loads(await reader.readexactly(HEADER.unpack(header)[0]))
