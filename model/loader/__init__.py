"""Find a checkpoint's format, build the model, stream its weights in.

Accepted: a directory in Hugging Face layout (``config.json``), a directory in
Mistral layout (``params.json``), a ``.gguf`` file, or a directory holding one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from model.config import CheckpointError, ModelConfig
from model.loader.checkpoint import Checkpoint, RowSource
from model.loader.gguf_file import open_gguf
from model.loader.hf import open_hf
from model.loader.mistral_native import open_mistral
from model.mistral import MistralModel

_IGNORED_WEIGHTS = ("rotary_emb.inv_freq",)
_CHUNK_BYTES = 16 << 20

__all__ = ["Checkpoint", "CheckpointError", "LoadedModel", "load_model", "open_checkpoint"]


@dataclass(frozen=True)
class LoadedModel:
    model: MistralModel
    config: ModelConfig
    path: Path
    format: str
    name: str


def find_gguf(path: Path) -> Path | None:
    """The GGUF file ``path`` names, or the single one inside directory ``path``."""
    if path.is_file():
        with path.open("rb") as f:
            return path if f.read(4) == b"GGUF" or path.suffix == ".gguf" else None
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) > 1:
        raise CheckpointError(f"{path}: several .gguf files; pass one of them: {', '.join(p.name for p in ggufs)}")
    return ggufs[0] if ggufs else None


def open_checkpoint(path: Path) -> Checkpoint:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir() and (path / "config.json").exists():
        return open_hf(path)
    if path.is_dir() and (path / "params.json").exists():
        return open_mistral(path)
    gguf = find_gguf(path)
    if gguf is not None:
        return open_gguf(gguf)
    if path.is_file():
        raise CheckpointError(
            f"{path}: not a checkpoint (pass a .gguf file or a directory with config.json or params.json)"
        )
    raise CheckpointError(f"{path}: no config.json, params.json or .gguf file in this directory")


def load_model(path: Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> LoadedModel:
    checkpoint = open_checkpoint(path)
    model = MistralModel(checkpoint.config, dtype, torch.device(device))
    loaded: set[str] = set()
    with torch.no_grad():
        for name, source, file in checkpoint.weights():
            if name.endswith(_IGNORED_WEIGHTS):
                continue
            if name in loaded:
                raise CheckpointError(f"{file}: tensor {name} appears twice")
            try:
                destination = model.weight_destination(name)
            except ValueError as exc:
                raise CheckpointError(f"{file}: {exc}") from None
            if tuple(destination.shape) != tuple(source.shape):
                raise CheckpointError(
                    f"{file}: tensor {name} has shape {tuple(source.shape)}, expected {tuple(destination.shape)}"
                )
            copy_rows(source, destination)
            loaded.add(name)
    missing = sorted(model.expected_weights() - loaded)
    if missing:
        raise CheckpointError(f"{checkpoint.path}: {len(missing)} tensors missing, e.g. {', '.join(missing[:3])}")
    model.eval()
    return LoadedModel(model, checkpoint.config, checkpoint.path, checkpoint.format, checkpoint.name)


def copy_rows(source: RowSource, destination: torch.Tensor) -> None:
    """Copy in chunks of about ``_CHUNK_BYTES``, releasing each chunk's checkpoint pages after it."""
    if destination.dim() <= 1:
        ranges = [(0, destination.shape[0] if destination.dim() else 1)]
    else:
        rows_per_chunk = max(1, _CHUNK_BYTES // max(1, source.row_bytes))
        step = max(source.row_align, rows_per_chunk // source.row_align * source.row_align)
        ranges = [(start, min(start + step, source.shape[0])) for start in range(0, source.shape[0], step)]
    for start, end in ranges:
        chunk = source.read(start, end)
        if destination.dim() <= 1:
            destination.copy_(chunk.reshape(destination.shape))
        else:
            destination[start:end].copy_(chunk)
        source.release(start, end)
