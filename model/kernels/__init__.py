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


STALE_LOCK_SECONDS = 1200.0  # a build takes ~2 minutes on 2 cores


def wait_for_build_lock(lock: Path, stale_after: float = STALE_LOCK_SECONDS, poll: float = 0.5) -> None:
    """Wait while another process builds (torch holds ``lock`` in the build directory meanwhile);
    remove the lock once it is older than ``stale_after`` seconds. torch itself waits for the lock
    forever, so a build killed half-way (Ctrl-C during the first ``make serve``) would hang every
    later start."""
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return
        if age > stale_after:
            log.warning("removing a stale kernel build lock", lock=str(lock), age_seconds=round(age))
            lock.unlink(missing_ok=True)
            return
        time.sleep(poll)


def build(march: str = "native") -> ModuleType:
    """Compile (or load the cached build of) the kernels for ``march``; raises if the build fails."""
    from torch.utils.cpp_extension import _get_build_directory, load

    start = time.monotonic()
    name = f"mistralserve_cpu_{march.replace('-', '_')}"
    wait_for_build_lock(Path(_get_build_directory(name, verbose=False)) / "lock")
    module: ModuleType = load(
        name=name,
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
