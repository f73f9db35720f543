"""Weights kept quantized in memory: GGUF block types decoded into one form the kernels read.

Every supported type is ``w = scale * q + min`` over groups of ``group`` consecutive inputs of a
row, with ``q`` 4-bit unsigned or 8-bit signed (``model/kernels/csrc/qgemm.h`` packs it):

    Q8_0  8-bit, group 32, scale d                       (34 bytes per 32 weights)
    Q4_0  4-bit, group 32, scale d, min -8 d              (18 bytes per 32)
    Q4_1  4-bit, group 32, scale d, min m                 (20 bytes per 32)
    Q4_K  4-bit, group 32, scale d sc_j, min -dmin m_j    (144 bytes per 256: 8 sub-blocks)
    Q6_K  8-bit (q - 32), group 16, scale d sc_j          (210 bytes per 256: 16 sub-blocks)

Checkpoints in floating point can be quantized at load (``--quantization``): ``q8_0`` and
``q4_0`` as llama.cpp's formats of those names (fp16 scales per 32 inputs), ``int8`` one fp32
scale per output row (symmetric, per channel).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType as QType

QUANTIZATIONS = ("none", "auto", "int8", "q8_0", "q4_0")
AT_LOAD = ("int8", "q8_0", "q4_0")  # schemes that quantize a floating-point checkpoint
KEPT_GGUF_TYPES = (QType.Q8_0, QType.Q4_0, QType.Q4_1, QType.Q4_K, QType.Q6_K)
FLOAT_GGUF_TYPES = (QType.F32, QType.F16, QType.BF16)


@dataclass(frozen=True)
class QuantParts:
    """One weight (or some of its rows) in the kernels' form, before packing."""

    values: torch.Tensor  # (rows, K): uint8 0..15 (4-bit) or int8 (8-bit)
    scales: torch.Tensor  # (rows, ceil(K / group)) fp32
    mins: torch.Tensor | None  # like scales, or None (all zero)
    group: int
    bits: int
    type: str  # what the checkpoint called it: "Q4_1", "q8_0", ...

    @property
    def shape(self) -> tuple[int, int]:
        return (self.values.shape[0], self.values.shape[1])

    def dequantize(self) -> torch.Tensor:
        """The fp32 matrix these parts stand for."""
        k = self.values.shape[1]
        w = self.values.float() * self.scales.repeat_interleave(self.group, 1)[:, :k]
        if self.mins is not None:
            w += self.mins.repeat_interleave(self.group, 1)[:, :k]
        return w

    def map_rows(self, fn: Any) -> QuantParts:
        """The same weight with ``fn`` applied to the rows of every component (a row permutation)."""
        return replace(
            self, values=fn(self.values), scales=fn(self.scales), mins=None if self.mins is None else fn(self.mins)
        )


