"""Sparse mixture of experts (Mixtral): a softmax router picks ``k`` SwiGLU experts per token.

Routing is Hugging Face's ``MixtralSparseMoeBlock``: router logits ``x R^T``, softmax in fp32 over
all experts, the top ``k`` probabilities renormalised to sum to 1, the output the weighted sum of
the chosen experts' outputs. Tokens are grouped by expert (one stable sort per layer), so each
expert with tokens runs one matrix product per step over all of them and experts no token chose
are never read: a single decoding sequence touches ``k`` experts' weights per layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.layers import SwiGLU, empty_weight, linear


@dataclass(frozen=True)
class Routing:
    """Which expert rows go where: expert ``e`` takes ``tokens[starts[e]:starts[e + 1]]`` weighted
    by ``weights[starts[e]:starts[e + 1]]``."""

    tokens: torch.Tensor  # (T * k,) token row of each (token, choice), grouped by expert
    weights: torch.Tensor  # (T * k,) fp32 renormalised router weight of that choice
    counts: list[int]  # tokens per expert

    def groups(self) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """(expert, token rows, weights) for every expert that has tokens, in expert order."""
        out = []
        start = 0
        for expert, count in enumerate(self.counts):
            if count:
                end = start + count
                out.append((expert, self.tokens[start:end], self.weights[start:end]))
                start = end
        return out


def route(router_logits: torch.Tensor, top_k: int) -> Routing:
    """``router_logits`` (T, experts) -> the tokens grouped by their chosen experts. Within an
    expert the tokens keep their order, so an expert every token chose gets ``arange(T)``."""
    num_experts = router_logits.shape[-1]
    probs = F.softmax(router_logits.float(), dim=-1)
    top, chosen = torch.topk(probs, top_k, dim=-1)
    top /= top.sum(dim=-1, keepdim=True)
    if router_logits.shape[0] == 1:  # one token (a single sequence decoding): no sort needed
        picked: list[int] = chosen[0].tolist()
        by_expert = sorted(range(top_k), key=picked.__getitem__)
        counts = [0] * num_experts
        for expert in picked:
            counts[expert] += 1
        return Routing(torch.zeros(top_k, dtype=torch.int64), top[0, by_expert], counts)
    flat = chosen.reshape(-1)
    order = torch.argsort(flat, stable=True)
    return Routing(order // top_k, top.reshape(-1)[order], torch.bincount(flat, minlength=num_experts).tolist())


def route_host(router_logits: torch.Tensor, top_k: int) -> Routing:
    """``route`` for logits on the CPU, in numpy: the same fp32 softmax, top-k (lowest expert first
    on ties) and renormalisation, without a torch dispatch per operation (~10 us each here, a
    tenth of a single-token layer's experts). The compiled CPU decoder's routing. Tokens within an
    expert keep their order (stable sort), so an expert every token chose gets ``arange(T)``."""
    z = router_logits.numpy()
    z = np.exp(z - z.max(axis=1, keepdims=True))
    probs = z / z.sum(axis=1, keepdims=True)
    chosen = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
    top = np.take_along_axis(probs, chosen, axis=1)
    top /= top.sum(axis=1, keepdims=True)
    flat = chosen.reshape(-1)
    order = np.argsort(flat, kind="stable")
    counts = np.bincount(flat, minlength=probs.shape[1]).tolist()
    return Routing(torch.from_numpy(order // top_k), torch.from_numpy(top.reshape(-1)[order]), counts)


def combine(
    x: torch.Tensor, routing: Routing, expert: Callable[[int, torch.Tensor], torch.Tensor], out: torch.Tensor
) -> None:
    """``out[t] += sum over t's experts e of weight * expert(e, x[t])``."""
    for index, tokens, weights in routing.groups():
        y = expert(index, x.index_select(0, tokens))
        out.index_add_(0, tokens, y * weights.to(y.dtype)[:, None])


def count_tokens(totals: list[int], routing: Routing) -> None:
    for expert, count in enumerate(routing.counts):
        totals[expert] += count


class Router(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.weight = empty_weight(num_experts, hidden_size, dtype=dtype, device=device)


class SparseMoE(nn.Module):
    """The feed-forward block of a Mixtral layer (replaces ``SwiGLU``)."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.top_k = top_k
        self.router = Router(num_experts, hidden_size, dtype, device)
        self.experts = nn.ModuleList(SwiGLU(hidden_size, intermediate_size, dtype, device) for _ in range(num_experts))
        self.expert_tokens = [0] * num_experts  # tokens routed to each expert, ever

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing = route(linear(x, self.router.weight), self.top_k)
        count_tokens(self.expert_tokens, routing)
        out = torch.zeros_like(x)
        combine(x, routing, lambda e, rows: self.experts[e](rows), out)
        return out
