"""The HTTP front-end: an ASGI app (Starlette) over ``server.frontend``, run by uvicorn on the
gRPC server's event loop.

Routes: OpenAI's ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``;
Workers AI's ``POST /ai/run/{model}``; ``GET /health`` (200 serving, 503 otherwise, no token);
``GET /`` the playground page. Errors are OpenAI-shaped (``{"error": {message, type, param,
code}}``) or, on ``/ai/run``, Workers AI's envelope: 400 bad input (the gRPC messages), 401 token,
404 unknown model, 413 body over ``--max-message-bytes``, 415 not JSON, 429 queue full, 503
loading / draining / engine dead. A client that disconnects aborts its request, streaming or not.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

import structlog
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from server.bearer import bearer_token_matches
from server.frontend import (
    INTERNAL,
    INVALID_ARGUMENT,
    QUEUE_FULL,
    UNAVAILABLE,
    Frontend,
    Rejected,
    ServerState,
    Serving,
)
from server.http.body import BodyError, parse_json
from server.http.formats import ChatFormat, CompletionFormat, Format, WorkersAIFormat, event, openai_error
from server.http.formats import workers_ai_error as workers_error
from server.http.requests import HttpRequest, chat_request, completion_request, param_of, workers_ai_request
from server.invalid import InvalidRequest
from server.validation import Parsed, Prepared

log = structlog.get_logger(__name__)
STATUS = {INVALID_ARGUMENT: 400, QUEUE_FULL: 429, UNAVAILABLE: 503, INTERNAL: 500}
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class HttpError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


def peer_of(scope: Scope) -> str:
    client = scope.get("client")
    if not client:
        return "unknown"
    host, port = client
    return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"


def json_response(status: int, payload: Any) -> Response:
    return Response(json.dumps(payload, ensure_ascii=False), status, media_type="application/json")


class GenerationResponse:
    """Runs an admitted request while watching the connection: a client that goes away cancels
    the run, which aborts the request in the engine (``Frontend.generate``'s exit)."""

    def __init__(self, frontend: Frontend, serving: Serving, prepared: Prepared, peer: str, fmt: Format) -> None:
        self.frontend = frontend
        self.serving = serving
        self.prepared = prepared
        self.peer = peer
        self.fmt = fmt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        work = asyncio.ensure_future(self._run(send))
        watcher = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not work.done():
                work.cancel()
            await asyncio.gather(work, watcher, return_exceptions=True)
        if not work.cancelled() and work.exception() is not None:
            raise work.exception()  # type: ignore[misc]

    async def _run(self, send: Send) -> None:
        fmt, started = self.fmt, False
        try:
            async with self.frontend.generate(self.serving, self.prepared, self.peer) as outputs:
                if not fmt.request.stream:
                    collected = await outputs.collect()
                    await _send_json(send, 200, fmt.whole(collected))
                    return
                # the status waits for the first output: a request refused in the engine before it
                # (a constraint that would not compile) is still a plain 400, not a 200 stream
                first = await anext(outputs, None)
                await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
                started = True
                if first is not None:
                    for chunk in fmt.chunks(first):
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                async for output in outputs:
                    for chunk in fmt.chunks(output):
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"".join(fmt.end()), "more_body": False})
        except Rejected as exc:
            status = STATUS[exc.reason]
            if not started:
                await _send_json(send, status, fmt.error(status, exc.message))
                return
            body = event(fmt.error(status, exc.message)) + b"data: [DONE]\n\n"
            await send({"type": "http.response.body", "body": body, "more_body": False})


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _send_json(send: Send, status: int, payload: Any) -> None:
    body = json.dumps(payload, ensure_ascii=False).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


Parser = Callable[[dict[str, Any]], HttpRequest]


