from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from model.default_model import default_cache_dir, ensure_default_model
from tests.server_process import ServerProcess


def bf16_product_modes() -> list[str]:
    """The cpu backend's bf16 product modes this machine's kernels have: widen+fma always, vdpbf16ps
    with AVX512-BF16 (the server picks it where it is clearly faster: AMD Zen 4, not Intel Xeons)."""
    from model.kernels import cpu_kernels

    kernels = cpu_kernels()
    return ["widen+fma", "vdpbf16ps"] if kernels is not None and kernels.has_bf16_dot() else ["widen+fma"]


@pytest.fixture(params=bf16_product_modes())
def bf16_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each bf16 product mode in turn, instead of the one the timing at start-up would pick."""
    import model.cpu_decoder

    mode = ("widen+fma", "vdpbf16ps").index(request.param)
    monkeypatch.setattr(model.cpu_decoder, "pick_bf16_compute", lambda kernels: mode)
    return str(request.param)


@pytest.fixture
def widen_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 products by widening to fp32 and FMA (activations stay fp32), whatever this CPU would pick."""
    import model.cpu_decoder

    monkeypatch.setattr(model.cpu_decoder, "pick_bf16_compute", lambda kernels: 0)


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """The default GGUF; `make test` fetches it beforehand, so this is normally a cache hit."""
    return ensure_default_model(default_cache_dir(os.environ))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_served") / "model")


@pytest.fixture(scope="session")
def long_tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with an 8,192-token context: generations long enough to keep a server busy."""
    from tests.tiny_checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_long") / "model", max_positions=8192)


@pytest.fixture(scope="session")
def server(tiny_checkpoint: Path) -> Iterator[ServerProcess]:
    """One real server process on the tiny checkpoint, shared by the end-to-end tests."""
    process = ServerProcess(tiny_checkpoint, "--max-queued-requests", "4096")
    try:
        process.wait_serving()
        yield process
    finally:
        process.close()


@pytest.fixture(scope="session")
def long_server(long_tiny_checkpoint: Path) -> Iterator[ServerProcess]:
    """A server on the 8,192-token tiny model: streams of thousands of tokens that take seconds
    however fast the machine, for tests that must interrupt a generation."""
    process = ServerProcess(long_tiny_checkpoint)
    try:
        process.wait_serving()
        yield process
    finally:
        process.close()


@pytest.fixture(scope="session")
def default_server(default_model_path: Path) -> Iterator[ServerProcess]:
    """A server on the default model with room for 64 streams (the HTTP load and playground tests)."""
    process = ServerProcess(default_model_path, "--kv-cache-memory", "512MiB")
    try:
        process.wait_serving(timeout=600)
        yield process
    finally:
        process.close()
