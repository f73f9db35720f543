"""Optional compiled kernels, built on first use with ``torch.utils.cpp_extension``.

``paged_decode_attention`` reads keys and values straight from the paged cache for decode
tokens on CPU. It is compiled once per machine (tens of seconds; cached under
``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``). Where no compiler is
available the callers fall back to gather + SDPA.
"""

from __future__ import annotations

import functools
from pathlib import Path
from types import ModuleType

import structlog

log = structlog.get_logger(__name__)
SOURCE = Path(__file__).with_name("paged_attention_cpu.cpp")


@functools.cache
def cpu_kernels() -> ModuleType | None:
    """The compiled module, or None (logged once) if it cannot be built here."""
    try:
        from torch.utils.cpp_extension import load

        module: ModuleType = load(
            name="mistralserve_paged_attention_cpu",
            sources=[str(SOURCE)],
            extra_cflags=[
                "-O3",
                "-march=native",
                "-fopenmp",
                "-fno-math-errno",
                "-fassociative-math",
                "-fno-signed-zeros",
                "-fno-trapping-math",
            ],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
        return module
    except Exception as exc:  # no compiler, no headers, ...: the torch path still works
        log.warning("paged attention kernel unavailable, using gather + SDPA", error=f"{type(exc).__name__}: {exc}")
        return None
