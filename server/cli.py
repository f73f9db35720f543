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
from model.kv_cache import parse_bytes
from model.runner import BACKENDS
from server.logging_setup import LOG_LEVELS, configure_logging

DTYPES = ("auto", "float32", "bfloat16", "float16")
KV_DTYPES = ("float32", "bfloat16", "float16")


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


def _n_samples(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 16:
        raise argparse.ArgumentTypeError(f"must be in [1, 16], got {value}")
    return value


def _size(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mistral-serve", description="Serve Mistral-family language models.")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="print the continuation of a prompt (offline, no server)")
    gen.add_argument("prompt", nargs="?", help="text to continue")
    gen.add_argument("--prompts-file", help="a file of prompts, one per line, generated together")
    gen.add_argument("--n", type=_n_samples, default=1, help="samples per prompt, 1 to 16 (default 1)")
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--model", type=Path, help="checkpoint directory or .gguf file (default: SmolLM2-135M-Instruct)")
    gen.add_argument("--max-tokens", type=_positive_int, default=128, help="tokens to generate at most (default 128)")
    gen.add_argument("--temperature", type=_temperature, default=0.0, help="0 = greedy (default), > 0 samples")
    gen.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    gen.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: float32 on CPU, bfloat16 on CUDA")
    gen.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    gen.add_argument("--block-size", type=_positive_int, default=16, help="tokens per KV-cache block (default 16)")
    gen.add_argument(
        "--kv-cache-memory",
        type=_size,
        default=None,
        help="KV-cache budget, e.g. 2GiB (default: 1GiB on CPU; on CUDA --gpu-memory-utilization decides)",
    )
    gen.add_argument(
        "--gpu-memory-utilization",
        type=_fraction,
        default=0.9,
        help="CUDA: share of GPU memory for weights, activations and KV cache (default 0.9)",
    )
    gen.add_argument("--kv-cache-dtype", choices=("auto", *KV_DTYPES), default="auto", help="auto: the model's dtype")
    gen.add_argument("--attention-backend", choices=BACKENDS, default="auto", help="auto: xformers on CUDA, else torch")
    gen.add_argument(
        "--max-num-batched-tokens", type=_positive_int, default=2048, help="tokens per engine step (default 2048)"
    )
    gen.add_argument("--max-num-seqs", type=_positive_int, default=64, help="sequences per engine step (default 64)")
    gen.add_argument("--log-level", choices=LOG_LEVELS, default="warning", help="logs go to stderr (default warning)")

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

        configure_logging(args.log_level)
        return run_generate(args, resolve_model_path(args.model))
    except (CheckpointError, ModelFetchError, ValueError) as exc:
        print(f"mistral-serve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
