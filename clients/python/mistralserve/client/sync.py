"""Blocking client."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grpc

from mistralserve.client.channel import Security
from mistralserve.client.requests import build
from mistralserve.client.results import Generation
from mistralserve.v1 import generation_pb2 as pb
from mistralserve.v1 import generation_pb2_grpc as pb_grpc


class Client:
    """``Client("127.0.0.1:50051")``; TLS when ``root_certificates`` is given."""

    def __init__(self, target: str = "127.0.0.1:50051", *, timeout: float | None = None, **security: Any) -> None:
        self.security = Security(**security)
        credentials = self.security.credentials()
        options = self.security.options()
        if credentials is None:
            self.channel = grpc.insecure_channel(target, options=options)
        else:
            self.channel = grpc.secure_channel(target, credentials, options=options)
        self.stub = pb_grpc.GenerationServiceStub(self.channel)
        self.timeout = timeout

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def responses(self, prompt: str | None = None, **kwargs: Any) -> Iterator[pb.GenerateStreamResponse]:
        """The raw stream of GenerateStream."""
        request = build(pb.GenerateStreamRequest, prompt, **kwargs)
        yield from self.stub.GenerateStream(request, timeout=self.timeout, metadata=self.security.metadata())

    def stream(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Mapping[str, str]] | None = None,
        prompt_token_ids: Sequence[int] | None = None,
        **options: Any,
    ) -> Iterator[str]:
        """Text deltas of sample 0 as they are generated."""
        for response in self.responses(prompt, messages=messages, prompt_token_ids=prompt_token_ids, **options):
            if response.index == 0 and response.text:
                yield response.text

    def generate(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Mapping[str, str]] | None = None,
        prompt_token_ids: Sequence[int] | None = None,
        **options: Any,
    ) -> Generation:
        request = build(pb.GenerateRequest, prompt, messages=messages, prompt_token_ids=prompt_token_ids, **options)
        response = self.stub.Generate(request, timeout=self.timeout, metadata=self.security.metadata())
        return Generation.from_response(response)

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        request = pb.TokenizeRequest(text=text, add_special_tokens=add_special_tokens)
        return list(self.stub.Tokenize(request, timeout=self.timeout, metadata=self.security.metadata()).token_ids)

    def detokenize(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        request = pb.DetokenizeRequest(token_ids=token_ids, skip_special_tokens=skip_special_tokens)
        return str(self.stub.Detokenize(request, timeout=self.timeout, metadata=self.security.metadata()).text)

    def model_info(self) -> pb.GetModelInfoResponse:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout, metadata=self.security.metadata())  # type: ignore[no-any-return]