class HttpFrontend:
    def __init__(self, state: ServerState, token: str | None, max_body_bytes: int, body_timeout: float = 60.0) -> None:
        self.state = state
        self.frontend = Frontend(state)
        self._token = token
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout

    def app(self) -> Starlette:
        routes = [
            Route("/", self.playground, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/completions", self.openai(completion_request, CompletionFormat), methods=["POST"]),
            Route("/v1/chat/completions", self.openai(chat_request, ChatFormat), methods=["POST"]),
            Route("/ai/run/{model:path}", self.workers_ai, methods=["POST"]),
        ]

        async def not_found(request: Request, exc: Exception) -> Response:
            return json_response(404, openai_error(404, f"no route {request.method} {request.url.path}"))

        async def not_allowed(request: Request, exc: Exception) -> Response:
            return json_response(405, openai_error(405, f"{request.method} is not allowed on {request.url.path}"))

        async def internal(request: Request, exc: Exception) -> Response:  # a bug: still JSON, and logged
            log.error("unhandled error in the HTTP front-end", path=request.url.path, exc_info=exc)
            return json_response(500, openai_error(500, "internal error"))

        handlers: dict[Any, Any] = {404: not_found, 405: not_allowed, Exception: internal}
        app = Starlette(routes=routes, exception_handlers=handlers)
        app.router.redirect_slashes = False  # its redirect echoed the Host header: /v1/models/ is a 404
        return app

    # -- routes --------------------------------------------------------------------------

    async def playground(self, request: Request) -> Response:
        page = resources.files("server.http").joinpath("playground.html").read_text()
        return HTMLResponse(page)

    async def health(self, request: Request) -> Response:
        serving = self.state.serving
        if self.state.draining or serving is None or not serving.engine.alive:
            return json_response(503, {"status": "not serving"})
        return json_response(200, {"status": "serving"})

    async def models(self, request: Request) -> Response:
        try:
            self._authorize(request)
            serving = self.frontend.serving(peer_of(request.scope))
        except HttpError as exc:
            return json_response(exc.status, openai_error(exc.status, exc.message, exc.param, exc.code))
        except Rejected as exc:
            return json_response(STATUS[exc.reason], openai_error(STATUS[exc.reason], exc.message))
        data = [
            {
                "id": name,
                "object": "model",
                "created": 0,
                "owned_by": "mistral-serve",
                "root": self.state.model_name,
                "max_model_len": serving.engine.max_model_len,
            }
            for name in self.state.model_names
        ]
        return json_response(200, {"object": "list", "data": data})

    def openai(self, parse: Parser, format_class: type[Format]) -> Callable[[Request], Awaitable[Any]]:
        async def route(request: Request) -> Any:
            return await self._generation(request, parse, format_class, None)

        return route

    async def workers_ai(self, request: Request) -> Any:
        return await self._generation(request, workers_ai_request, WorkersAIFormat, request.path_params["model"])

    # -- the shared path of a generation ---------------------------------------------------

    async def _generation(
        self, request: Request, parse: Parser, format_class: type[Format], path_model: str | None
    ) -> Any:
        peer = peer_of(request.scope)
        as_error = workers_error if format_class is WorkersAIFormat else None
        names: dict[str, str] = {}
        try:
            self._authorize(request)
            body = await self._body(request)
            try:
                parsed = parse(body)
            except InvalidRequest as exc:
                raise self.frontend.reject(INVALID_ARGUMENT, str(exc), peer) from None
            names = parsed.param_names
            self.frontend.serving(peer)  # loading or draining: 503 before any model name is judged
            model = self._model(path_model if path_model is not None else parsed.model)
            serving, prepared = await self.frontend.prepare(Parsed(parsed.request), peer, {"protocol": "http"})
        except HttpError as exc:
            payload = (
                as_error(exc.status, exc.message)
                if as_error
                else openai_error(exc.status, exc.message, exc.param, exc.code)
            )
            return json_response(exc.status, payload)
        except Rejected as exc:
            status = STATUS[exc.reason]
            param = param_of(exc.message, names) if status == 400 else None
            payload = as_error(status, exc.message) if as_error else openai_error(status, exc.message, param)
            return json_response(status, payload)
        fmt = format_class(parsed, prepared, model, serving.tokenizer, self.frontend.tool_calls_unparsed)
        return GenerationResponse(self.frontend, serving, prepared, peer, fmt)

    def _authorize(self, request: Request) -> None:
        if self._token is None:
            return
        if not bearer_token_matches(request.headers.get("authorization", ""), self._token):
            raise HttpError(401, "missing or wrong bearer token (header 'Authorization: Bearer <token>')")

    async def _body(self, request: Request) -> dict[str, Any]:
        media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media != "application/json":
            raise HttpError(415, f"content-type: must be application/json, got {media or 'none'!r}")
        length = request.headers.get("content-length")
        limit = self.max_body_bytes
        if length is not None and length.isdigit() and int(length) > limit:
            raise HttpError(413, f"the request body is {int(length)} bytes; the limit is {limit}")
        chunks, size = [], 0
        stream = request.stream().__aiter__()
        while True:
            try:  # nginx's client_body_timeout: the time allowed between two reads of the body
                chunk = await asyncio.wait_for(anext(stream), self.body_timeout)
            except StopAsyncIteration:
                break
            except TimeoutError:
                raise HttpError(
                    408, f"the request body stopped arriving (nothing for {self.body_timeout:g} s)"
                ) from None
            size += len(chunk)
            if size > limit:
                raise HttpError(413, f"the request body is over the limit of {limit} bytes")
            chunks.append(chunk)
        try:
            return await asyncio.to_thread(parse_json, b"".join(chunks))
        except BodyError as exc:
            raise HttpError(400, str(exc), exc.param) from None

    def _model(self, name: str | None) -> str:
        """The name the answer reports: the one asked for, which must be served."""
        if name is None:
            return self.state.model_name
        if name not in self.state.model_names:
            served = ", ".join(repr(n) for n in self.state.model_names)
            raise HttpError(404, f"model: {name!r} is not served here (served: {served})", "model", "model_not_found")
        return name
