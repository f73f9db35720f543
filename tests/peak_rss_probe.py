"""Child process for the loader memory test: load one checkpoint, report memory in JSON.

Run as ``python -m tests.peak_rss_probe PATH [QUANTIZATION [WARM_PATH]]``: with WARM_PATH, a
small checkpoint of the same kind is loaded first and dropped, so that code pages, the OpenMP
threads and the allocator's arenas are already there when the baseline is taken. ``baseline_kb`` is the resident size
after imports, ``peak_kb`` the high-water mark of this process image (``VmHWM``; unlike
``ru_maxrss`` it does not inherit the parent's size from before ``exec``).
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import torch  # noqa: F401  (imported before the baseline is taken)

from model.kernels import cpu_kernels
from model.loader import load_model, trim_heap


def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def main() -> None:
    quantization = sys.argv[2] if len(sys.argv) > 2 else "none"
    if quantization != "none":
        assert cpu_kernels() is not None  # loaded before the baseline, like torch
    if len(sys.argv) > 3:
        warm = load_model(Path(sys.argv[3]), quantization=quantization)
        del warm
        gc.collect()
        trim_heap()
    baseline = status_kb("VmRSS")
    loaded = load_model(Path(sys.argv[1]), quantization=quantization)
    peak = status_kb("VmHWM")
    model_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    model_bytes += sum(q.nbytes for q in loaded.model.quantized.values())
    print(json.dumps({"baseline_kb": baseline, "peak_kb": peak, "model_bytes": model_bytes}))


if __name__ == "__main__":
    main()
