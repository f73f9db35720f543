"""Child process for the loader memory test: load one checkpoint, report memory in JSON.

Run as ``python -m tests.peak_rss_probe PATH``. ``baseline_kb`` is the resident size
after imports, ``peak_kb`` the high-water mark of this process image (``VmHWM``; unlike
``ru_maxrss`` it does not inherit the parent's size from before ``exec``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch  # noqa: F401  (imported before the baseline is taken)

from model.loader import load_model


def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def main() -> None:
    baseline = status_kb("VmRSS")
    loaded = load_model(Path(sys.argv[1]))
    peak = status_kb("VmHWM")
    model_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    print(json.dumps({"baseline_kb": baseline, "peak_kb": peak, "model_bytes": model_bytes}))


if __name__ == "__main__":
    main()
