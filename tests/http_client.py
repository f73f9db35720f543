"""Plain HTTP clients for the HTTP front-end's tests: one request (stdlib ``http.client``) and
server-sent-event streams over raw asyncio sockets, which a test can close at any moment."""

from __future__ import annotations

import asyncio
import http.client
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    url: str,
    path: str,
    body: Any = None,
    *,
    method: str = "POST",
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 120.0,
) -> Reply:
    """One request; ``body`` is sent as JSON, ``raw`` as it is."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=timeout)
    payload = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    sent = {"Content-Type": "application/json"} if payload is not None else {}
    sent.update(headers or {})
    try:
        connection.request(method, path, body=payload, headers=sent)
        response = connection.getresponse()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        connection.close()


@dataclass
class Stream:
    status: int
    events: list[str]  # the text after "data: " of each event
    closed_early: bool = False

    def payloads(self) -> list[Any]:
        return [json.loads(e) for e in self.events if e != "[DONE]"]


async def sse(
    port: int,
    path: str,
    body: dict[str, Any],
    *,
    close_after_events: int | None = None,
    headers: dict[str, str] | None = None,
    first_event: asyncio.Event | None = None,
) -> Stream:
    """POST ``body`` and read the event stream (HTTP/1.0: the body ends when the server closes);
    with ``close_after_events`` the client closes the connection after that many events;
    ``first_event`` is set when the first event arrives."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = json.dumps(body).encode()
    head = [f"POST {path} HTTP/1.0", "Host: 127.0.0.1", "Content-Type: application/json"]
    head += [f"Content-Length: {len(payload)}", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    writer.write("\r\n".join(head).encode() + b"\r\n\r\n" + payload)
    await writer.drain()
    try:
        status_line = await reader.readline()
        status = int(status_line.split()[1])
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        events: list[str] = []
        if close_after_events == 0:
            return Stream(status, events, closed_early=True)
        buffer = b""
        while chunk := await reader.read(65536):
            buffer += chunk
            while b"\n\n" in buffer:
                block, buffer = buffer.split(b"\n\n", 1)
                text = block.decode()
                if text.startswith("data: "):
                    events.append(text[len("data: ") :])
                else:
                    events.append(text)  # an error body is not an event: kept for the assertion message
                if first_event is not None:
                    first_event.set()
                if close_after_events is not None and len(events) >= close_after_events:
                    return Stream(status, events, closed_early=True)
        if buffer.strip():
            events.append(buffer.decode())
        return Stream(status, events)
    finally:
        writer.close()
