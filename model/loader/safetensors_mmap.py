"""Memory-mapped safetensors reading that drops each tensor's pages once it is copied.

The format is an 8-byte little-endian header length, a JSON header
(``{name: {dtype, shape, data_offsets: [begin, end]}}``, offsets relative to the
end of the header) and the raw data. We parse it here rather than through the
``safetensors`` package because we need the byte offsets: after a tensor is
copied into the model, ``madvise(MADV_DONTNEED)`` returns its pages, so loading
never holds the checkpoint and the model in memory at the same time.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from model.config import CheckpointError
from model.loader.checkpoint import RowSource

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class _Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


class SafetensorsFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        size = path.stat().st_size
        if size < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        with path.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > min(size - 8, _MAX_HEADER_BYTES):
                raise CheckpointError(
                    f"{path}: corrupt or truncated safetensors file (header claims {header_len} bytes, file has {size})"
                )
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from None
            if not isinstance(header, dict):
                raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        header.pop("__metadata__", None)
        self._entries = {name: self._entry(name, info, 8 + header_len, size) for name, info in header.items()}

    def _entry(self, name: str, info: object, data_start: int, size: int) -> _Entry:
        try:
            assert isinstance(info, dict)
            dtype_name, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            shape = tuple(int(d) for d in shape)
            begin, end = int(begin), int(end)
        except (AssertionError, KeyError, TypeError, ValueError):
            raise CheckpointError(f"{self.path}: corrupt safetensors header entry for {name!r}") from None
        if dtype_name not in DTYPES:
            raise CheckpointError(
                f"{self.path}: tensor {name} has unsupported dtype {dtype_name} (supported: {', '.join(DTYPES)})"
            )
        dtype = DTYPES[dtype_name]
        nbytes = math.prod(shape) * dtype.itemsize
        if begin < 0 or end - begin != nbytes:
            raise CheckpointError(f"{self.path}: tensor {name} has data_offsets inconsistent with its shape")
        if data_start + end > size:
            raise CheckpointError(
                f"{self.path}: truncated file: tensor {name} ends at byte {data_start + end}, file has {size}"
            )
        return _Entry(dtype, shape, data_start + begin, nbytes)

    def names(self) -> list[str]:
        return list(self._entries)

    def rows(self, name: str) -> RowSource:
        """Zero-copy views of the mapped bytes, row range by row range."""
        entry = self._entries[name]
        rows = entry.shape[0] if entry.shape else 1
        row_bytes = entry.nbytes // max(rows, 1)
        row_shape = entry.shape[1:]

        def read(start: int, end: int) -> torch.Tensor:
            if entry.nbytes == 0:
                return torch.empty(entry.shape, dtype=entry.dtype)
            count = (end - start) * row_bytes // entry.dtype.itemsize
            flat = torch.frombuffer(self._map, dtype=entry.dtype, count=count, offset=entry.start + start * row_bytes)
            return flat.view((end - start, *row_shape)) if entry.shape else flat.view(())

        def release(start: int, end: int) -> None:
            release_pages(self._map, entry.start + start * row_bytes, (end - start) * row_bytes)

        return RowSource(entry.shape, read, release, row_bytes, stored=str(entry.dtype).removeprefix("torch."))


def release_pages(mapping: mmap.mmap, start: int, nbytes: int) -> None:
    """``madvise(MADV_DONTNEED)`` over the pages covering ``[start, start + nbytes)``."""
    if nbytes <= 0:
        return
    first = start - start % mmap.PAGESIZE
    end = min(start + nbytes, len(mapping))
    mapping.madvise(mmap.MADV_DONTNEED, first, end - first)
