"""A tiny Mixtral served end to end: a real ``mistral-serve serve`` process, concurrent gRPC
streams equal to transformers' greedy output, and the experts' token counters on /metrics."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from mistralserve.v1 import generation_pb2 as pb

from tests.hf_reference import TinySpec, build_hf_model, hf_greedy
from tests.prometheus_text import scrape
from tests.server_process import ServerProcess
from tests.test_metrics import MOE_METRICS, dashboard_expressions, promtool
from tests.tiny_checkpoint import write_tiny_checkpoint

SPEC = TinySpec("served_mixtral", heads=4, kv_heads=2, architecture="mixtral", experts=8, top_k=2, intermediate=96,
                theta=1e6)  # fmt: skip
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Any]]:
    directory = write_tiny_checkpoint(tmp_path_factory.mktemp("mixtral") / "model", spec=SPEC)
    server = ServerProcess(directory, "--served-model-name", "tiny-mixtral", "--dtype", "float32")
    try:
        server.wait_serving()
        yield server, build_hf_model(SPEC)
    finally:
        server.close()


def prompt_ids(i: int) -> list[int]:
    return [3 + (i * 7 + j * 13) % 120 for j in range(5 + 3 * i)]


def test_concurrent_streams_equal_transformers_and_experts_are_counted(mixtral: tuple[ServerProcess, Any]) -> None:
    server, hf = mixtral
    before = scrape(server.metrics_url())
    layers = [
        sum(before.value("mistralserve_moe_expert_tokens_total", layer=str(layer), expert=str(e)) for e in range(8))
        for layer in range(SPEC.layers)
    ]

    def generate(i: int) -> list[int]:
        request = pb.GenerateStreamRequest(
            prompt_token_ids=pb.TokenIds(ids=prompt_ids(i)),
            sampling=pb.SamplingOptions(temperature=0.0),
            stopping=pb.StoppingOptions(max_tokens=NEW_TOKENS, ignore_eos=True),
        )
        with server.channel() as channel:
            return [t for r in server.stub(channel).GenerateStream(request, timeout=120) for t in r.token_ids]

    with ThreadPoolExecutor(8) as pool:
        outputs = list(pool.map(generate, range(8)))
    for i, tokens in enumerate(outputs):
        assert tokens == hf_greedy(hf, prompt_ids(i), NEW_TOKENS), i
    after = scrape(server.metrics_url())
    computed = sum(len(prompt_ids(i)) + NEW_TOKENS - 1 for i in range(8))  # the last token is never fed back
    for layer in range(SPEC.layers):
        routed = sum(
            after.value("mistralserve_moe_expert_tokens_total", layer=str(layer), expert=str(e)) for e in range(8)
        )
        assert routed - layers[layer] == SPEC.top_k * computed  # every token to exactly top_k experts
    assert after.families["mistralserve_moe_expert_tokens"] == "counter"
    result = subprocess.run([promtool(), "check", "metrics"], input=after.text, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    # the dashboard's expert panel reads what this server exports
    referenced = {n for expr in dashboard_expressions() for n in re.findall(r"mistralserve_moe_[a-z0-9_]+", expr)}
    assert referenced == MOE_METRICS <= after.sample_names()


def test_model_info_reports_the_experts(mixtral: tuple[ServerProcess, Any], tmp_path: Path) -> None:
    server, _ = mixtral
    with server.channel() as channel:
        info = server.stub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert info.architecture == "mixtral"
    assert (info.num_experts, info.num_experts_per_token) == (8, 2)
