"""Soak: a real server under mixed load for minutes or hours, sampling its memory every 30 s.

Workload (per client thread, until the time is up): a prompt of 1-300 random words, max_tokens
1-96, n 1 or 2, greedy or sampled (seeded), no stop string or one of three; 10% of streams are
cancelled by the client after 4 messages, 5% carry a 0.3 s deadline. Over gRPC
(``GenerateStream``) or HTTP (``/v1/completions``, SSE; "cancelled" closes the connection, the
deadline is a socket timeout).

Every ``--interval`` seconds: resident memory of the server's process tree (front-end and
engine core), their open file descriptors and threads, the KV pool's free blocks, and, with
``--debug-heap``, each process's ``heap`` line (SIGUSR1: live objects by type, tracemalloc's
largest allocation sites). At the end: a table, the heap diff between the first sample after
``--warmup`` and the last, and a verdict (RSS at the end within 5% of RSS at the warm-up mark;
fds and threads flat; KV pool full; no status besides OK / CANCELLED / DEADLINE_EXCEEDED).

    .venv/bin/python -m bench.soak --minutes 60 --threads 24 [--protocol http] [--debug-heap]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import http.client
import json
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from mistralserve.v1 import generation_pb2 as pb

from model.default_model import default_cache_dir, ensure_default_model
from server.heap_debug import resident_bytes
from tests.server_process import ServerProcess

WORDS = [
    "the",
    "a",
    "dragon",
    "castle",
    "river",
    "king",
    "queen",
    "sword",
    "magic",
    "forest",
    "night",
    "day",
    "light",
    "dark",
    "stone",
    "fire",
    "water",
    "wind",
    "story",
    "time",
    "ran",
    "said",
    "walked",
    "over",
    "under",
    "through",
    "because",
    "while",
    "then",
    "when",
    "where",
    "who",
    "what",
    "why",
    "how",
    "bright",
    "old",
    "young",
    "tall",
    "small",
    "green",
    "blue",
    "red",
    "gold",
    "silver",
    "ancient",
    "secret",
    "hidden",
    "lost",
    "found",
]
STOPS: list[list[str]] = [[], [], ["."], ["\n"], [" the"]]


@dataclass
class Tally:
    statuses: collections.Counter[str] = field(default_factory=collections.Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, status: str) -> None:
        with self.lock:
            self.statuses[status] += 1


def one_request(rng: random.Random) -> dict[str, Any]:
    sampled = rng.random() < 0.5
    return {
        "prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 300))),
        "max_tokens": rng.randint(1, 96),
        "n": rng.choice([1, 2]),
        "temperature": 0.8 if sampled else 0.0,
        "seed": rng.randrange(1 << 30) if sampled else None,
        "stop": rng.choice(STOPS),
        "mode": "cancel" if (roll := rng.random()) < 0.10 else "deadline" if roll < 0.15 else "normal",
    }


def grpc_client(target: str, end: float, seed: int, tally: Tally) -> None:
    rng = random.Random(seed)
    with grpc.insecure_channel(target) as channel:
        call_stream = channel.unary_stream(
            "/mistralserve.v1.GenerationService/GenerateStream",
            request_serializer=pb.GenerateStreamRequest.SerializeToString,
            response_deserializer=pb.GenerateStreamResponse.FromString,
        )
        while time.monotonic() < end:
            spec = one_request(rng)
            sampling = pb.SamplingOptions(temperature=spec["temperature"])
            if spec["seed"] is not None:
                sampling.seed = spec["seed"]
            request = pb.GenerateStreamRequest(
                prompt=spec["prompt"],
                sampling=sampling,
                stopping=pb.StoppingOptions(max_tokens=spec["max_tokens"], stop=spec["stop"]),
                n=spec["n"],
            )
            call = call_stream(request, timeout=0.3 if spec["mode"] == "deadline" else 120)
            try:
                for i, _ in enumerate(call):
                    if spec["mode"] == "cancel" and i == 3:
                        call.cancel()
                        break
                tally.add(
                    "CANCELLED" if spec["mode"] == "cancel" and call.code() == grpc.StatusCode.CANCELLED else "OK"
                )
            except grpc.RpcError as error:
                tally.add(error.code().name)


def http_client(port: int, end: float, seed: int, tally: Tally) -> None:
    rng = random.Random(seed)
    while time.monotonic() < end:
        spec = one_request(rng)
        mode = spec.pop("mode")
        body = {k: v for k, v in spec.items() if v is not None} | {"stream": True}
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=0.3 if mode == "deadline" else 120)
        try:
            connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
            response = connection.getresponse()
            if response.status != 200:
                tally.add(str(response.status))
                continue
            events = 0
            for line in response:
                if line.startswith(b"data: "):
                    events += 1
                    if mode == "cancel" and events == 4:
                        break
            tally.add("CANCELLED" if mode == "cancel" and events == 4 else "OK")
        except TimeoutError:
            tally.add("DEADLINE_EXCEEDED")
        except (OSError, http.client.HTTPException) as error:
            tally.add(type(error).__name__)
        finally:
            connection.close()  # a cancelled or expired stream: the server aborts it


def process_tree(pid: int) -> list[int]:
    pids, queue = [], [pid]
    while queue:
        current = queue.pop()
        pids.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            with contextlib.suppress(OSError):
                queue += [int(c) for c in (task / "children").read_text().split()]
    return pids


def count_of(pid: int, what: str) -> int:
    try:
        if what == "fds":
            return len(os.listdir(f"/proc/{pid}/fd"))
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def free_blocks(server: ServerProcess) -> tuple[int, int]:
    with server.channel() as channel:
        info = server.stub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
    return info.kv_cache_free_blocks, info.kv_cache_blocks


@dataclass
class Sample:
    seconds: float
    rss: int
    rss_by_pid: dict[int, int]
    fds: int
    threads: int
    free_blocks: int
    statuses: int
    heaps: list[dict[str, Any]]


def heap_lines(server: ServerProcess, after: int) -> list[dict[str, Any]]:
    return [line for line in server.log_lines()[after:] if line.get("event") == "heap"]


def sample(server: ServerProcess, start: float, tally: Tally, debug_heap: bool) -> Sample:
    seen = len(server.log_lines())
    if debug_heap:
        server.process.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 60
        while len(heap_lines(server, seen)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
    pids = process_tree(server.process.pid)
    by_pid = {pid: resident_bytes(pid) for pid in pids}
    return Sample(
        time.monotonic() - start,
        sum(by_pid.values()),
        by_pid,
        sum(count_of(pid, "fds") for pid in pids),
        sum(count_of(pid, "threads") for pid in pids),
        free_blocks(server)[0],
        sum(tally.statuses.values()),
        heap_lines(server, seen) if debug_heap else [],
    )


def heap_diff(first: list[dict[str, Any]], last: list[dict[str, Any]]) -> list[str]:
    lines = []
    for before in first:
        after = next((h for h in last if h["process"] == before["process"]), None)
        if after is None:
            continue
        lines.append(
            f"{before['process']}: gc objects {before['gc_objects']:,} -> {after['gc_objects']:,}; "
            f"traced {before.get('traced_bytes', 0) / 2**20:.1f} -> {after.get('traced_bytes', 0) / 2**20:.1f} MiB"
        )
        grown = {  # types in both lines (a type can enter or leave the top list between them)
            name: after["types"][name] - before["types"][name] for name in set(before["types"]) & set(after["types"])
        }
        top = sorted(grown.items(), key=lambda kv: -kv[1])[:8]
        lines.append("  types that grew: " + ", ".join(f"{n} +{d:,}" for n, d in top if d > 0))
        sites = {
            site: after.get("sites", {}).get(site, 0) - before.get("sites", {}).get(site, 0)
            for site in set(before.get("sites", {})) | set(after.get("sites", {}))
        }
        for site, grown_bytes in sorted(sites.items(), key=lambda kv: -kv[1])[:8]:
            if grown_bytes > 0:
                lines.append(f"  +{grown_bytes / 1024:.0f} KiB at {site}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--threads", type=int, default=24)
    parser.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    parser.add_argument("--interval", type=float, default=30.0, help="seconds between samples")
    parser.add_argument("--warmup", type=float, default=10.0, help="minutes before the reference sample")
    parser.add_argument("--debug-heap", action="store_true", help="start the server with --debug-heap")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the server's environment")
    parser.add_argument("server_args", nargs="*", help="more server flags (after --)")
    args = parser.parse_args()
    path = ensure_default_model(default_cache_dir(os.environ))
    env = dict(item.split("=", 1) for item in args.env)
    extra = ["--kv-cache-memory", "1GiB", *(["--debug-heap", "true"] if args.debug_heap else []), *args.server_args]
    server = ServerProcess(path, *extra, env=env)
    tally = Tally()
    samples: list[Sample] = []
    try:
        server.wait_serving(timeout=600)
        start = time.monotonic()
        end = start + args.minutes * 60
        target = server.target
        clients = [
            threading.Thread(
                target=grpc_client if args.protocol == "grpc" else http_client,
                args=(target if args.protocol == "grpc" else server.http_port, end, seed, tally),
                daemon=True,
            )
            for seed in range(args.threads)
        ]
        for client in clients:
            client.start()
        while time.monotonic() < end:
            samples.append(sample(server, start, tally, args.debug_heap))
            s = samples[-1]
            print(
                f"{s.seconds:7.0f} s  rss {s.rss / 2**20:8.1f} MiB  fds {s.fds:4d}  threads {s.threads:4d}  "
                f"free blocks {s.free_blocks:5d}  requests {s.statuses:6d}",
                flush=True,
            )
            time.sleep(max(0.0, min(args.interval, end - time.monotonic())))
        for client in clients:
            client.join(timeout=180)
        time.sleep(2)
        samples.append(sample(server, start, tally, args.debug_heap))
        total = free_blocks(server)[1]
    finally:
        server.close()
    report(args, samples, tally, total)


def report(args: argparse.Namespace, samples: list[Sample], tally: Tally, total_blocks: int) -> None:
    print(f"\nsoak: {args.protocol}, {args.threads} threads, {args.minutes:g} min, env {args.env}, {args.server_args}")
    print("| time (s) | RSS (MiB) | front-end / core (MiB) | fds | threads | free blocks | requests |")
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    for s in samples:
        parts = " / ".join(f"{v / 2**20:.0f}" for v in s.rss_by_pid.values())
        row = [f"{s.seconds:.0f}", f"{s.rss / 2**20:.1f}", parts, s.fds, s.threads, s.free_blocks, s.statuses]
        print("| " + " | ".join(str(cell) for cell in row) + " |")
    print("statuses:", dict(tally.statuses))
    reference = next((s for s in samples if s.seconds >= args.warmup * 60), samples[0])
    last = samples[-1]
    growth = last.rss / reference.rss - 1
    peak = max(s.rss for s in samples)
    print(
        f"RSS at {reference.seconds:.0f} s: {reference.rss / 2**20:.1f} MiB; at the end: {last.rss / 2**20:.1f} MiB "
        f"({growth:+.1%}); peak {peak / 2**20:.1f} MiB"
    )
    if reference.heaps and last.heaps:
        print("\nheap diff, reference sample -> last sample:")
        print("\n".join(heap_diff(reference.heaps, last.heaps)))
    allowed = {"OK", "CANCELLED", "DEADLINE_EXCEEDED"}
    checks = {
        "RSS within 5% of the reference": abs(growth) <= 0.05,
        "fds flat": last.fds <= reference.fds + 2,
        "threads flat": last.threads <= reference.threads + 2,
        "KV pool full": last.free_blocks == total_blocks,
        "only OK / CANCELLED / DEADLINE_EXCEEDED": set(tally.statuses) <= allowed,
    }
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}: {name}")
    print("verdict:", "flat" if all(checks.values()) else "NOT flat")


if __name__ == "__main__":
    main()
