"""Every command-line flag, defined once, each with its environment-variable twin.

``--max-num-seqs`` reads ``MISTRALSERVE_MAX_NUM_SEQS`` when not given on the command
line. The Helm chart sets these variables; a test checks that every variable the chart
sets is one of ``env_names()``.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.kv_cache import parse_bytes
from model.quant import QUANTIZATIONS
from model.runner import BACKENDS
from server.reasoning import REASONING_PARSERS

ENV_PREFIX = "MISTRALSERVE_"
DTYPES = ("auto", "float32", "bfloat16", "float16")
KV_DTYPES = ("auto", "float32", "bfloat16", "float16")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("auto", "json", "console")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in [0, 65535], got {value}")
    return value


def temperature(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def n_samples(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 16:
        raise argparse.ArgumentTypeError(f"must be in [1, 16], got {value}")
    return value


def size(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"must be true or false, got {text!r}")


@dataclass(frozen=True)
class Flag:
    name: str  # "--max-num-seqs"
    type: Callable[[str], Any] | None
    default: Any
    help: str
    choices: Sequence[str] | None = None
    repeat: bool = False  # may be given several times; its environment twin is comma-separated

    @property
    def dest(self) -> str:
        return self.name.removeprefix("--").replace("-", "_")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.dest.upper()


# Where the default model is downloaded: `serve`, `generate` and `fetch-model`.
CACHE_FLAGS = (
    Flag("--cache-dir", Path, None, "download cache of the default model (default: $XDG_CACHE_HOME/mistral-serve)"),
)

# Model, cache and engine: shared by `serve` and `generate`.
RUNTIME_FLAGS = (
    Flag("--model", Path, None, "checkpoint directory or .gguf file (default: SmolLM2-135M-Instruct)"),
    Flag(
        "--dtype",
        None,
        "auto",
        "weights dtype; auto: bfloat16 on CUDA and on CPUs with AVX512-BF16 or AMX, else float32",
        DTYPES,
    ),
    Flag("--device", None, "auto", "auto: cuda when available, else cpu", ("auto", "cpu", "cuda")),
    Flag("--block-size", positive_int, 16, "tokens per KV-cache block"),
    Flag("--kv-cache-memory", size, None, "KV-cache budget, e.g. 2GiB (default: 1GiB on CPU, profiled on CUDA)"),
    Flag("--gpu-memory-utilization", fraction, 0.9, "CUDA: share of GPU memory for weights, activations, cache"),
    Flag("--kv-cache-dtype", None, "auto", "auto: the model's dtype", KV_DTYPES),
    Flag(
        "--attention-backend",
        None,
        "auto",
        "auto: xformers on CUDA when installed, else torch; on CPU the compiled kernels (cpu) for float32/bfloat16",
        BACKENDS,
    ),
    Flag(
        "--quantization",
        None,
        "auto",
        "auto: keep a GGUF file's Q8_0/Q4_0/Q4_1/Q4_K/Q6_K weights quantized (cpu backend); q8_0, q4_0, int8: "
        "quantize a floating-point checkpoint at load; none: dequantize",
        QUANTIZATIONS,
    ),
    Flag("--enable-prefix-caching", boolean, True, "reuse KV blocks of shared prompt prefixes (true/false)"),
    Flag("--max-num-batched-tokens", positive_int, 2048, "tokens per engine step"),
    Flag("--max-num-seqs", positive_int, 64, "sequences per engine step"),
    Flag("--max-queued-requests", non_negative_int, 1024, "waiting requests before RESOURCE_EXHAUSTED"),
    Flag(
        "--default-max-tokens",
        positive_int,
        256,
        "tokens generated at most where a request sets no max_tokens (capped by the context left)",
    ),
    Flag("--log-level", None, "info", "log level (serve logs to stdout, generate to stderr)", LOG_LEVELS),
    Flag("--log-format", None, "auto", "auto: console on a terminal, JSON lines otherwise", LOG_FORMATS),
)

# The gRPC server only.
SERVER_FLAGS = (
    Flag("--host", None, "0.0.0.0", "address to listen on"),
    Flag("--port", port, 50051, "gRPC port (0: any free port, logged at startup)"),
    Flag(
        "--http-port", port, 8000, "HTTP port of the OpenAI-compatible and Workers AI APIs and the playground (0: off)"
    ),
    Flag(
        "--served-model-name",
        None,
        (),
        "model name reported to clients (default: from the checkpoint); repeat it for aliases clients may use "
        "too, e.g. @cf/mistral/mistral-7b-instruct-v0.1",
        repeat=True,
    ),
    Flag("--shutdown-grace", positive_float, 30.0, "seconds in-flight calls may take to finish after SIGTERM"),
    Flag("--max-message-bytes", size, 4 << 20, "largest request or response message"),
    Flag("--keepalive-time", positive_float, 30.0, "seconds between keepalive pings to idle clients"),
    Flag("--keepalive-timeout", positive_float, 10.0, "seconds to wait for a keepalive ping's answer"),
    Flag(
        "--http-timeout-keep-alive",
        positive_float,
        30.0,
        "HTTP: seconds a connection may stay idle, before and between requests",
    ),
    Flag(
        "--http-timeout-header", positive_float, 30.0, "HTTP: seconds a request's line and headers may take to arrive"
    ),
    Flag("--http-timeout-body", positive_float, 60.0, "HTTP: seconds allowed between two reads of a request body"),
    Flag("--tls-cert", Path, None, "server certificate chain (PEM): turns TLS on, with --tls-key"),
    Flag("--tls-key", Path, None, "server private key (PEM)"),
    Flag("--tls-client-ca", Path, None, "CA (PEM) that client certificates must chain to: mutual TLS"),
    Flag("--auth-token-file", Path, None, "file with the bearer token every call but health must carry"),
    Flag("--warmup", boolean, True, "run a short generation before reporting SERVING (true/false)"),
    Flag(
        "--exit-on-engine-death",
        boolean,
        True,
        "exit 1 after failing the calls in flight when the engine core dies, so a supervisor restarts the server "
        "(false: stay up reporting NOT_SERVING)",
    ),
    Flag("--health-port", port, None, "extra plaintext port serving only grpc.health.v1 (for kubelet probes)"),
    Flag("--metrics-port", port, 9400, "Prometheus /metrics HTTP port (0: any free port, logged at startup)"),
    Flag("--log-prompts", boolean, False, "include prompt text in request logs (true/false)"),
    Flag(
        "--reasoning-parser",
        None,
        "auto",
        "chat outputs' reasoning ([THINK]...[/THINK], <think>...</think>) in its own field: auto (when the tokenizer "
        "has think markers), think (require them), none (leave it in the answer)",
        REASONING_PARSERS,
    ),
    Flag(
        "--debug-heap",
        boolean,
        False,
        "trace Python allocations; SIGUSR1 logs a 'heap' line per process (slower: for soak runs only)",
    ),
)


def add_flags(parser: argparse.ArgumentParser, flags: Sequence[Flag], environ: Mapping[str, str]) -> None:
    """Add ``flags``; a flag's environment twin, when set, replaces its default."""
    for flag in flags:
        default = flag.default
        if flag.env in environ:
            raw = environ[flag.env]
            try:
                default = flag.type(raw) if flag.type else raw
            except (argparse.ArgumentTypeError, ValueError) as exc:
                parser.error(f"{flag.env}={raw!r}: {exc}")
            if flag.repeat:
                default = tuple(item.strip() for item in raw.split(",") if item.strip())
            if flag.choices is not None and default not in flag.choices:
                parser.error(f"{flag.env}={raw!r}: choose from {', '.join(flag.choices)}")
        kwargs: dict[str, Any] = {"default": default, "help": f"{flag.help} [env: {flag.env}]"}
        if flag.type is not None:
            kwargs["type"] = flag.type
        if flag.choices is not None:
            kwargs["choices"] = flag.choices
        if flag.repeat:
            kwargs["action"] = _Repeat
        parser.add_argument(flag.name, **kwargs)


class _Repeat(argparse.Action):
    """Collects every use of a repeatable flag; the first use replaces the default (from the env)."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: Any = None
    ) -> None:
        current = getattr(namespace, self.dest)
        setattr(namespace, self.dest, (*(() if current is self.default else current), values))


def env_names() -> set[str]:
    return {flag.env for flag in (*CACHE_FLAGS, *RUNTIME_FLAGS, *SERVER_FLAGS)}


def environment() -> Mapping[str, str]:
    """The process environment: read here and in ``server.cli`` only."""
    return os.environ
