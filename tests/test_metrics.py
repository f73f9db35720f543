"""Metrics of a real server: exact counters after a known workload, promtool, the dashboard."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from mistralserve.v1 import generation_pb2 as pb

from tests.helm_chart import only, render_scenario
from tests.prometheus_text import Scrape, scrape
from tests.server_process import ServerProcess

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "helm" / "mistral-serve" / "dashboards" / "mistral-serve.json"
MOE_METRICS = {"mistralserve_moe_expert_tokens_total"}
PER_REQUEST_HISTOGRAMS = (
    "time_to_first_token_seconds",
    "e2e_request_latency_seconds",
    "request_queue_time_seconds",
    "request_prefill_time_seconds",
    "request_decode_time_seconds",
    "request_prompt_tokens",
    "request_generation_tokens",
)


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool is missing: `apt-get install prometheus` (.ci/run and `make test` do it)"
    return path


@pytest.fixture(scope="module")
def metrics_server(tiny_checkpoint: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(tiny_checkpoint, "--served-model-name", "tiny")
    try:
        server.wait_serving()
        yield server
    finally:
        server.close()


def ids(n: int, start: int = 10) -> pb.TokenIds:
    return pb.TokenIds(ids=list(range(start, start + n)))


def generate(server: ServerProcess, request: pb.GenerateRequest) -> pb.GenerateResponse:
    with server.channel() as channel:
        response: pb.GenerateResponse = server.stub(channel).Generate(request, timeout=60)
    return response


def settled(server: ServerProcess, requests: int, timeout: float = 20.0) -> Scrape:
    """Scrape until the finished-request records of ``requests`` requests are all counted."""
    deadline = time.monotonic() + timeout
    while True:
        result = scrape(server.metrics_url())
        done = result.value("mistralserve_e2e_request_latency_seconds_count")
        if done == requests or time.monotonic() > deadline:
            return result
        time.sleep(0.1)


def test_counters_and_histograms_after_a_known_workload(metrics_server: ServerProcess) -> None:
    greedy = pb.SamplingOptions(temperature=0.0)
    reference = generate(
        metrics_server,
        pb.GenerateRequest(
            prompt_token_ids=ids(4), sampling=greedy, stopping=pb.StoppingOptions(max_tokens=10, ignore_eos=True)
        ),
    )
    tokens = list(reference.completions[0].token_ids)
    stop_at = tokens.index(tokens[2]) + 1  # the first occurrence ends the stopped request
    workload = [
        pb.GenerateRequest(prompt_token_ids=ids(7), stopping=pb.StoppingOptions(max_tokens=5, ignore_eos=True)),
        pb.GenerateRequest(prompt_token_ids=ids(13), stopping=pb.StoppingOptions(max_tokens=9, ignore_eos=True)),
        pb.GenerateRequest(
            prompt_token_ids=ids(4),
            sampling=greedy,
            stopping=pb.StoppingOptions(max_tokens=10, ignore_eos=True, stop_token_ids=[tokens[2]]),
        ),
        pb.GenerateRequest(
            prompt_token_ids=ids(5),
            n=2,
            sampling=pb.SamplingOptions(seed=3),
            stopping=pb.StoppingOptions(max_tokens=3, ignore_eos=True),
        ),
    ]
    responses = [generate(metrics_server, request) for request in workload]
    assert [len(c.token_ids) for r in responses for c in r.completions] == [5, 9, stop_at, 3, 3]
    with metrics_server.channel() as channel, pytest.raises(grpc.RpcError):
        metrics_server.stub(channel).Generate(pb.GenerateRequest(prompt=""), timeout=10)

    result = settled(metrics_server, requests=5)
    assert result.value("mistralserve_prompt_tokens_total") == 4 + 7 + 13 + 4 + 5
    assert result.value("mistralserve_generation_tokens_total") == 10 + 5 + 9 + stop_at + 6
    assert result.value("mistralserve_request_success_total", finished_reason="length") == 5  # 4 requests, n=2
    assert result.value("mistralserve_request_success_total", finished_reason="stop") == 1
    assert result.value("mistralserve_request_success_total", finished_reason="abort") == 0
    assert result.value("mistralserve_request_success_total", finished_reason="error") == 0
    assert result.value("mistralserve_admission_rejections_total", reason="invalid_argument") == 1
    assert result.value("mistralserve_admission_rejections_total", reason="queue_full") == 0
    for name in PER_REQUEST_HISTOGRAMS:
        assert result.value(f"mistralserve_{name}_count") == 5, name
    # sample 0 of each request: gaps between its tokens
    assert result.value("mistralserve_inter_token_latency_seconds_count") == 9 + 4 + 8 + (stop_at - 1) + 2
    assert result.value("mistralserve_request_prompt_tokens_sum") == 33
    assert result.value("mistralserve_request_generation_tokens_sum") == 10 + 5 + 9 + stop_at + 6
    assert (
        result.value("mistralserve_iteration_tokens_count")
        == result.value("mistralserve_engine_step_duration_seconds_count")
        > 0
    )
    # every prompt token once, then each generated token but the last is fed back in
    assert (
        result.value("mistralserve_iteration_tokens_sum") == 33 + (10 - 1) + (5 - 1) + (9 - 1) + (stop_at - 1) + 2 * 2
    )
    assert result.value("mistralserve_num_requests_running") == 0
    assert result.value("mistralserve_num_requests_waiting") == 0
    assert result.value("mistralserve_kv_cache_usage_ratio") == 0
    assert result.value("mistralserve_kv_cache_free_blocks") == result.value("mistralserve_kv_cache_total_blocks") > 0
    assert result.value("mistralserve_prefix_cache_queries_total") == 33 + 0  # every prompt looked up once
    info = [labels for (name, labels), _ in result.samples.items() if name == "mistralserve_model_info"]
    assert dict(info[0])["model_name"] == "tiny" and dict(info[0])["attention_backend"] == "cpu"


def test_an_aborted_request_is_counted(metrics_server: ServerProcess) -> None:
    before = scrape(metrics_server.metrics_url()).value("mistralserve_request_success_total", finished_reason="abort")
    request = pb.GenerateStreamRequest(prompt="x", stopping=pb.StoppingOptions(max_tokens=400, ignore_eos=True))
    with metrics_server.channel() as channel:
        stream = metrics_server.stub(channel).GenerateStream(request)
        next(stream)
        stream.cancel()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        after = scrape(metrics_server.metrics_url())
        if after.value("mistralserve_request_success_total", finished_reason="abort") == before + 1:
            break
        time.sleep(0.1)
    assert after.value("mistralserve_request_success_total", finished_reason="abort") == before + 1
    assert after.value("mistralserve_num_requests_running") == 0


def test_promtool_accepts_the_exposition(metrics_server: ServerProcess) -> None:
    text = scrape(metrics_server.metrics_url()).text
    result = subprocess.run([promtool(), "check", "metrics"], input=text, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_preemptions_are_counted(tiny_checkpoint: Path) -> None:
    # float32 cache whatever the machine picks for auto: 160 KiB is then too small for 8 x (prompt + 60)
    server = ServerProcess(
        tiny_checkpoint, "--kv-cache-memory", "160KiB", "--block-size", "4", "--kv-cache-dtype", "float32"
    )
    try:
        server.wait_serving()
        with server.channel() as channel:
            stub = server.stub(channel)
            request = pb.GenerateStreamRequest(
                prompt="preempt me please", stopping=pb.StoppingOptions(max_tokens=60, ignore_eos=True)
            )
            calls = [stub.GenerateStream(request) for _ in range(8)]
            counts = [sum(len(r.token_ids) for r in call) for call in calls]
        assert counts == [60] * 8
        result = scrape(server.metrics_url())
        assert result.value("mistralserve_num_preemptions_total") > 0
        assert result.value("mistralserve_kv_cache_usage_ratio") == 0
    finally:
        server.close()


def dashboard_expressions() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [target["expr"] for panel in panels for target in panel["targets"]]


def test_dashboard_promql_parses(tmp_path: Path) -> None:
    expressions = dashboard_expressions()
    assert len(expressions) >= 10
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {
                        "record": f"dashboard:expr_{i}",
                        "expr": expr.replace("$__rate_interval", "5m").replace("$model_name", ".*"),
                    }
                    for i, expr in enumerate(expressions)
                ],
            }
        ]
    }
    path = tmp_path / "rules.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    result = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(expressions)} rules found" in result.stdout


def test_dashboard_uses_only_exported_metrics(metrics_server: ServerProcess) -> None:
    exported = scrape(metrics_server.metrics_url()).sample_names()
    referenced = {name for expr in dashboard_expressions() for name in re.findall(r"mistralserve_[a-z0-9_]+", expr)}
    referenced -= MOE_METRICS  # a dense model exports none: test_moe_server checks them on a Mixtral
    assert referenced and referenced <= exported, referenced - exported
    panels = {p["title"] for p in json.loads(DASHBOARD.read_text())["panels"]}
    for needed in (
        "Generation throughput",
        "Time to first token",
        "Inter-token latency",
        "Queue depth",
        "KV-cache usage",
        "Preemptions",
        "Error rate",
        "Resident memory",
    ):
        assert needed in panels


def alert_groups() -> list[dict[str, object]]:
    rule = only(render_scenario("monitoring"), "PrometheusRule")
    groups: list[dict[str, object]] = rule["spec"]["groups"]
    return groups


def alert_expressions() -> list[str]:
    return [str(rule["expr"]) for group in alert_groups() for rule in group["rules"]]  # type: ignore[attr-defined]


def test_chart_alert_rules_pass_promtool(tmp_path: Path) -> None:
    path = tmp_path / "alerts.yml"
    path.write_text(json.dumps({"groups": alert_groups()}))
    result = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 5 rules found" in result.stdout


def promtool_test_rules(tmp_path: Path, series: list[dict[str, str]], alerts: list[dict[str, Any]]) -> None:
    """``promtool test rules`` on the chart's alerts: ``series`` in (1-minute samples), ``alerts`` expected."""
    (tmp_path / "alerts.yml").write_text(json.dumps({"groups": alert_groups()}))
    tests = {
        "rule_files": ["alerts.yml"],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": series, "alert_rule_test": alerts}],
    }
    (tmp_path / "tests.yml").write_text(json.dumps(tests))
    result = subprocess.run([promtool(), "test", "rules", "tests.yml"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_chart_alerts_fire_on_the_conditions_they_name(tmp_path: Path) -> None:
    """``promtool test rules``: synthetic series in, exactly the expected alerts out."""
    target = 'namespace="llm", service="demo-mistral-serve", pod="p1", model_name="m"'
    promtool_test_rules(
        tmp_path,
        [
            {"series": f"mistralserve_kv_cache_usage_ratio{{{target}}}", "values": "0.99x40"},
            {
                "series": f'mistralserve_request_success_total{{{target}, finished_reason="stop"}}',
                "values": "0+10x40",
            },
            {
                "series": f'mistralserve_request_success_total{{{target}, finished_reason="error"}}',
                "values": "0+2x40",
            },
            {
                "series": f'mistralserve_admission_rejections_total{{{target}, reason="queue_full"}}',
                "values": "0+0x40",
            },
            {"series": f"mistralserve_num_requests_waiting{{{target}}}", "values": "0+1x40"},
        ],
        [
            {
                "eval_time": "20m",
                "alertname": "MistralServeKVCacheNearlyFull",
                "exp_alerts": [
                    {
                        "exp_labels": {"severity": "warning", "pod": "p1", "model_name": "m"},
                        "exp_annotations": {
                            "summary": "KV cache of p1 is 99% full",
                            "description": "A full KV cache preempts requests; "
                            "raise kvCacheMemory or lower maxNumSeqs.",
                        },
                    }
                ],
            },
            {
                "eval_time": "10m",
                "alertname": "MistralServeKVCacheNearlyFull",  # not yet: `for: 15m`
                "exp_alerts": [],
            },
            {
                "eval_time": "15m",
                "alertname": "MistralServeErrorRate",  # 2 errors in 12 finished: 17% > 5%
                "exp_alerts": [
                    {
                        "exp_labels": {"severity": "critical", "model_name": "m"},
                        "exp_annotations": {
                            "summary": "More than 5% of requests to m fail or are rejected",
                            "description": 'Check the server logs for "request finished" lines with '
                            'finish_reason error and for "request rejected" lines.',
                        },
                    }
                ],
            },
            {
                "eval_time": "30m",
                "alertname": "MistralServeQueueGrowing",  # 1 more waiting each minute, above 16
                "exp_alerts": [
                    {
                        "exp_labels": {"severity": "warning", "pod": "p1", "model_name": "m"},
                        "exp_annotations": {
                            "summary": "Waiting queue of p1 is above 16 and growing",
                            "description": "Requests arrive faster than the pod serves them; scale out.",
                        },
                    }
                ],
            },
            {"eval_time": "30m", "alertname": "MistralServeHighTimeToFirstToken", "exp_alerts": []},
        ],
    )


def test_memory_alert_fires_on_sustained_growth_only(tmp_path: Path) -> None:
    """Front-end + engine core memory 10% above its value 6 h earlier for 30 min: the grown pod only."""
    labels = 'namespace="llm", service="demo-mistral-serve", pod="{pod}"'
    grown, flat = labels.format(pod="grown"), labels.format(pod="flat")
    promtool_test_rules(
        tmp_path,
        [
            # 1 GB + 2 GB, growing 0.5 and 1 MB/min: at 9 h, 3.81 GB against 3.27 GB 6 h before
            {"series": f"process_resident_memory_bytes{{{grown}}}", "values": "1e9+5e5x600"},
            {
                "series": f'mistralserve_engine_core_resident_memory_bytes{{{grown}, model_name="m"}}',
                "values": "2e9+1e6x600",
            },
            {"series": f"process_resident_memory_bytes{{{flat}}}", "values": "1e9+0x600"},
            {
                "series": f'mistralserve_engine_core_resident_memory_bytes{{{flat}, model_name="m"}}',
                "values": "2e9+0x600",
            },
        ],
        [
            {"eval_time": "6h", "alertname": "MistralServeMemoryGrowing", "exp_alerts": []},
            {
                "eval_time": "9h",
                "alertname": "MistralServeMemoryGrowing",
                "exp_alerts": [
                    {
                        "exp_labels": {"severity": "warning", "pod": "grown"},
                        "exp_annotations": {
                            "summary": "Resident memory of grown is 116.5% of what it was 6h ago",
                            "description": "Front-end plus engine core memory keeps rising under load; "
                            "compare the server's heap lines (--debug-heap, SIGUSR1) over time and restart "
                            "the pod if it nears its limit.",
                        },
                    }
                ],
            },
        ],
    )


def test_chart_alerts_use_only_exported_metrics(metrics_server: ServerProcess) -> None:
    exported = scrape(metrics_server.metrics_url()).sample_names()
    referenced = {name for expr in alert_expressions() for name in re.findall(r"mistralserve_[a-z0-9_]+", expr)}
    assert len(referenced) >= 5 and referenced <= exported, referenced - exported
