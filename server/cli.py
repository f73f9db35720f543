"""The ``mistral-serve`` command line: the only place that reads arguments and the environment.

mistral-serve serve [flags]              the gRPC server
mistral-serve generate [flags] PROMPT    offline generation through the same engine
mistral-serve fetch-model [--cache-dir]  download the default model, print its path
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NoReturn

from model.config import CheckpointError
from model.default_model import ModelFetchError, default_cache_dir, ensure_default_model
from server.logging_setup import configure_logging
from server.options import (
    CACHE_FLAGS,
    RUNTIME_FLAGS,
    SERVER_FLAGS,
    add_flags,
    environment,
    n_samples,
    positive_int,
    temperature,
)


class OneLineErrors(argparse.ArgumentParser):
    """Bad flags are one line naming the flag and what it allows (argparse prints usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = OneLineErrors(prog="mistral-serve", description="Serve Mistral-family language models.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gRPC server")
    add_flags(serve, CACHE_FLAGS, environ)
    add_flags(serve, RUNTIME_FLAGS, environ)
    add_flags(serve, SERVER_FLAGS, environ)

    gen = commands.add_parser("generate", help="print continuations of prompts (offline, no server)")
    gen.add_argument("prompt", nargs="?", help="text to continue")
    gen.add_argument("--prompts-file", help="a file of prompts, one per line, generated together")
    gen.add_argument("--n", type=n_samples, default=1, help="samples per prompt, 1 to 16 (default 1)")
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument(
        "--max-tokens",
        type=positive_int,
        default=None,
        help="tokens to generate at most (default: --default-max-tokens)",
    )
    gen.add_argument("--temperature", type=temperature, default=0.0, help="0 = greedy (default), > 0 samples")
    gen.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    add_flags(gen, CACHE_FLAGS, environ)
    add_flags(
        gen, RUNTIME_FLAGS, {**environ, "MISTRALSERVE_LOG_LEVEL": environ.get("MISTRALSERVE_LOG_LEVEL", "warning")}
    )

    fetch = commands.add_parser("fetch-model", help="download the default model into the cache and print its path")
    add_flags(fetch, CACHE_FLAGS, environ)
    return parser


def resolve_model_path(path: Path | None, cache_dir: Path | None, environ: Mapping[str, str]) -> Path:
    if path is not None:
        return path
    return ensure_default_model(cache_dir if cache_dir is not None else default_cache_dir(environ))


def main(argv: Sequence[str] | None = None) -> int:
    environ = environment()
    args = build_parser(environ).parse_args(argv)
    try:
        if args.command == "fetch-model":
            print(resolve_model_path(None, args.cache_dir, environ))
            return 0
        # The server logs to stdout (what container runtimes collect); `generate` prints its
        # results there, so its logs go to stderr.
        configure_logging(args.log_level, args.log_format, sys.stdout if args.command == "serve" else None)
        model_path = resolve_model_path(args.model, args.cache_dir, environ)
        if args.command == "serve":
            from server.serve import run_server

            return run_server(args, model_path)
        from server.generate_command import run_generate

        return run_generate(args, model_path)
    except (CheckpointError, ModelFetchError, ValueError) as exc:
        print(f"mistral-serve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
