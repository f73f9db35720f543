"""``--debug-heap``: what the Python heap holds, on demand, for finding leaks (off by default).

With the flag, each server process (front-end and engine core) starts ``tracemalloc`` and logs a
``heap`` line on SIGUSR1: traced bytes, the allocation sites holding the most memory, live
objects by type (``gc``), and the process's resident memory. ``bench/soak.py`` sends the signal
every 30 s and diffs the lines. tracemalloc slows allocation, so this is for soak runs only.
"""

from __future__ import annotations

import collections
import gc
import signal
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)
TOP_SITES = 40  # allocation sites per heap line
TOP_TYPES = 200  # object types per heap line


def resident_bytes(pid: int | str = "self") -> int:
    """VmRSS of a process (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def heap_report(process: str) -> dict[str, Any]:
    gc.collect()  # count what is reachable, not cycles awaiting the collector (closed transports)
    types = collections.Counter(type(o).__name__ for o in gc.get_objects())
    report: dict[str, Any] = {
        "process": process,
        "rss_bytes": resident_bytes(),
        "gc_objects": sum(types.values()),
        "types": dict(types.most_common(TOP_TYPES)),
    }
    if tracemalloc.is_tracing():
        current, peak = tracemalloc.get_traced_memory()
        stats = tracemalloc.take_snapshot().statistics("lineno")[:TOP_SITES]
        report.update(
            traced_bytes=current,
            traced_peak_bytes=peak,
            sites={f"{s.traceback[0].filename}:{s.traceback[0].lineno}": s.size for s in stats},
        )
    return report


def install(process: str, also: Callable[[], None] | None = None) -> None:
    """Trace allocations from now on and log a ``heap`` line on SIGUSR1 (then call ``also``)."""
    tracemalloc.start()

    def dump(signum: int, frame: Any) -> None:
        log.info("heap", **heap_report(process))
        if also is not None:
            also()

    signal.signal(signal.SIGUSR1, dump)
