"""The ``mistral-serve`` command line: the only place that reads arguments and the environment."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from model.config import CheckpointError
from model.default_model import ModelFetchError, default_cache_dir, ensure_default_model

DTYPES = ("auto", "float32", "bfloat16", "float16")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _temperature(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mistral-serve", description="Serve Mistral-family language models.")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="print the continuation of a prompt (offline, no server)")
    gen.add_argument("prompt", help="text to continue")
    gen.add_argument("--model", type=Path, help="checkpoint directory or .gguf file (default: SmolLM2-135M-Instruct)")
    gen.add_argument("--max-tokens", type=_positive_int, default=128, help="tokens to generate at most (default 128)")
    gen.add_argument("--temperature", type=_temperature, default=0.0, help="0 = greedy (default), > 0 samples")
    gen.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    gen.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: float32 on CPU, bfloat16 on CUDA")
    gen.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")

    commands.add_parser("fetch-model", help="download the default model into the cache and print its path")
    return parser


def resolve_model_path(path: Path | None) -> Path:
    return path if path is not None else ensure_default_model(default_cache_dir(os.environ))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "fetch-model":
            print(resolve_model_path(None))
            return 0
        from server.generate_command import run_generate

        return run_generate(args, resolve_model_path(args.model))
    except (CheckpointError, ModelFetchError) as exc:
        print(f"mistral-serve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
