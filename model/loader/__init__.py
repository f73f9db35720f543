"""Find a checkpoint's format, build the model, stream its weights in.

Accepted: a directory in Hugging Face layout (``config.json``), a directory in
Mistral layout (``params.json``), a ``.gguf`` file, or a directory holding one.

``quantization`` (``model.quant.QUANTIZATIONS``): ``none`` dequantizes everything to the
model dtype; ``auto`` keeps the linear weights a GGUF file stores in a kept type
(Q8_0, Q4_0, Q4_1, Q4_K, Q6_K) quantized; ``q8_0``, ``q4_0``, ``int8`` quantize a
floating-point checkpoint's linear weights as they stream in. Quantized weights are packed
for the CPU kernels at once (``model.kernels`` QuantLinear), so memory never holds more
than one layer's weights in any other form.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model.config import CheckpointError, ModelConfig
from model.loader.checkpoint import Checkpoint, RowSource
from model.loader.gguf_file import open_gguf
from model.loader.hf import open_hf
from model.loader.mistral_native import open_mistral
from model.mistral import MistralModel, fused_shards, is_linear, weight_target
from model.quant import AT_LOAD, QUANTIZATIONS, QuantFormat, common_format, format_of, new_linear, quantize, set_rows

_IGNORED_WEIGHTS = ("rotary_emb.inv_freq",)
_FLOAT_TYPES = ("F32", "F16", "BF16", "float32", "float16", "bfloat16")
_CHUNK_BYTES = 16 << 20
_QUANT_CHUNK_WEIGHTS = 1 << 18  # decoding or quantizing makes a few fp32 temporaries per weight

__all__ = ["Checkpoint", "CheckpointError", "LoadedModel", "load_model", "open_checkpoint"]


@dataclass(frozen=True)
class LoadedModel:
    model: MistralModel
    config: ModelConfig
    path: Path
    format: str
    name: str
    weight_types: dict[str, int]  # how the tensors are held: "Q4_1", "q8_0", "bfloat16", ... -> count

    @property
    def weight_types_text(self) -> str:
        """``Q4_1:210,Q8_0:1,bfloat16:61``: most common first."""
        return ",".join(f"{name}:{count}" for name, count in sorted(self.weight_types.items(), key=lambda kv: -kv[1]))


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


def load_model(
    path: Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", quantization: str = "none"
) -> LoadedModel:
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization {quantization!r} is not one of: {', '.join(QUANTIZATIONS)}")
    checkpoint = open_checkpoint(path)
    entries = list(checkpoint.weights())
    schemes = _plan(checkpoint, entries, quantization)
    kernels: Any = None
    if schemes:
        from model.kernels import cpu_kernels

        kernels = cpu_kernels()
        if kernels is None:
            raise ValueError("quantized weights need the compiled CPU kernels, which failed to build (see the log)")
    model = MistralModel(checkpoint.config, dtype, torch.device(device), frozenset(schemes))
    loaded: set[str] = set()
    types: dict[str, int] = {}
    dense_type = str(dtype).removeprefix("torch.")
    with torch.no_grad():
        for name, source, file in entries:
            if name.endswith(_IGNORED_WEIGHTS):
                continue
            if name in loaded:
                raise CheckpointError(f"{file}: tensor {name} appears twice")
            try:
                target, shard = weight_target(checkpoint.config, name)
                destination = model.weight_destination(name) if target not in schemes else None
            except ValueError as exc:
                raise CheckpointError(f"{file}: {exc}") from None
            if destination is None:
                expected = model.expected_shape(name)
                if tuple(source.shape) != expected:
                    raise CheckpointError(f"{file}: tensor {name} has shape {tuple(source.shape)}, expected {expected}")
                plan = schemes[target]
                if target not in model.quantized:
                    rows, cols = model.parameter_shape(target)
                    model.quantized[target] = new_linear(
                        kernels, plan.form, rows, cols, target.endswith("gate_up_proj")
                    )
                kind = plan.kinds[shard or 0]
                read_quantized(source, kind, model.quantized[target], model.shard_offset(name), plan.form)
                types[kind] = types.get(kind, 0) + 1
                trim_heap()
            else:
                if tuple(destination.shape) != tuple(source.shape):
                    raise CheckpointError(
                        f"{file}: tensor {name} has shape {tuple(source.shape)}, expected {tuple(destination.shape)}"
                    )
                copy_rows(source, destination)
                types[dense_type] = types.get(dense_type, 0) + 1
            loaded.add(name)
    missing = sorted(model.expected_weights() - loaded)
    if missing:
        raise CheckpointError(f"{checkpoint.path}: {len(missing)} tensors missing, e.g. {', '.join(missing[:3])}")
    model.eval()
    return LoadedModel(model, checkpoint.config, checkpoint.path, checkpoint.format, checkpoint.name, types)


@dataclass(frozen=True)
class _TargetPlan:
    kinds: list[str]  # per shard: the stored type kept ("Q4_1") or the scheme to quantize in ("q8_0")
    form: QuantFormat  # what the packed layer holds them in


def _plan(
    checkpoint: Checkpoint, entries: list[tuple[str, RowSource, Path]], quantization: str
) -> dict[str, _TargetPlan]:
    """Linear weights to keep quantized, and how. A fused weight (q, k, v; gate, up) is kept
    quantized only when all its parts can be."""
    if quantization == "none":
        return {}
    shards: dict[str, dict[int, str | None]] = {}
    widths: dict[str, int] = {}
    for name, source, file in entries:
        try:
            target, shard = weight_target(checkpoint.config, name)
        except ValueError:
            continue  # reported by the load itself
        if not is_linear(target):
            continue
        if quantization in AT_LOAD:
            if source.quantized is not None or source.stored not in _FLOAT_TYPES:
                raise CheckpointError(
                    f"{file}: tensor {name} is already quantized ({source.stored}); --quantization {quantization} "
                    "cannot requantize it (use auto to keep its types, or none to dequantize)"
                )
            kind: str | None = quantization
        else:  # auto
            kind = source.stored if source.quantized is not None else None
        shards.setdefault(target, {})[shard or 0] = kind
        widths[target] = source.shape[-1]
    plans = {}
    for target, kinds in shards.items():
        if len(kinds) == fused_shards(target) and all(k is not None for k in kinds.values()):
            ordered = [str(kinds[i]) for i in sorted(kinds)]
            plans[target] = _TargetPlan(ordered, common_format([format_of(k, widths[target]) for k in ordered]))
    return plans


def read_quantized(source: RowSource, kind: str, linear: Any, offset: int, form: QuantFormat) -> None:
    """Rows of ``source`` into the packed ``linear`` from row ``offset`` on, chunk by chunk (each
    decoded or quantized, written, and its checkpoint pages released), so the peak is the packed
    model plus one chunk."""
    rows_per_chunk = max(1, _QUANT_CHUNK_WEIGHTS // max(1, source.shape[-1]))
    step = max(source.row_align, rows_per_chunk // source.row_align * source.row_align)
    for start in range(0, source.shape[0], step):
        end = min(start + step, source.shape[0])
        if kind in AT_LOAD:
            chunk = quantize(source.read(start, end), kind)
        else:
            assert source.quantized is not None
            chunk = source.quantized(start, end)
        set_rows(linear, offset + start, chunk, form)
        # from the previous chunk on: the kernel maps cached pages around a faulting one
        # ("fault-around", 64 KiB), so reading this chunk mapped the previous chunk's tail again
        source.release(max(0, start - step), end)


@functools.cache
def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def trim_heap() -> None:
    """Give the heap's free pages back to the system (glibc keeps freed blocks resident): the
    transient buffers of decoding one tensor would otherwise add up over the load."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


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
