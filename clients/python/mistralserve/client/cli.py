"""``mistral-serve-client generate|chat|tokenize|info``: talk to a mistral-serve server."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from mistralserve.client.sync import Client


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mistral-serve-client", description="Client for a mistral-serve server.")
    parser.add_argument("--target", default="127.0.0.1:50051", help="host:port of the server (default 127.0.0.1:50051)")
    parser.add_argument("--timeout", type=float, default=None, help="deadline of each call, in seconds")
    parser.add_argument("--token", help="bearer token")
    parser.add_argument("--token-file", type=Path, help="file holding the bearer token")
    parser.add_argument("--tls-ca", type=Path, help="CA certificate (PEM) of the server: turns TLS on")
    parser.add_argument("--tls-cert", type=Path, help="client certificate (PEM), for mutual TLS")
    parser.add_argument("--tls-key", type=Path, help="client private key (PEM), for mutual TLS")
    parser.add_argument("--server-name", help="name to check the server certificate against")
    commands = parser.add_subparsers(dest="command", required=True)

    for name, help_text in (("generate", "continue a prompt"), ("chat", "answer a user message")):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("text", help="the prompt" if name == "generate" else "the user message")
        sub.add_argument("--stream", action="store_true", help="print the text as it is generated")
        sub.add_argument("--max-tokens", type=int)
        sub.add_argument("--temperature", type=float)
        sub.add_argument("--top-p", type=float)
        sub.add_argument("--top-k", type=int)
        sub.add_argument("--seed", type=int)
        sub.add_argument("--stop", action="append", help="stop string (repeatable)")
        sub.add_argument("--n", type=int, help="samples (without --stream)")
        shape = sub.add_mutually_exclusive_group()
        shape.add_argument("--json-schema", help="constrain the output: a JSON schema (its text, or @file)")
        shape.add_argument("--json-object", action="store_true", help="constrain the output to a JSON object")
        shape.add_argument("--regex", help="constrain the output to match this regular expression")
        shape.add_argument("--choice", action="append", help="constrain the output to one of these (repeatable)")
        shape.add_argument("--grammar", help="constrain the output: a Lark or GBNF grammar (its text, or @file)")
        if name == "chat":
            sub.add_argument("--system", help="a system message before the user message")
    tokenize = commands.add_parser("tokenize", help="token ids of a text")
    tokenize.add_argument("text")
    commands.add_parser("info", help="the served model, as JSON")
    return parser


def security(args: argparse.Namespace) -> dict[str, Any]:
    token = args.token or (args.token_file.read_text().strip() if args.token_file else None)

    def read(path: Path | None) -> bytes | None:
        return path.read_bytes() if path else None

    return {
        "token": token,
        "root_certificates": read(args.tls_ca),
        "certificate_chain": read(args.tls_cert),
        "private_key": read(args.tls_key),
        "server_name": args.server_name,
    }


def text_or_file(value: str | None) -> str | None:
    """``@path`` reads the file."""
    return Path(value[1:]).read_text() if value and value.startswith("@") else value


def run(args: argparse.Namespace, client: Client) -> None:
    if args.command == "info":
        print(json.dumps(json_format.MessageToDict(client.model_info()), indent=2))
        return
    if args.command == "tokenize":
        print(" ".join(str(i) for i in client.tokenize(args.text)))
        return
    options = {
        "max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
        "top_k": args.top_k, "seed": args.seed, "stop": args.stop, "n": args.n,
        "json_schema": text_or_file(args.json_schema), "json_object": args.json_object or None, "regex": args.regex,
        "choice": args.choice, "grammar": text_or_file(args.grammar),
    }  # fmt: skip
    if args.command == "chat":
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.text}
        ]
        inputs: dict[str, Any] = {"messages": messages}
    else:
        inputs = {"prompt": args.text}
    if args.stream:
        for delta in client.stream(**inputs, **options):
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return
    result = client.generate(**inputs, **options)
    for text in result.texts:
        print(text)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with Client(args.target, timeout=args.timeout, **security(args)) as client:
            run(args, client)
    except grpc.RpcError as exc:
        print(f"mistral-serve-client: error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"mistral-serve-client: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
