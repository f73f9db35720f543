"""Prometheus metrics: the only module importing prometheus_client.

Names are ``mistralserve_`` + vLLM's where vLLM has the metric, so vLLM dashboards port with
a prefix change; every series carries ``model_name``. Nothing here runs on the forward
pass: gauges and counters are read from ``engine.stats()`` at scrape time; histograms are
fed from the finished-request and step records the engine queues, drained at each scrape
and every second. What the warm-up generation did is subtracted (``baseline``).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Histogram,
    Info,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from scheduler.engine import EngineStats, StepRecord
from scheduler.request import ConstraintKind, FinishedRequest, FinishReason
from server.heap_debug import resident_bytes

PREFIX = "mistralserve_"
# vLLM's bucket boundaries
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)  # fmt: skip
REQUEST_TIME_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                        240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
STEP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
GRAMMAR_COMPILE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
REJECTION_REASONS = ("queue_full", "invalid_argument", "unavailable")


def one_two_five_buckets(limit: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to ``limit`` (vLLM's token-count buckets)."""
    buckets: list[int] = []
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > limit:
                return tuple(buckets)
            buckets.append(value)
        exponent += 1


class EngineView(Protocol):
    """What the metrics read of an engine (the in-process ``Engine`` or the core's ``EngineClient``)."""

    finished_requests: deque[FinishedRequest]
    recent_steps: deque[StepRecord]

    def stats(self) -> EngineStats: ...


@dataclass(frozen=True)
class _Baseline:
    """Counter values at attach time (the warm-up's share)."""

    prompt_tokens: int
    generation_tokens: int
    finished: dict[str, int]
    preemptions: int
    prefix_queried_tokens: int
    prefix_hit_tokens: int
    window_released_blocks: int
    expert_tokens: tuple[tuple[int, ...], ...]
    structured_refused_tokens: int

    @classmethod
    def of(cls, stats: EngineStats) -> _Baseline:
        return cls(
            stats.counters.prompt_tokens,
            stats.counters.generation_tokens,
            dict(stats.counters.finished),
            stats.preemptions,
            stats.prefix_queried_tokens,
            stats.prefix_hit_tokens,
            stats.window_released_blocks,
            stats.expert_tokens,
            stats.counters.structured_refused_tokens,
        )


