"""Requests, the block manager, the scheduler and the engine loop (later issues)."""
