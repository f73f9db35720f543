"""Stopping rules, logprobs, failed steps, a dead engine thread, the queue bound."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch

from model.loader import load_model
from model.mistral import MistralModel
from scheduler.output_stream import SyncOutputStream
from scheduler.request import EngineDeadError, QueueFullError, SamplingParams
from tests.engine_harness import make_engine, request, run, tiny_prompts
from tests.hf_reference import TinySpec, build_hf_model, hf_logits, save_hf_model

SPEC = TinySpec("stop", heads=4, kv_heads=1, window=6)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, MistralModel]:
    hf = build_hf_model(SPEC)
    return hf, load_model(save_hf_model(hf, tmp_path_factory.mktemp("tiny") / "m")).model


@pytest.fixture(scope="module")
def reference(pair: tuple[Any, MistralModel]) -> tuple[list[int], list[int]]:
    """A prompt and its 20-token greedy continuation."""
    prompt = tiny_prompts(1, SPEC.vocab, seed=21, lengths=(12, 13))[0]
    tokens = run(make_engine(pair[1]), [request("ref", prompt, SamplingParams(temperature=0, max_tokens=20))])[
        "ref"
    ].tokens()
    assert len(set(tokens[:8])) >= 4
    return prompt, tokens


def test_eos_stops_and_is_the_last_token(
    pair: tuple[Any, MistralModel], reference: tuple[list[int], list[int]]
) -> None:
    prompt, tokens = reference
    eos = tokens[5]
    first = tokens.index(eos)
    result = run(
        make_engine(pair[1]), [request("r", prompt, SamplingParams(temperature=0, max_tokens=20), eos=(eos,))]
    )["r"]
    assert result.tokens() == tokens[: first + 1]
    assert (result.final().finish_reason, result.final().stop_reason) == ("stop", None)
    usage = result.final().usage
    assert usage is not None and usage.completion_tokens == first + 1


def test_ignore_eos_and_min_tokens(pair: tuple[Any, MistralModel], reference: tuple[list[int], list[int]]) -> None:
    prompt, tokens = reference
    eos = tokens[1]
    ignored = run(
        make_engine(pair[1]),
        [request("r", prompt, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), eos=(eos,))],
    )
    assert ignored["r"].tokens() == tokens and ignored["r"].final().finish_reason == "length"
    held = run(
        make_engine(pair[1]),
        [request("r", prompt, SamplingParams(temperature=0, max_tokens=20, min_tokens=6), eos=(eos,))],
    )
    out = held["r"].tokens()
    assert eos not in out[:6]  # banned from sampling until six tokens exist
    stopped = held["r"].final().finish_reason == "stop"
    assert stopped == (out[-1] == eos) and (len(out) >= 7 if stopped else len(out) == 20)


def test_stop_token_id_is_reported(pair: tuple[Any, MistralModel], reference: tuple[list[int], list[int]]) -> None:
    prompt, tokens = reference
    stop = tokens[3]
    result = run(
        make_engine(pair[1]),
        [request("r", prompt, SamplingParams(temperature=0, max_tokens=20, stop_token_ids=(stop,)))],
    )
    assert result["r"].tokens() == tokens[: tokens.index(stop) + 1]
    assert (result["r"].final().finish_reason, result["r"].final().stop_reason) == ("stop", stop)


def test_default_max_tokens_is_the_rest_of_the_context(pair: tuple[Any, MistralModel]) -> None:
    engine = make_engine(pair[1], num_blocks=200)
    prompt = tiny_prompts(1, SPEC.vocab, seed=2, lengths=(500, 501))[0]
    result = run(engine, [request("r", prompt, SamplingParams(temperature=0))])["r"]
    assert len(result.tokens()) == engine.max_model_len - 500 == 12
    assert result.final().finish_reason == "length"


def test_logprobs_and_prompt_logprobs_equal_hf(
    pair: tuple[Any, MistralModel], reference: tuple[list[int], list[int]]
) -> None:
    hf, model = pair
    prompt, tokens = reference
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=3, prompt_logprobs=2)
    result = run(make_engine(model), [request("r", prompt, params)])["r"]
    full = torch.log_softmax(hf_logits(hf, prompt + tokens[:8]), dim=-1)
    prompt_lps = result.outputs[0][0].prompt_logprobs
    assert len(prompt_lps) == len(prompt) and prompt_lps[0] is None
    for i in range(1, len(prompt)):
        entry = prompt_lps[i]
        assert entry is not None and entry.chosen.token_id == prompt[i]
        assert abs(entry.chosen.logprob - full[i - 1, prompt[i]].item()) < 1e-4
        assert [lp.token_id for lp in entry.top] == full[i - 1].topk(2).indices.tolist()
    for step, output in enumerate(result.outputs[0]):
        (entry,) = output.logprobs
        position = len(prompt) - 1 + step
        assert entry.chosen.token_id == tokens[step] and entry.chosen.rank == 1  # greedy: the most likely
        assert abs(entry.chosen.logprob - full[position, tokens[step]].item()) < 1e-4
        assert [lp.token_id for lp in entry.top] == full[position].topk(3).indices.tolist()
        assert [lp.rank for lp in entry.top] == [1, 2, 3]


class Exploding:
    def __init__(self, runner: Any, error: BaseException, times: int) -> None:
        self.runner, self.error, self.times = runner, error, times

    def __getattr__(self, name: str) -> Any:
        return getattr(self.runner, name)

    def execute(self, batch: Any) -> torch.Tensor:
        if self.times:
            self.times -= 1
            raise self.error
        return self.runner.execute(batch)  # type: ignore[no-any-return]


def test_failed_step_fails_its_requests_and_the_engine_keeps_serving(pair: tuple[Any, MistralModel]) -> None:
    engine = make_engine(pair[1])
    engine.runner = Exploding(engine.runner, RuntimeError("boom"), times=1)  # type: ignore[assignment]
    first = run(engine, [request("a", [5, 6, 7], SamplingParams(temperature=0, max_tokens=4))])["a"]
    assert first.final().finish_reason == "error" and first.final().error == "RuntimeError: boom"
    second = run(engine, [request("b", [5, 6, 7], SamplingParams(temperature=0, max_tokens=4))])["b"]
    assert second.final().finish_reason == "length" and len(second.tokens()) == 4
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    assert engine.counters.finished["error"] == 1


def test_dead_engine_thread_is_detected(pair: tuple[Any, MistralModel]) -> None:
    engine = make_engine(pair[1])
    engine.runner = Exploding(engine.runner, SystemExit("fatal"), times=1)  # type: ignore[assignment]
    engine.start()
    assert engine.alive
    stream = SyncOutputStream(1)
    engine.submit(request("a", [5, 6, 7], SamplingParams(temperature=0, max_tokens=4)), stream)
    final = list(stream)[-1]
    assert final.finish_reason == "error"
    deadline = time.monotonic() + 5
    while engine.alive and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not engine.alive
    with pytest.raises(EngineDeadError):
        engine.submit(request("b", [5], SamplingParams(max_tokens=2)), SyncOutputStream(1))


def test_full_queue_rejects_at_once(pair: tuple[Any, MistralModel]) -> None:
    engine = make_engine(pair[1], max_queued_requests=2)
    for name in ("a", "b"):
        engine.submit(request(name, [5, 6], SamplingParams(max_tokens=2)), SyncOutputStream(1))
    with pytest.raises(QueueFullError, match=r"the waiting queue is full \(2 requests\)"):
        engine.submit(request("c", [5, 6], SamplingParams(max_tokens=2)), SyncOutputStream(1))
    assert engine.counters.rejected_queue_full == 1
    engine.run_until_idle()
    engine.submit(request("d", [5, 6], SamplingParams(max_tokens=2)), SyncOutputStream(1))  # room again


@pytest.mark.parametrize(
    ("prompt", "params", "message"),
    [
        ([], SamplingParams(), "prompt is empty"),
        ([5, 999], SamplingParams(), "prompt_token_ids: 999 is outside the vocabulary [0, 128)"),
        ([5] * 512, SamplingParams(), "prompt has 512 tokens; the context allows at most 511"),
        ([5] * 500, SamplingParams(max_tokens=13), "max_tokens must be <= 12"),
    ],
)
def test_requests_the_engine_cannot_serve_are_refused(
    pair: tuple[Any, MistralModel], prompt: list[int], params: SamplingParams, message: str
) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        make_engine(pair[1], num_blocks=200).submit(request("x", prompt, params), SyncOutputStream(1))