class _EngineCollector(Collector):
    """Gauges and counters read from the engine at scrape time; drains records first."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        metrics = self.metrics
        metrics.drain()
        engine = metrics.engine
        if engine is None:
            return
        stats, base, label = engine.stats(), metrics.baseline, [metrics.model_name]

        def gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(PREFIX + name, documentation, labels=["model_name"])
            family.add_metric(label, value)
            return family

        def counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(PREFIX + name, documentation, labels=["model_name"])
            family.add_metric(label, value)
            return family

        assert base is not None
        yield gauge("num_requests_running", "Requests in the running batch.", stats.running)
        yield gauge("num_requests_waiting", "Requests waiting to be scheduled.", stats.waiting)
        yield gauge("kv_cache_usage_ratio", "Share of KV-cache blocks in use (0 to 1).", stats.kv_usage)
        yield gauge("kv_cache_total_blocks", "KV-cache blocks the block manager hands out.", stats.kv_blocks_total)
        yield gauge("kv_cache_free_blocks", "KV-cache blocks free (cached ones included).", stats.kv_blocks_free)
        counters = stats.counters
        yield counter("prompt_tokens", "Prompt tokens of requests that produced a first token.",
                      counters.prompt_tokens - base.prompt_tokens)  # fmt: skip
        yield counter("generation_tokens", "Generated tokens.", counters.generation_tokens - base.generation_tokens)
        success = CounterMetricFamily(
            PREFIX + "request_success", "Finished samples by finish reason.", labels=["model_name", "finished_reason"]
        )
        for reason in FinishReason:
            value = counters.finished[reason.value] - base.finished.get(reason.value, 0)
            success.add_metric([metrics.model_name, reason.value], value)
        yield success
        yield counter(
            "num_preemptions", "Sequences preempted (recomputed later).", stats.preemptions - base.preemptions
        )
        yield counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      stats.prefix_queried_tokens - base.prefix_queried_tokens)  # fmt: skip
        yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                      stats.prefix_hit_tokens - base.prefix_hit_tokens)  # fmt: skip
        yield counter("structured_output_refused_tokens",
                      "Tokens a structured-output matcher refused after its own mask allowed them, and masks that "
                      "allowed nothing (each ends its sample with finish reason error; should stay 0).",
                      counters.structured_refused_tokens - base.structured_refused_tokens)  # fmt: skip
        yield counter("sliding_window_released_blocks", "KV blocks released behind a sliding window.",
                      stats.window_released_blocks - base.window_released_blocks)  # fmt: skip
        if stats.expert_tokens:
            experts = CounterMetricFamily(
                PREFIX + "moe_expert_tokens",
                "Tokens the router sent to each expert of each mixture-of-experts layer.",
                labels=["model_name", "layer", "expert"],
            )
            for layer, counts in enumerate(stats.expert_tokens):
                for expert, count in enumerate(counts):
                    warmup = base.expert_tokens[layer][expert] if base.expert_tokens else 0
                    experts.add_metric([metrics.model_name, str(layer), str(expert)], count - warmup)
            yield experts
        process = getattr(engine, "process", None)  # the engine core's process (not the in-process engine)
        if process is not None and process.pid is not None:
            yield gauge(
                "engine_core_resident_memory_bytes",
                "Resident memory of the engine core process (process_resident_memory_bytes is the front-end's).",
                resident_bytes(process.pid),
            )


class ServerMetrics:
    def __init__(self, model_name: str, max_model_len: int) -> None:
        self.model_name = model_name
        self.engine: EngineView | None = None
        self.baseline: _Baseline | None = None
        self._lock = threading.Lock()
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(self))  # first: it drains before the histograms are read
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            self.registry.register(collector)
        r, labels = self.registry, ["model_name"]

        def histogram(name: str, documentation: str, buckets: tuple[float, ...]) -> Any:
            return Histogram(PREFIX + name, documentation, labels, buckets=buckets, registry=r).labels(model_name)

        self.ttft = histogram("time_to_first_token_seconds", "From arrival to the first token.", TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Between two tokens of a sample.", ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "From arrival to the last token.", REQUEST_TIME_BUCKETS)
        self.queue = histogram("request_queue_time_seconds", "From arrival to first scheduled.", REQUEST_TIME_BUCKETS)
        self.prefill = histogram("request_prefill_time_seconds", "From first scheduled to the first token.",
                                 REQUEST_TIME_BUCKETS)  # fmt: skip
        self.decode = histogram(
            "request_decode_time_seconds", "From the first token to the last.", REQUEST_TIME_BUCKETS
        )
        self.per_token = histogram("request_time_per_output_token_seconds", "Decode time per generated token.",
                                   ITL_BUCKETS)  # fmt: skip
        token_buckets = one_two_five_buckets(max_model_len)
        self.prompt_tokens = histogram("request_prompt_tokens", "Prompt tokens per request.", token_buckets)
        self.generation_tokens = histogram("request_generation_tokens", "Generated tokens per request.", token_buckets)
        self.iteration_tokens = histogram(
            "iteration_tokens", "Tokens computed per engine step.", ITERATION_TOKEN_BUCKETS
        )
        self.step_duration = histogram("engine_step_duration_seconds", "Duration of an engine step.", STEP_BUCKETS)
        self.rejections = Counter(
            PREFIX + "admission_rejections", "Requests refused before reaching the engine.", ["model_name", "reason"],
            registry=r,
        )  # fmt: skip
        for reason in REJECTION_REASONS:
            self.rejections.labels(model_name, reason)
        self.structured = Counter(
            PREFIX + "structured_output_requests", "Finished requests with a structured-output constraint, by kind.",
            ["model_name", "kind"], registry=r,
        )  # fmt: skip
        for kind in ConstraintKind:
            self.structured.labels(model_name, kind.value)
        self.grammar_compile = histogram(
            "grammar_compile_seconds", "Building a constraint's matcher (cache misses).", GRAMMAR_COMPILE_BUCKETS
        )
        self.grammar_cache_hits = Counter(
            PREFIX + "grammar_cache_hits", "Constrained requests whose matcher came from the cache.", labels,
            registry=r,
        ).labels(model_name)  # fmt: skip
        self.tool_call_parse_failures = Counter(
            PREFIX + "tool_call_parse_failures", "Tool-call blocks that did not parse (sent back as content).",
            labels, registry=r,
        ).labels(model_name)  # fmt: skip
        self.info = Info(PREFIX + "model", "The served model and how it runs.", registry=r)

    def attach(self, engine: EngineView, info: dict[str, str]) -> None:
        """Start counting from now: earlier records (the warm-up) are dropped, counters offset."""
        engine.finished_requests.clear()
        engine.recent_steps.clear()
        self.baseline = _Baseline.of(engine.stats())
        self.engine = engine
        self.info.info({"model_name": self.model_name, **info})

    def reject(self, reason: str) -> None:
        self.rejections.labels(self.model_name, reason).inc()

    def drain(self) -> None:
        """Move the engine's queued records into the histograms (scrape thread or event loop)."""
        engine = self.engine
        if engine is None:
            return
        with self._lock:
            while engine.finished_requests:
                done = engine.finished_requests.popleft()
                t = done.timings
                self.e2e.observe(t.finished - t.arrival)
                self.prompt_tokens.observe(done.prompt_tokens)
                self.generation_tokens.observe(done.generation_tokens)
                if t.first_scheduled is not None:
                    self.queue.observe(t.first_scheduled - t.arrival)
                if t.first_token is not None and t.first_scheduled is not None:
                    self.ttft.observe(t.first_token - t.arrival)
                    self.prefill.observe(t.first_token - t.first_scheduled)
                    self.decode.observe(t.finished - t.first_token)
                    if len(t.token_times) > 1:
                        self.per_token.observe((t.token_times[-1] - t.token_times[0]) / (len(t.token_times) - 1))
                for previous, current in zip(t.token_times, t.token_times[1:], strict=False):
                    self.itl.observe(current - previous)
                if done.constraint is not None:
                    self.structured.labels(self.model_name, done.constraint.value).inc()
                    if done.grammar_compile_seconds is None:
                        self.grammar_cache_hits.inc()
                    else:
                        self.grammar_compile.observe(done.grammar_compile_seconds)
            while engine.recent_steps:
                step = engine.recent_steps.popleft()
                self.iteration_tokens.observe(step.num_tokens)
                self.step_duration.observe(step.duration)

    def serve(self, host: str, port: int) -> int:
        """Expose ``/metrics`` over HTTP; returns the bound port."""
        server, _ = start_http_server(port, host, self.registry)
        return int(server.server_port)
