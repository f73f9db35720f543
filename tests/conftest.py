from __future__ import annotations

import os
from pathlib import Path

import pytest

from model.default_model import default_cache_dir, ensure_default_model


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """The default GGUF; `make test` fetches it beforehand, so this is normally a cache hit."""
    return ensure_default_model(default_cache_dir(os.environ))