def _f16(raw: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(raw).view(np.float16).astype(np.float32))


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(..., n) bytes -> (..., 2n): the low nibbles, then the high ones (GGML's order within a block)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def from_gguf(raw: np.ndarray, qtype: QType) -> QuantParts:
    """``raw``: (rows, bytes per row) of one of ``KEPT_GGUF_TYPES`` -> its parts (exact)."""
    rows = raw.shape[0]
    if qtype == QType.Q8_0:
        blocks = raw.reshape(rows, -1, 34)
        values = np.ascontiguousarray(blocks[:, :, 2:]).view(np.int8).reshape(rows, -1)
        return QuantParts(
            torch.from_numpy(values.copy()), _f16(blocks[:, :, :2]).reshape(rows, -1), None, 32, 8, "Q8_0"
        )
    if qtype in (QType.Q4_0, QType.Q4_1):
        size = 18 if qtype == QType.Q4_0 else 20
        blocks = raw.reshape(rows, -1, size)
        d = _f16(blocks[:, :, :2]).reshape(rows, -1)
        mins = -8 * d if qtype == QType.Q4_0 else _f16(blocks[:, :, 2:4]).reshape(rows, -1)
        values = _nibbles(blocks[:, :, size - 16 :]).reshape(rows, -1)
        return QuantParts(torch.from_numpy(values), d, mins, 32, 4, qtype.name)
    if qtype == QType.Q4_K:
        blocks = raw.reshape(rows, -1, 144)
        n = blocks.shape[1]
        d, dmin = _f16(blocks[:, :, 0:2]), _f16(blocks[:, :, 2:4])  # (rows, n, 1)
        sc, m = _q4k_scale_min(blocks[:, :, 4:16])  # (rows, n, 8)
        values = _nibbles(blocks[:, :, 16:].reshape(rows, n, 4, 32)).reshape(rows, -1)
        scales = (d * torch.from_numpy(sc).float()).reshape(rows, -1)
        mins = -(dmin * torch.from_numpy(m).float()).reshape(rows, -1)
        return QuantParts(torch.from_numpy(values), scales, mins, 32, 4, "Q4_K")
    if qtype == QType.Q6_K:
        blocks = raw.reshape(rows, -1, 210)
        n = blocks.shape[1]
        ql = blocks[:, :, :128].reshape(rows, n, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 1, 2, 1)
        qh = blocks[:, :, 128:192].reshape(rows, n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 1, 4, 1)
        q = ((ql & 0x0F).reshape(rows, n, 8, 32) | ((qh & 0x03).reshape(rows, n, 8, 32) << 4)).astype(np.int8) - 32
        sc = np.ascontiguousarray(blocks[:, :, 192:208]).view(np.int8).astype(np.float32)  # (rows, n, 16)
        scales = (_f16(blocks[:, :, 208:210]) * torch.from_numpy(sc)).reshape(rows, -1)
        return QuantParts(torch.from_numpy(q.reshape(rows, -1).astype(np.int8)), scales, None, 16, 8, "Q6_K")
    raise ValueError(f"{qtype.name} is not kept quantized (supported: {', '.join(t.name for t in KEPT_GGUF_TYPES)})")


def _q4k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's twelve bytes of 6-bit scales and mins -> eight of each (GGML's ``get_scale_min_k4``)."""
    s = scales.reshape(*scales.shape[:-1], 3, 4)
    d, m, md = s[..., 0, :], s[..., 1, :], s[..., 2, :]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def quantize(weight: torch.Tensor, scheme: str) -> QuantParts:
    """A floating-point (rows, K) weight in ``scheme`` (one of ``AT_LOAD``)."""
    w = weight.float()
    rows, k = w.shape
    if scheme == "int8":
        scale = w.abs().amax(dim=1, keepdim=True) / 127
        q = torch.where(scale > 0, w / scale.clamp_min(1e-30), 0).round().clamp(-127, 127).to(torch.int8)
        return QuantParts(q, scale, None, max(k, 1), 8, "int8")
    if scheme not in ("q8_0", "q4_0"):
        raise ValueError(f"quantization {scheme!r} is not one of: {', '.join(AT_LOAD)}")
    groups = -(-k // 32)
    blocks = torch.nn.functional.pad(w, (0, groups * 32 - k)).reshape(rows, groups, 32)
    # as llama.cpp (and gguf-py) quantize: scaled by 1 / d before d is rounded to fp16
    if scheme == "q8_0":
        d = blocks.abs().amax(dim=2) / 127
        scaled = blocks * torch.where(d == 0, 0, 1 / d).unsqueeze(2)
        q = (scaled.sign() * (scaled.abs() + 0.5).floor()).to(torch.int8)  # round half away from zero
        return QuantParts(q.reshape(rows, -1)[:, :k].contiguous(), d.half().float(), None, 32, 8, "q8_0")
    # q4_0: the value of largest magnitude maps to -8, 16 levels
    d = blocks.gather(2, blocks.abs().argmax(dim=2, keepdim=True)).squeeze(2) / -8
    q = (blocks * torch.where(d == 0, 0, 1 / d).unsqueeze(2) + 8.5).trunc().clamp(0, 15).to(torch.uint8)
    d16 = d.half().float()
    return QuantParts(q.reshape(rows, -1)[:, :k].contiguous(), d16, -8 * d16, 32, 4, "q4_0")


@dataclass(frozen=True)
class QuantFormat:
    """How a packed layer stores its weights (``qgemm.h``)."""

    bits: int
    group: int
    has_min: bool  # stored mins
    offset8: bool  # no stored mins: each is -8 scale (Q4_0)
    fp16: bool  # scales and mins exactly fp16 by construction


def format_of(kind: str, k: int) -> QuantFormat:
    """The packed form of a tensor stored (or quantized at load) as ``kind``, ``k`` inputs wide."""
    formats = {
        "Q8_0": QuantFormat(8, 32, False, False, True), "q8_0": QuantFormat(8, 32, False, False, True),
        "Q4_0": QuantFormat(4, 32, False, True, True), "q4_0": QuantFormat(4, 32, False, True, True),
        "Q4_1": QuantFormat(4, 32, True, False, True),
        "Q4_K": QuantFormat(4, 32, True, False, False),  # d * sc is not always an fp16
        "Q6_K": QuantFormat(8, 16, False, False, False),
        "int8": QuantFormat(8, max(k, 1), False, False, False),
    }  # fmt: skip
    if kind not in formats:
        raise ValueError(f"{kind} is not kept quantized (supported: {', '.join(formats)})")
    return formats[kind]


def common_format(formats: list[QuantFormat]) -> QuantFormat:
    """One form that holds every one of ``formats`` exactly (fused q, k, v or gate, up of mixed types)."""
    group = min(f.group for f in formats)
    if any(f.group % group for f in formats):
        raise ValueError(f"cannot hold groups {sorted({f.group for f in formats})} in one layer")
    offset8 = all(f.offset8 for f in formats)
    has_min = not offset8 and any(f.has_min or f.offset8 for f in formats)  # mixed: mins stored
    return QuantFormat(max(f.bits for f in formats), group, has_min, offset8, all(f.fp16 for f in formats))


def new_linear(kernels: ModuleType, form: QuantFormat, n: int, k: int, gated: bool) -> Any:
    """An empty packed layer (``QuantLinear``) to be filled with ``set_rows``."""
    return kernels.QuantLinear(n, k, form.group, form.bits, form.has_min, form.offset8, form.fp16, gated)


def set_rows(linear: Any, start: int, parts: QuantParts, form: QuantFormat) -> None:
    """Write ``parts`` (rows ``start`` on) into ``linear``, converted to ``form`` (exactly)."""
    repeat = parts.group // form.group
    groups = -(-parts.values.shape[1] // form.group)
    scales = parts.scales.repeat_interleave(repeat, 1)[:, :groups] if repeat > 1 else parts.scales
    mins = torch.empty(0)
    if parts.mins is not None:
        mins = parts.mins.repeat_interleave(repeat, 1)[:, :groups] if repeat > 1 else parts.mins
    values = parts.values.to(torch.int8) if form.bits == 8 and parts.values.dtype == torch.uint8 else parts.values
    linear.set_rows(start, values, scales, mins)


def pack(parts: QuantParts, kernels: ModuleType, gated: bool = False) -> Any:
    """The kernels' ``QuantLinear`` holding ``parts`` (in their own format)."""
    form = format_of(parts.type, parts.values.shape[1])
    linear = new_linear(kernels, form, parts.values.shape[0], parts.values.shape[1], gated)
    set_rows(linear, 0, parts, form)
    return linear
