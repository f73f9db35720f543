"""What every checkpoint format hands the loader: a config and a stream of named tensors.

Tensors are read in row ranges so that only a few megabytes of checkpoint pages are
resident at any time: the loader copies rows ``[start, end)`` into the model, then
``release(start, end)`` drops their pages.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model.config import CheckpointError, ModelConfig
from model.quant import QuantParts


@dataclass(frozen=True)
class RowSource:
    """One checkpoint tensor, readable by rows in Hugging Face layout.

    ``row_align``: ranges must start on multiples of it (a head's rows, where the
    format permutes rows within heads). ``quantized``: for tensors stored in a type the
    kernels keep (``model.quant``), their rows in that form, without dequantizing.
    ``stored``: the type as stored ("F32", "BF16", "Q4_1", ...).
    """

    shape: tuple[int, ...]
    read: Callable[[int, int], torch.Tensor]
    release: Callable[[int, int], None]
    row_bytes: int
    row_align: int = 1
    quantized: Callable[[int, int], QuantParts] | None = None
    stored: str = ""


# (Hugging Face tensor name, its rows, file it came from)
WeightStream = Iterator[tuple[str, RowSource, Path]]


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    format: str  # "hf" | "mistral" | "gguf"
    name: str
    config: ModelConfig
    weights: Callable[[], WeightStream]


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def build_config(path: Path, **fields: Any) -> ModelConfig:
    """``ModelConfig(**fields)`` with its validation errors turned into a CheckpointError naming ``path``."""
    try:
        return ModelConfig(**fields)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def require(path: Path, data: dict[str, Any], key: str) -> Any:
    if key not in data:
        raise CheckpointError(f"{path}: missing required field {key!r}")
    return data[key]
