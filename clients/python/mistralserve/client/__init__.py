"""Sync and async clients for mistral-serve's GenerationService."""

from mistralserve.client.aio import AsyncClient
from mistralserve.client.results import Generation
from mistralserve.client.sync import Client

__all__ = ["AsyncClient", "Client", "Generation"]
