"""Bearer-token authentication for every call except the health service."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

from server.bearer import bearer_token_matches

EXEMPT = ("/grpc.health.v1.Health/",)
if TYPE_CHECKING:  # grpc's classes are generic only in its type stubs
    Handler = grpc.RpcMethodHandler[Any, Any]


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("the auth token file is empty")
        self._token = token

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(details)
        if handler is None or details.method.startswith(EXEMPT):
            return handler
        metadata = dict(details.invocation_metadata or ())
        if bearer_token_matches(metadata.get("authorization", ""), self._token):
            return handler
        return _rejecting(handler, "missing or wrong bearer token (metadata 'authorization: Bearer <token>')")


def _rejecting(handler: Handler, message: str) -> Handler:
    async def reject(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def reject_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - an async generator, never reached

    deserialize, serialize = handler.request_deserializer, handler.response_serializer
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(reject_stream, deserialize, serialize)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(reject, deserialize, serialize)
    if handler.stream_stream:
        return grpc.stream_stream_rpc_method_handler(reject_stream, deserialize, serialize)
    return grpc.unary_unary_rpc_method_handler(reject, deserialize, serialize)
