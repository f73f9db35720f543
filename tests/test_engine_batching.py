"""Continuous batching changes nothing: each request gives the tokens it gives alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.loader import load_model
from model.mistral import MistralModel
from scheduler.request import SamplingParams
from server.runtime import RuntimeOptions, build_runtime
from tests.engine_harness import make_engine, request, run, tiny_prompts
from tests.hf_reference import TinySpec, build_hf_model, save_hf_model

SPEC = TinySpec("engine", heads=8, kv_heads=2, window=None)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> MistralModel:
    return load_model(save_hf_model(build_hf_model(SPEC), tmp_path_factory.mktemp("tiny") / "m")).model


def workload(sampled: bool) -> list[tuple[str, list[int], SamplingParams]]:
    prompts = tiny_prompts(64, SPEC.vocab, seed=3)
    jobs = []
    for i, prompt in enumerate(prompts):
        params = SamplingParams(
            temperature=0.9 if sampled else 0.0, top_p=0.95 if sampled else 1.0, seed=100 + i if sampled else None,
            max_tokens=5 + (i * 7) % 26,
        )  # fmt: skip
        jobs.append((f"r{i}", prompt, params))
    return jobs


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
def test_64_concurrent_requests_equal_each_alone(tiny: MistralModel, sampled: bool) -> None:
    jobs = workload(sampled)
    together = run(make_engine(tiny, num_blocks=1400), [request(i, p, params) for i, p, params in jobs])
    for request_id, prompt, params in jobs:
        alone = run(make_engine(tiny, num_blocks=64), [request(request_id, prompt, params)])[request_id]
        got = together[request_id]
        assert got.tokens() == alone.tokens(), request_id
        assert len(got.tokens()) == params.max_tokens
        assert got.final().finish_reason == "length"


def test_batch_composition_does_not_change_seeded_samples(tiny: MistralModel) -> None:
    """The same seeded request inside two different crowds of unseeded requests."""
    target = request(
        "target", tiny_prompts(1, SPEC.vocab, seed=9)[0], SamplingParams(temperature=1.0, seed=7, max_tokens=20)
    )
    crowd_a = [
        request(f"a{i}", p, SamplingParams(temperature=1.0, max_tokens=9))
        for i, p in enumerate(tiny_prompts(5, SPEC.vocab, 1))
    ]
    crowd_b = [
        request(f"b{i}", p, SamplingParams(temperature=0.5, max_tokens=30))
        for i, p in enumerate(tiny_prompts(11, SPEC.vocab, 2))
    ]
    first = run(make_engine(tiny), [*crowd_a, target])["target"].tokens()
    second = run(make_engine(tiny), [target, *crowd_b])["target"].tokens()
    alone = run(make_engine(tiny), [target])["target"].tokens()
    assert first == second == alone
    assert len(set(first)) > 1


DEFAULT_PROMPTS = ["Once upon a time", "The capital of France is", "def fibonacci(n):", "Mistral AI is a company"]


@pytest.mark.parametrize("seeded", [False, True], ids=["greedy", "seeded"])
def test_default_model_batched_equals_alone(default_model_path: Path, seeded: bool) -> None:
    runtime = build_runtime(RuntimeOptions(default_model_path, kv_cache_memory=256 << 20))
    tokenizer = runtime.tokenizer

    def params(i: int) -> SamplingParams:
        return SamplingParams(
            temperature=0.8 if seeded else 0.0, seed=11 + i if seeded else None, max_tokens=12 + 3 * i
        )

    reqs = [runtime.request(f"p{i}", tokenizer.encode(p), params(i)) for i, p in enumerate(DEFAULT_PROMPTS)]
    together = run(runtime.engine, reqs)
    for i, prompt in enumerate(DEFAULT_PROMPTS):
        alone = run(runtime.engine, [runtime.request(f"alone{i}", tokenizer.encode(prompt), params(i))])[f"alone{i}"]
        assert together[f"p{i}"].tokens() == alone.tokens()
        assert together[f"p{i}"].text() == alone.text()
