"""Regenerate the committed protobuf and gRPC stubs from ../../protos (``make protos``).

    python regenerate_stubs.py [OUTPUT_DIR]     # default: this directory

The stubs land in OUTPUT_DIR/mistralserve/v1/. A test regenerates them into a temporary
directory and fails if the committed files differ.
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

HERE = Path(__file__).resolve().parent
PROTOS = HERE.parent.parent / "protos"
FILES = ["mistralserve/v1/generation.proto"]


def generate(output: Path) -> None:
    output.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"  # well-known types shipped with grpcio-tools
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{include}",
        f"--python_out={output}",
        f"--pyi_out={output}",
        f"--grpc_python_out={output}",
        *FILES,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
