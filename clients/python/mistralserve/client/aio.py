"""asyncio client (grpc.aio)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import grpc

from mistralserve.client.channel import Security
from mistralserve.client.requests import build
from mistralserve.client.results import Generation
from mistralserve.v1 import generation_pb2 as pb
from mistralserve.v1 import generation_pb2_grpc as pb_grpc


class AsyncClient:
    """``async with AsyncClient("127.0.0.1:50051") as client: ...``"""

    def __init__(self, target: str = "127.0.0.1:50051", *, timeout: float | None = None, **security: Any) -> None:
        self.security = Security(**security)
        credentials = self.security.credentials()
        options = self.security.options()
        if credentials is None:
            self.channel = grpc.aio.insecure_channel(target, options=options)
        else:
            self.channel = grpc.aio.secure_channel(target, credentials, options=options)
        self.stub = pb_grpc.GenerationServiceStub(self.channel)
        self.timeout = timeout

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def responses(self, prompt: str | None = None, **kwargs: Any) -> AsyncIterator[pb.GenerateStreamResponse]:
        request = build(pb.GenerateStreamRequest, prompt, **kwargs)
        call = self.stub.GenerateStream(request, timeout=self.timeout, metadata=self.security.metadata())
        async for response in call:
            yield response

    async def stream(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Mapping[str, str]] | None = None,
        prompt_token_ids: Sequence[int] | None = None,
        **options: Any,
    ) -> AsyncIterator[str]:
        """Text deltas of sample 0 as they are generated."""
        async for response in self.responses(prompt, messages=messages, prompt_token_ids=prompt_token_ids, **options):
            if response.index == 0 and response.text:
                yield response.text

    async def generate(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Mapping[str, str]] | None = None,
        prompt_token_ids: Sequence[int] | None = None,
        **options: Any,
    ) -> Generation:
        request = build(pb.GenerateRequest, prompt, messages=messages, prompt_token_ids=prompt_token_ids, **options)
        response = await self.stub.Generate(request, timeout=self.timeout, metadata=self.security.metadata())
        return Generation.from_response(response)

    async def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        request = pb.TokenizeRequest(text=text, add_special_tokens=add_special_tokens)
        response = await self.stub.Tokenize(request, timeout=self.timeout, metadata=self.security.metadata())
        return list(response.token_ids)

    async def detokenize(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        request = pb.DetokenizeRequest(token_ids=token_ids, skip_special_tokens=skip_special_tokens)
        response = await self.stub.Detokenize(request, timeout=self.timeout, metadata=self.security.metadata())
        return str(response.text)

    async def model_info(self) -> pb.GetModelInfoResponse:
        request = pb.GetModelInfoRequest()
        return await self.stub.GetModelInfo(request, timeout=self.timeout, metadata=self.security.metadata())  # type: ignore[no-any-return]
