"""The GenerationService: validate, hand the engine the request, stream what comes back.

Bad input -> INVALID_ARGUMENT naming the field; a full queue -> RESOURCE_EXHAUSTED; model
still loading, engine core dead (also mid-stream) or server draining -> UNAVAILABLE. When the client cancels,
disconnects or runs out of deadline, the handler is cancelled and the request aborted, so
its blocks are freed at the engine's next step.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
import structlog
from mistralserve.v1 import generation_pb2 as pb

from scheduler.request import EngineDeadError, FinishReason, QueueFullError, RequestOutput, TokenLogprobs
from server.engine_client import EngineClient
from server.engine_protocol import RequestSpec
from server.metrics import ServerMetrics
from server.tokenizer import Tokenizer
from server.validation import InvalidRequest, Parsed, Prepared, deserializer, prepare

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


@dataclass(frozen=True)
class Serving:
    """The engine core's client and the tokenizer: what answers calls once the model is loaded."""

    engine: EngineClient
    tokenizer: Tokenizer


@dataclass
class ServerState:
    """What the servicer needs to know of the process: loaded yet, draining, calls in flight."""

    serving: Serving | None = None
    metrics: ServerMetrics | None = None
    model_name: str = ""
    log_prompts: bool = False
    default_max_tokens: int = 256  # where a request sets no max_tokens
    draining: bool = False
    inflight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class RequestLog:
    """What the ``request finished`` line reports, as the client saw it."""

    prompt_tokens: int
    peer: str
    start: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    completion_tokens: int = 0
    cached_tokens: int = 0
    finish_reasons: dict[int, str] = field(default_factory=dict)

    def saw(self, output: RequestOutput) -> None:
        if output.token_ids and self.first_token is None:
            self.first_token = time.monotonic()
        self.completion_tokens += len(output.token_ids)
        if output.finished:
            assert output.finish_reason is not None
            self.finish_reasons[output.index] = output.finish_reason.value
            if output.usage is not None:
                self.cached_tokens = output.usage.cached_tokens

    def finished(self, num_samples: int) -> None:
        reasons = [self.finish_reasons.get(i, FinishReason.ABORT.value) for i in range(num_samples)]
        fields: dict[str, Any] = {"finish_reasons": reasons} if num_samples > 1 else {}
        log.info(
            "request finished",
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            cached_tokens=self.cached_tokens,
            time_to_first_token=None if self.first_token is None else round(self.first_token - self.start, 6),
            total_time=round(time.monotonic() - self.start, 6),
            finish_reason=reasons[0],
            peer=self.peer,
            **fields,
        )


async def abort(context: Context, code: grpc.StatusCode, message: str) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("unreachable")  # context.abort raises


