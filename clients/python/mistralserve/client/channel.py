"""Channel options shared by the sync and async clients: TLS and bearer-token credentials."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

MAX_MESSAGE_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class Security:
    token: str | None = None  # sent as "authorization: Bearer <token>"
    root_certificates: bytes | None = None  # PEM of the CA that signed the server: turns TLS on
    private_key: bytes | None = None  # with certificate_chain: mutual TLS
    certificate_chain: bytes | None = None
    server_name: str | None = None  # override the name checked against the server's certificate

    @property
    def tls(self) -> bool:
        return self.root_certificates is not None

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not self.tls:
            return None
        channel = grpc.ssl_channel_credentials(self.root_certificates, self.private_key, self.certificate_chain)
        if self.token:
            call = grpc.access_token_call_credentials(self.token)
            return grpc.composite_channel_credentials(channel, call)
        return channel

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Plaintext channels cannot carry call credentials: the token goes as metadata."""
        return (("authorization", f"Bearer {self.token}"),) if self.token and not self.tls else ()

    def options(self) -> list[tuple[str, object]]:
        options: list[tuple[str, object]] = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        return options
