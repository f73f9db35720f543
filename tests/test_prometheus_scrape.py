"""A real Prometheus (Debian's `prometheus` package) scrapes a running mistral-serve."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from mistralserve.v1 import generation_pb2 as pb

from tests.server_process import ServerProcess


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def query(port: int, expr: str) -> list[dict[str, object]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.loads(response.read())
    assert body["status"] == "success"
    return body["data"]["result"]  # type: ignore[no-any-return]


@pytest.mark.slow
def test_prometheus_scrapes_generation_tokens(server: ServerProcess, tmp_path: Path) -> None:
    binary = shutil.which("prometheus")
    assert binary, "prometheus is missing: `apt-get install prometheus` (.ci/run and `make test` do it)"
    target = server.metrics_url().removeprefix("http://").removesuffix("/metrics")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: mistral-serve\n"
        f"    static_configs: [{{targets: ['{target}']}}]\n"
    )
    port = free_port()
    prometheus = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        with server.channel() as channel:
            request = pb.GenerateRequest(prompt="scrape me", stopping=pb.StoppingOptions(max_tokens=8, ignore_eos=True))
            server.stub(channel).Generate(request, timeout=60)
        deadline = time.monotonic() + 90
        value = 0.0
        while time.monotonic() < deadline and value <= 0:
            try:
                result = query(port, 'mistralserve_generation_tokens_total{job="mistral-serve"}')
                value = float(result[0]["value"][1]) if result else 0.0  # type: ignore[index]
            except OSError:
                pass  # not listening yet
            time.sleep(0.5)
        assert value > 0
        up = query(port, 'up{job="mistral-serve"}')
        assert up and up[0]["value"][1] == "1"  # type: ignore[index]
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=30)
