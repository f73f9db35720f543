"""A simple one-sequence generation loop on the dense cache: the offline reference path.

The serving path (paged cache, continuous batching) replaces this for the server.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from model.dense_cache import DenseKVCache
from model.mistral import MistralModel


def sample_token(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> int:
    """Greedy for ``temperature == 0``, else a draw from ``softmax(logits / temperature)``."""
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def generate(
    model: MistralModel,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    seed: int | None = None,
    stop_ids: Sequence[int] = (),
) -> Iterator[int]:
    """Yield up to ``max_new_tokens`` tokens; a stop id is yielded, then generation ends."""
    if not prompt_ids:
        raise ValueError("prompt is empty: at least one token is needed")
    limit = model.config.max_position_embeddings
    if len(prompt_ids) >= limit:
        raise ValueError(f"prompt has {len(prompt_ids)} tokens; the model's context is {limit}")
    max_new_tokens = min(max_new_tokens, limit - len(prompt_ids))
    generator = torch.Generator(device=model.device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    cache = DenseKVCache(model.config)
    ids = torch.tensor(list(prompt_ids), dtype=torch.long, device=model.device)
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            positions = torch.arange(cache.length, cache.length + ids.numel(), device=model.device)
            hidden = model(ids, positions, cache.attention(ids.numel()))
            token = sample_token(model.compute_logits(hidden[-1:])[0], temperature, generator)
            yield token
            if token in stop_ids:
                return
            ids = torch.tensor([token], dtype=torch.long, device=model.device)
