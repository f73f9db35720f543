"""Where a request's outputs go: the engine thread puts, the caller iterates.

``AsyncOutputStream`` hands outputs to an asyncio event loop (the gRPC server) through
``loop.call_soon_threadsafe``; ``SyncOutputStream`` to a blocking thread (CLI, tests).
Both end after the final output of every sample.
"""

from __future__ import annotations

import asyncio
import queue
from collections.abc import AsyncIterator, Iterator
from typing import Protocol

from scheduler.request import RequestOutput


class OutputSink(Protocol):
    def put(self, output: RequestOutput) -> None:
        """Called on the engine thread; raises if the receiver is gone."""
        ...


class AsyncOutputStream:
    def __init__(self, num_samples: int, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._remaining = num_samples

    def put(self, output: RequestOutput) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, output)

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._remaining == 0:
            raise StopAsyncIteration
        output = await self._queue.get()
        if output.finished:
            self._remaining -= 1
        return output


class SyncOutputStream:
    def __init__(self, num_samples: int) -> None:
        self._queue: queue.Queue[RequestOutput] = queue.Queue()
        self._remaining = num_samples

    def put(self, output: RequestOutput) -> None:
        self._queue.put(output)

    def __iter__(self) -> Iterator[RequestOutput]:
        while self._remaining:
            output = self._queue.get()
            if output.finished:
                self._remaining -= 1
            yield output
