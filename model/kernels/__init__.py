"""The compiled CPU kernels, built on first use for the machine's ISA with ``torch.utils.cpp_extension``.

``csrc/``: packed-weight linear layers (fp32 or bf16 weights, fused residual-add and SiLU-and-mul
epilogues), paged attention for prefill and decode chunks, RMSNorm, and rotary embedding fused
with the KV-cache write. Built once per machine and ``march`` (about a minute; cached under
``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``). ``march="native"`` builds
for this CPU (AVX-512, AVX512-BF16 where present; AVX2 otherwise); tests also build
``"haswell"`` (AVX2 + FMA only) to cover the AVX2 code paths on any x86 machine.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from types import ModuleType

import structlog

log = structlog.get_logger(__name__)
SOURCES = sorted(Path(__file__).with_name("csrc").glob("*.cpp"))
CFLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-std=c++17"]


def build(march: str = "native") -> ModuleType:
    """Compile (or load the cached build of) the kernels for ``march``; raises if the build fails."""
    from torch.utils.cpp_extension import load

    start = time.monotonic()
    module: ModuleType = load(
        name=f"mistralserve_cpu_{march.replace('-', '_')}",
        sources=[str(s) for s in SOURCES],
        extra_include_paths=[str(SOURCES[0].parent)],
        extra_cflags=[f"-march={march}", *CFLAGS],
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )
    log.info("cpu kernels ready", march=march, isa=module.ISA, seconds=round(time.monotonic() - start, 1))
    return module


def cpu_has_native_bf16() -> bool:
    """The CPU multiplies bf16 in hardware: AVX512-BF16 or AMX."""
    import torch

    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


@functools.cache
def cpu_kernels(march: str = "native") -> ModuleType | None:
    """The compiled module, or None (logged once) if it cannot be built here."""
    try:
        return build(march)
    except Exception as exc:  # no compiler, no headers, ...: the torch path still works
        log.warning("cpu kernels unavailable, using the torch path", error=f"{type(exc).__name__}: {exc}")
        return None
