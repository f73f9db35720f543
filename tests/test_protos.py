"""The wire contract: buf lint (STANDARD), buf breaking against the last commit, fresh stubs."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUF = Path(sys.executable).parent / "buf"
STUBS = ROOT / "clients" / "python" / "mistralserve" / "v1"


def test_buf_lint_standard() -> None:
    result = subprocess.run([str(BUF), "lint"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def committed(ref: str, path: str) -> bool:
    return subprocess.run(["git", "cat-file", "-e", f"{ref}:{path}"], cwd=ROOT, capture_output=True).returncode == 0


def test_buf_breaking_against_the_previous_commit() -> None:
    """The contract of HEAD (and of the working tree) against HEAD~1, when that one had protos."""
    assert (ROOT / ".git").exists() and shutil.which("git"), "buf breaking needs the git history"
    against = ".git#ref=HEAD~1" if committed("HEAD~1", "buf.yaml") else ".git#ref=HEAD"
    result = subprocess.run([str(BUF), "breaking", "--against", against], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_breaking_catches_a_breaking_change(tmp_path: Path) -> None:
    workspace = tmp_path / "workspace"
    shutil.copytree(ROOT / "protos", workspace / "protos")
    shutil.copy(ROOT / "buf.yaml", workspace / "buf.yaml")
    proto = workspace / "protos" / "mistralserve" / "v1" / "generation.proto"
    proto.write_text(
        proto.read_text().replace("  uint32 completion_tokens = 2;\n", "  string completion_tokens = 2;\n")
    )
    result = subprocess.run(
        [str(BUF), "breaking", str(workspace), "--against", str(ROOT)], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode != 0
    assert "completion_tokens" in result.stdout + result.stderr


def test_committed_stubs_are_fresh(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "clients" / "python" / "regenerate_stubs.py"), str(tmp_path)], check=True
    )
    fresh = tmp_path / "mistralserve" / "v1"
    names = sorted(p.name for p in fresh.iterdir())
    assert names == ["generation_pb2.py", "generation_pb2.pyi", "generation_pb2_grpc.py"]
    _, mismatch, errors = filecmp.cmpfiles(fresh, STUBS, names, shallow=False)
    assert mismatch == [] and errors == [], f"stale stubs: {mismatch + errors}; run `make protos`"
