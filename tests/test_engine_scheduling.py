"""Preemption by recompute, chunked prefill, priorities, aborts, parallel samples."""

from __future__ import annotations

import pytest

from model.loader import load_model
from model.mistral import MistralModel
from scheduler.output_stream import SyncOutputStream
from scheduler.request import SamplingParams
from tests.engine_harness import make_engine, record_steps, request, run, tiny_prompts
from tests.hf_reference import TinySpec, save_hf_model

SPEC = TinySpec("sched", heads=4, kv_heads=2, window=None)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> MistralModel:
    spec = TinySpec("long", heads=4, kv_heads=2, window=None)
    config = spec.hf_config()
    config.max_position_embeddings = 4096
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    return load_model(save_hf_model(hf, tmp_path_factory.mktemp("tiny") / "m")).model


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens)


def test_preemption_recomputes_and_changes_nothing(tiny: MistralModel) -> None:
    prompts = tiny_prompts(8, SPEC.vocab, seed=5, lengths=(10, 20))
    reqs = [request(f"r{i}", p, greedy(24)) for i, p in enumerate(prompts)]
    roomy = run(make_engine(tiny, num_blocks=200), reqs)
    small = make_engine(tiny, num_blocks=25, block_size=4)  # ~96 tokens for 8 x ~40
    assert small.max_model_len >= 44
    tight = run(small, [request(f"r{i}", p, greedy(24)) for i, p in enumerate(prompts)])
    assert small.stats().preemptions > 0
    for i in range(len(prompts)):
        assert tight[f"r{i}"].tokens() == roomy[f"r{i}"].tokens()
        assert tight[f"r{i}"].final().finish_reason == "length"
    assert small.blocks.num_free_blocks == small.blocks.num_blocks


def test_preemption_victim_is_lowest_priority_then_latest(tiny: MistralModel) -> None:
    engine = make_engine(tiny, num_blocks=13, block_size=4)  # 48 tokens
    steps = record_steps(engine)
    prompts = tiny_prompts(3, SPEC.vocab, seed=8, lengths=(8, 9))
    reqs = [
        request("important", prompts[0], greedy(12), priority=0),
        request("unimportant", prompts[1], greedy(12), priority=5),
        request("late", prompts[2], greedy(12), priority=0),
    ]
    run(engine, reqs)
    preempted = [seq for record in steps for seq in record.preempted]
    assert preempted and preempted[0] == "unimportant"


def test_chunked_prefill_keeps_others_decoding(tiny: MistralModel) -> None:
    engine = make_engine(tiny, num_blocks=700, block_size=16, max_num_batched_tokens=256)
    steps = record_steps(engine)
    decoders = [request(f"d{i}", p, greedy(40)) for i, p in enumerate(tiny_prompts(3, SPEC.vocab, seed=2))]
    long_prompt = tiny_prompts(1, SPEC.vocab, seed=4, lengths=(2000, 2001))[0]
    for req in decoders:  # start the decoders first
        engine.submit(req, _sink())
    engine.step()
    engine.submit(request("long", long_prompt, greedy(4)), _sink())
    engine.run_until_idle()
    prefill_steps = [dict(r.scheduled) for r in steps if "long" in dict(r.scheduled) and dict(r.scheduled)["long"] > 1]
    assert len(prefill_steps) >= 8
    assert sum(s["long"] for s in prefill_steps) == 2000
    for scheduled in prefill_steps:
        assert all(scheduled.get(f"d{i}") == 1 for i in range(3)), scheduled  # every decoder advanced one token
        assert sum(scheduled.values()) <= 256


def _sink() -> SyncOutputStream:
    return SyncOutputStream(1)


@pytest.mark.parametrize("when", ["waiting", "mid_prefill", "mid_decode"])
def test_abort_frees_everything_and_others_finish_unchanged(tiny: MistralModel, when: str) -> None:
    prompts = tiny_prompts(4, SPEC.vocab, seed=6, lengths=(30, 40))
    baseline = run(make_engine(tiny), [request(f"r{i}", p, greedy(10)) for i, p in enumerate(prompts[:3])])
    engine = make_engine(tiny, max_num_batched_tokens=16, max_num_seqs=3 if when == "waiting" else 4)
    free_at_start = engine.blocks.num_free_blocks
    streams = {}
    for i, p in enumerate(prompts):
        streams[f"r{i}"] = _sink()
        engine.submit(request(f"r{i}", p, greedy(10)), streams[f"r{i}"])
    victim = "r3"
    engine.step()  # 16 tokens: r0's first chunk; r3 waits (budget, or max_num_seqs for "waiting")
    if when == "mid_prefill":
        while engine.scheduler.running and not any(s.seq_id == victim for s in engine.scheduler.running):
            engine.step()
        assert any(s.seq_id == victim and s.num_computed_tokens < s.prompt_len for s in engine.scheduler.running)
    if when == "mid_decode":
        while not any(s.seq_id == victim and s.output_token_ids for s in engine.scheduler.running):
            engine.step()
    if when == "waiting":
        assert any(s.seq_id == victim for s in engine.scheduler.waiting)
    engine.abort(victim)
    engine.run_until_idle()
    outputs = {rid: list(stream) for rid, stream in streams.items()}
    assert outputs[victim][-1].finish_reason == "abort"
    for i in range(3):
        assert [t for o in outputs[f"r{i}"] for t in o.token_ids] == baseline[f"r{i}"].tokens()
    assert engine.blocks.num_free_blocks == free_at_start
    assert engine.stats().running == engine.stats().waiting == 0


def test_parallel_samples_share_the_prompt_and_match_separate_seeds(tiny: MistralModel) -> None:
    prompt = tiny_prompts(1, SPEC.vocab, seed=12, lengths=(30, 31))[0]
    engine = make_engine(tiny)
    params = SamplingParams(temperature=1.0, seed=40, n=4, max_tokens=15)
    together = run(engine, [request("n4", prompt, params)])["n4"]
    computed = engine.runner.num_computed_tokens
    assert computed == len(prompt) + 4 * 14  # the prompt once, then 14 decode steps per sample
    for i in range(4):
        alone = run(
            make_engine(tiny), [request("one", prompt, SamplingParams(temperature=1.0, seed=40 + i, max_tokens=15))]
        )
        assert together.tokens(i) == alone["one"].tokens()
    assert len({tuple(together.tokens(i)) for i in range(4)}) == 4
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_parallel_samples_count_against_max_num_seqs(tiny: MistralModel) -> None:
    """50 requests of n = 16 under max_num_seqs 64: a request's sample 0 holds a seat for each
    sample until they fork, so no step runs more than 64 sequences (before: 534), and all finish."""
    engine = make_engine(tiny, num_blocks=2000, max_num_seqs=64)
    prompts = tiny_prompts(50, SPEC.vocab, seed=21, lengths=(5, 30))
    most: list[int] = []
    engine.step_listeners.append(lambda record: most.append(len(engine.scheduler.running)))
    params = SamplingParams(temperature=1.0, seed=3, n=16, max_tokens=6)
    results = run(engine, [request(f"r{i}", p, params) for i, p in enumerate(prompts)])
    assert max(most) == 64
    assert all(result.final(i).finished for result in results.values() for i in range(16))
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    small = make_engine(tiny, max_num_seqs=8)  # a request that could never be admitted is refused
    with pytest.raises(ValueError, match=r"^n: must be <= 8 \(the server's --max-num-seqs\), got 9$"):
        small.submit(request("big", prompts[0], SamplingParams(n=9)), SyncOutputStream(9))
