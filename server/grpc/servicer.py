"""The GenerationService: gRPC in front of ``server.frontend``.

Bad input -> INVALID_ARGUMENT naming the field; a full queue -> RESOURCE_EXHAUSTED; model
still loading, engine core dead (also mid-stream) or server draining -> UNAVAILABLE. When the client cancels,
disconnects or runs out of deadline, the handler is cancelled and the request aborted, so
its blocks are freed at the engine's next step.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
import structlog
from mistralserve.v1 import generation_pb2 as pb

from scheduler.request import FinishReason, RequestOutput, TokenLogprobs
from server.chat_messages import chat_ids
from server.chat_output import ChatDelta, ChatOutputs
from server.frontend import (
    INTERNAL,
    INVALID_ARGUMENT,
    QUEUE_FULL,
    UNAVAILABLE,
    Completion,
    Frontend,
    Rejected,
    ServerState,
    Serving,
)
from server.invalid import InvalidRequest
from server.tokenizer import Tokenizer
from server.validation import Parsed, deserializer

log = structlog.get_logger(__name__)
if TYPE_CHECKING:  # grpc's classes are generic only in its type stubs
    Context = grpc.aio.ServicerContext[Any, Any]
SERVICE = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name
FINISH = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.ABORT: pb.FINISH_REASON_ABORT,
    FinishReason.ERROR: pb.FINISH_REASON_ERROR,
}
STATUS = {
    INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    QUEUE_FULL: grpc.StatusCode.RESOURCE_EXHAUSTED,
    INTERNAL: grpc.StatusCode.INTERNAL,
}


async def abort(context: Context, code: grpc.StatusCode, message: str) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("unreachable")  # context.abort raises


class GenerationServicer:
    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.frontend = Frontend(state)

    # -- plumbing ------------------------------------------------------------------------

    def handler(self) -> grpc.GenericRpcHandler:
        def unary(fn: Any, request: Any, response: Any) -> grpc.RpcMethodHandler[Any, Any]:
            return grpc.unary_unary_rpc_method_handler(fn, deserializer(request), response.SerializeToString)

        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "GenerateStream": grpc.unary_stream_rpc_method_handler(
                    self.GenerateStream,
                    deserializer(pb.GenerateStreamRequest),
                    pb.GenerateStreamResponse.SerializeToString,
                ),
                "Generate": unary(self.Generate, pb.GenerateRequest, pb.GenerateResponse),
                "Tokenize": unary(self.Tokenize, pb.TokenizeRequest, pb.TokenizeResponse),
                "Detokenize": unary(self.Detokenize, pb.DetokenizeRequest, pb.DetokenizeResponse),
                "GetModelInfo": unary(self.GetModelInfo, pb.GetModelInfoRequest, pb.GetModelInfoResponse),
            },
        )

    async def _runtime(self, context: Context) -> Serving:
        try:
            return self.frontend.serving(context.peer())
        except Rejected as exc:
            await abort(context, STATUS[exc.reason], exc.message)

    # -- generation ----------------------------------------------------------------------

    async def GenerateStream(self, parsed: Parsed, context: Context) -> AsyncIterator[pb.GenerateStreamResponse]:
        try:
            runtime, prepared = await self.frontend.prepare(parsed, context.peer())
            chat = ChatOutputs(prepared.chat, self.frontend.tool_calls_unparsed)
            async with self.frontend.generate(runtime, prepared, context.peer()) as outputs:
                async for output in outputs:
                    parts = chat.parts(output.index, output.text, output.finished)
                    yield self._stream_response(runtime, output, parts)
        except Rejected as exc:
            await abort(context, STATUS[exc.reason], exc.message)

    async def Generate(self, parsed: Parsed, context: Context) -> pb.GenerateResponse:
        try:
            runtime, prepared = await self.frontend.prepare(parsed, context.peer())
            chat = ChatOutputs(prepared.chat, self.frontend.tool_calls_unparsed)
            async with self.frontend.generate(runtime, prepared, context.peer()) as outputs:
                collected = await outputs.collect()
                completions = [
                    self._completion(runtime, c, chat.parts(c.index, c.text, last=True)) for c in collected.completions
                ]
        except Rejected as exc:
            await abort(context, STATUS[exc.reason], exc.message)
        return pb.GenerateResponse(
            request_id=prepared.request_id,
            completions=completions,
            usage=pb.Usage(
                prompt_tokens=collected.prompt_tokens,
                completion_tokens=collected.completion_tokens,
                cached_tokens=collected.cached_tokens,
            ),
        )

    @staticmethod
    def _calls(parts: ChatDelta) -> list[pb.ToolCall]:
        return [pb.ToolCall(id=call.id, name=call.name, arguments=call.arguments) for call in parts.calls]

    def _completion(self, runtime: Serving, completion: Completion, parts: ChatDelta) -> pb.Completion:
        message = pb.Completion(
            index=completion.index,
            text=parts.content,
            token_ids=completion.token_ids,
            logprobs=[self._logprobs(runtime, entry) for entry in completion.logprobs],
            reasoning=parts.reasoning,
            tool_calls=self._calls(parts),
        )
        if completion.finish_reason is not None:
            self._finish(message, completion.finish_reason, completion.stop_reason)
        return message

    def _stream_response(self, runtime: Serving, output: RequestOutput, parts: ChatDelta) -> pb.GenerateStreamResponse:
        response = pb.GenerateStreamResponse(
            request_id=output.request_id,
            index=output.index,
            text=parts.content,
            token_ids=output.token_ids,
            logprobs=[self._logprobs(runtime, entry) for entry in output.logprobs],
            reasoning=parts.reasoning,
            tool_calls=self._calls(parts),
        )
        if output.finished:
            assert output.finish_reason is not None
            self._finish(response, output.finish_reason, output.stop_reason)
            if output.usage is not None:
                response.usage.CopyFrom(
                    pb.Usage(
                        prompt_tokens=output.usage.prompt_tokens,
                        completion_tokens=output.usage.completion_tokens,
                        cached_tokens=output.usage.cached_tokens,
                    )
                )
        return response

    @staticmethod
    def _finish(message: Any, reason: FinishReason, stop_reason: int | str | None) -> None:
        message.finish_reason = FINISH[reason]
        if isinstance(stop_reason, str):
            message.stop_string = stop_reason
        elif isinstance(stop_reason, int):
            message.stop_token_id = stop_reason

    @staticmethod
    def _logprobs(runtime: Serving, entry: TokenLogprobs) -> pb.PositionLogprobs:
        def one(token_id: int, logprob: float, rank: int) -> pb.TokenLogprob:
            text = runtime.tokenizer.decode([token_id], skip_special_tokens=False)
            return pb.TokenLogprob(token_id=token_id, token=text, logprob=logprob, rank=rank)

        chosen = entry.chosen
        return pb.PositionLogprobs(
            chosen=one(chosen.token_id, chosen.logprob, chosen.rank),
            top=[one(t.token_id, t.logprob, t.rank) for t in entry.top],
        )

    # -- tokenizer and model -------------------------------------------------------------

    async def Tokenize(self, parsed: Parsed, context: Context) -> pb.TokenizeResponse:
        runtime = await self._runtime(context)
        if parsed.error is not None:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, parsed.error)
        try:  # a long text or conversation is tokenized off the event loop
            return await asyncio.to_thread(_tokenize, parsed.message, runtime.tokenizer)
        except InvalidRequest as exc:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    async def Detokenize(self, parsed: Parsed, context: Context) -> pb.DetokenizeResponse:
        runtime = await self._runtime(context)
        if parsed.error is not None:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, parsed.error)
        ids = list(parsed.message.token_ids)
        vocab = runtime.engine.info.config.vocab_size
        bad = next((i for i in ids if i >= vocab), None)
        if bad is not None:
            await abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, f"token_ids: {bad} is outside the vocabulary [0, {vocab})"
            )
        text = runtime.tokenizer.decode(ids, skip_special_tokens=parsed.message.skip_special_tokens)
        return pb.DetokenizeResponse(text=text)

    async def GetModelInfo(self, parsed: Parsed, context: Context) -> pb.GetModelInfoResponse:
        runtime = await self._runtime(context)
        if parsed.error is not None:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, parsed.error)
        model = runtime.engine.info
        config = model.config
        info = pb.GetModelInfoResponse(
            model_name=self.state.model_name,
            architecture=config.architecture,
            context_length=model.max_model_len,
            vocab_size=config.vocab_size,
            num_attention_heads=config.num_heads,
            num_key_value_heads=config.num_kv_heads,
            head_dim=config.head_dim,
            num_layers=config.num_layers,
            kv_block_size=model.block_size,
            kv_cache_blocks=model.num_blocks,
            kv_cache_tokens=model.num_blocks * model.block_size,
            kv_cache_free_blocks=runtime.engine.stats().kv_blocks_free,
            dtype=model.dtype,
            kv_cache_dtype=model.kv_cache_dtype,
            device=model.device,
            attention_backend=model.attention_backend,
            checkpoint_format=model.checkpoint_format,
            weight_types=model.weight_types,
            num_experts=config.num_experts,
            num_experts_per_token=config.num_experts_per_tok,
            layer_sliding_windows=[w or 0 for w in config.layer_windows],
        )
        if config.sliding_window is not None:
            info.sliding_window = config.sliding_window
        return info


def _tokenize(request: pb.TokenizeRequest, tokenizer: Tokenizer) -> pb.TokenizeResponse:
    which = request.WhichOneof("input")
    if which == "text":
        ids = tokenizer.encode(request.text, add_special_tokens=request.add_special_tokens)
    elif which == "messages":
        ids = chat_ids(request.messages, tokenizer)
    else:
        raise InvalidRequest("input: give exactly one of text, messages")
    tokens = [tokenizer.decode([i], skip_special_tokens=False) for i in ids]
    return pb.TokenizeResponse(token_ids=ids, tokens=tokens)
