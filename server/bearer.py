"""The one bearer-token rule of both front-ends (RFC 6750's ``Authorization: Bearer <token>``).

Accepted: the scheme in any case (``bearer``, ``BEARER``), one or more spaces after it, and
whitespace around the whole value, which HTTP parsers trim and gRPC metadata keeps. Anything else
is refused: another scheme, no space, a token that differs in any byte. The comparison takes
constant time.
"""

from __future__ import annotations

import hmac


def bearer_token_matches(header: str | bytes, token: str) -> bool:
    text = header.decode("latin-1") if isinstance(header, bytes) else header
    scheme, space, value = text.strip().partition(" ")
    return bool(space) and scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())
