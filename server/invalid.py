"""The error a request's validation raises: its text names the field and what is allowed."""

from __future__ import annotations


class InvalidRequest(ValueError):
    """Bad client input: INVALID_ARGUMENT over gRPC, 400 over HTTP."""