class GenerationServicer:
    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.state.idle.set()

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

    async def _reject(self, context: Context, code: grpc.StatusCode, reason: str, message: str) -> NoReturn:
        if self.state.metrics is not None:
            self.state.metrics.reject(reason)
        log.info("request rejected", reason=reason, error=message, peer=context.peer())
        await abort(context, code, message)

    async def _runtime(self, context: Context) -> Serving:
        unavailable = grpc.StatusCode.UNAVAILABLE
        if self.state.draining:
            await self._reject(context, unavailable, "unavailable", "the server is shutting down")
        serving = self.state.serving
        if serving is None:
            await self._reject(context, unavailable, "unavailable", "the model is still loading")
        if not serving.engine.alive:
            await self._reject(context, unavailable, "unavailable", "the engine is not running")
        return serving

    async def _prepare(self, parsed: Parsed, context: Context) -> tuple[Serving, Prepared]:
        runtime = await self._runtime(context)
        try:
            prepared = prepare(
                parsed,
                runtime.tokenizer,
                runtime.engine.info.config.vocab_size,
                runtime.engine.max_model_len,
                self.state.default_max_tokens,
            )
        except InvalidRequest as exc:
            await self._reject(context, grpc.StatusCode.INVALID_ARGUMENT, "invalid_argument", str(exc))
        fields: dict[str, Any] = {"prompt": parsed.message.prompt} if self.state.log_prompts else {}
        log.info(
            "request received",
            request_id=prepared.request_id,
            prompt_tokens=len(prepared.prompt_ids),
            n=prepared.params.n,
            max_tokens=prepared.params.max_tokens,
            peer=context.peer(),
            **fields,
        )
        return runtime, prepared

    async def _submit(self, runtime: Serving, prepared: Prepared, context: Context) -> AsyncIterator[RequestOutput]:
        spec = RequestSpec(prepared.request_id, tuple(prepared.prompt_ids), prepared.params, prepared.priority)
        try:
            return runtime.engine.add(spec)
        except QueueFullError as exc:
            await self._reject(context, grpc.StatusCode.RESOURCE_EXHAUSTED, "queue_full", str(exc))
        except EngineDeadError as exc:
            await self._reject(context, grpc.StatusCode.UNAVAILABLE, "unavailable", str(exc))
        except ValueError as exc:
            await self._reject(context, grpc.StatusCode.INVALID_ARGUMENT, "invalid_argument", str(exc))

    def _enter(self) -> None:
        self.state.inflight += 1
        self.state.idle.clear()

    def _leave(self) -> None:
        self.state.inflight -= 1
        if self.state.inflight == 0:
            self.state.idle.set()

    # -- generation ----------------------------------------------------------------------

    async def GenerateStream(self, parsed: Parsed, context: Context) -> AsyncIterator[pb.GenerateStreamResponse]:
        runtime, prepared = await self._prepare(parsed, context)
        with structlog.contextvars.bound_contextvars(request_id=prepared.request_id):
            record = RequestLog(len(prepared.prompt_ids), context.peer())
            self._enter()
            finished = 0
            try:
                outputs = await self._submit(runtime, prepared, context)
                async for output in outputs:
                    record.saw(output)
                    yield self._stream_response(runtime, output)
                    if output.finished:
                        finished += 1
                        if output.finish_reason == FinishReason.ERROR:
                            log.error("generation failed", error=output.error)
                            await abort(context, grpc.StatusCode.INTERNAL, f"generation failed: {output.error}")
            except EngineDeadError as exc:
                await abort(context, grpc.StatusCode.UNAVAILABLE, str(exc))
            finally:
                if finished < prepared.params.n:  # cancelled, deadline, disconnect: free the blocks
                    runtime.engine.abort(prepared.request_id)
                record.finished(prepared.params.n)
                self._leave()

    async def Generate(self, parsed: Parsed, context: Context) -> pb.GenerateResponse:
        runtime, prepared = await self._prepare(parsed, context)
        with structlog.contextvars.bound_contextvars(request_id=prepared.request_id):
            return await self._generate(runtime, prepared, context)

    async def _generate(self, runtime: Serving, prepared: Prepared, context: Context) -> pb.GenerateResponse:
        record = RequestLog(len(prepared.prompt_ids), context.peer())
        self._enter()
        completions = {i: pb.Completion(index=i) for i in range(prepared.params.n)}
        usage = pb.Usage()
        finished = 0
        try:
            outputs = await self._submit(runtime, prepared, context)
            async for output in outputs:
                record.saw(output)
                completion = completions[output.index]
                completion.text += output.text
                completion.token_ids.extend(output.token_ids)
                completion.logprobs.extend(self._logprobs(runtime, entry) for entry in output.logprobs)
                if output.finished:
                    finished += 1
                    if output.finish_reason == FinishReason.ERROR:
                        log.error("generation failed", error=output.error)
                        await abort(context, grpc.StatusCode.INTERNAL, f"generation failed: {output.error}")
                    self._finish(completion, output)
                    if output.usage is not None:
                        usage.prompt_tokens = output.usage.prompt_tokens
                        usage.cached_tokens = output.usage.cached_tokens
                        usage.completion_tokens += output.usage.completion_tokens
        except EngineDeadError as exc:
            await abort(context, grpc.StatusCode.UNAVAILABLE, str(exc))
        finally:
            if finished < prepared.params.n:
                runtime.engine.abort(prepared.request_id)
            record.finished(prepared.params.n)
            self._leave()
        return pb.GenerateResponse(
            request_id=prepared.request_id, completions=[completions[i] for i in sorted(completions)], usage=usage
        )

    def _stream_response(self, runtime: Serving, output: RequestOutput) -> pb.GenerateStreamResponse:
        response = pb.GenerateStreamResponse(
            request_id=output.request_id,
            index=output.index,
            text=output.text,
            token_ids=output.token_ids,
            logprobs=[self._logprobs(runtime, entry) for entry in output.logprobs],
        )
        if output.finished:
            self._finish(response, output)
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
    def _finish(message: Any, output: RequestOutput) -> None:
        assert output.finish_reason is not None
        message.finish_reason = FINISH[output.finish_reason]
        if isinstance(output.stop_reason, str):
            message.stop_string = output.stop_reason
        elif isinstance(output.stop_reason, int):
            message.stop_token_id = output.stop_reason

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
        request = parsed.message
        if parsed.error is not None:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, parsed.error)
        which = request.WhichOneof("input")
        tokenizer = runtime.tokenizer
        if which == "text":
            ids = tokenizer.encode(request.text, add_special_tokens=request.add_special_tokens)
        elif which == "messages":
            from server.validation import chat_ids

            try:
                ids = chat_ids(request.messages, tokenizer)
            except InvalidRequest as exc:
                await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        else:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, "input: give exactly one of text, messages")
        tokens = [tokenizer.decode([i], skip_special_tokens=False) for i in ids]
        return pb.TokenizeResponse(token_ids=ids, tokens=tokens)

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
        )
        if config.sliding_window is not None:
            info.sliding_window = config.sliding_window
        return info
