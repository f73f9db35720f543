"""Mixture of experts: a Mixtral-shaped Q4_0 GGUF against a dense model with the same active parameters.

Mixtral 8x7B as Q4_0 is ~26 GB and cannot load on a 24 GiB machine, so the shape is scaled:
8 experts, top-2, hidden 2048, 16 layers, expert intermediate 7168 (Mixtral's 3.5x), 16 query /
4 KV heads of 128, vocabulary 32000: ~5.9 B parameters, ~3.3 GB as Q4_0 (experts in llama.cpp's
merged ``ffn_*_exps`` tensors). The dense twin has the same attention and one SwiGLU of
2 x 7168: the parameters one token of the MoE model uses. Weights are random (scales chosen to
keep activations finite); only the shapes and bytes matter here. Both files are written once to
``$MISTRALSERVE_CACHE_DIR/bench`` (~4.2 GB).

Reported, compiled CPU kernels, fp32 activations, weights kept Q4_0:

1. batch-1 decode ms/token (context ``--context``) of both, steps interleaved, and their ratio
   (the issue's bar: MoE <= 1.3x dense), with the bytes each step must read and the bound that
   gives at ``--bandwidth`` GB/s;
2. a ``--batch``-sequence decode step: how many times each expert's matrices ran per layer
   (counted on the packed objects) and its time against the dense model's.

    .venv/bin/python -m bench.moe [--context 128] [--steps 16] [--batch 64]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from bench.decode_bench import alternate_ms, paged_runner
from model.default_model import default_cache_dir
from model.loader import load_model

HIDDEN, LAYERS, EXPERTS, TOP_K, EXPERT_FFN = 2048, 16, 8, 2, 7168
HEADS, KV_HEADS, HEAD_DIM, VOCAB = 16, 4, 128, 32000
Q4_0 = gguf.GGMLQuantizationType.Q4_0


def q4_0(rng: np.random.Generator, *shape: int, scale: float) -> np.ndarray:
    """Random Q4_0 blocks for a (..., rows, cols) matrix: fp16 scale, then 16 bytes of nibbles.
    Nibbles uniform in 1..15 (weights ``scale * (q - 8)`` of mean 0: uniform 0..15 would give every
    weight a -scale/2 bias, every layer's output one shared direction, and every token the same
    experts)."""
    *lead, cols = shape
    blocks = np.empty((*lead, cols // 32, 18), dtype=np.uint8)
    nibbles = rng.integers(1, 16, (*lead, cols // 32, 16, 2), dtype=np.uint8)
    blocks[..., 2:] = nibbles[..., 0] | (nibbles[..., 1] << 4)
    blocks[..., :2] = np.frombuffer(np.float16(scale).tobytes(), np.uint8)
    return blocks.reshape(*lead, cols // 32 * 18)


def write_model(path: Path, experts: int) -> None:
    """``experts`` 0: the dense twin (one SwiGLU of TOP_K * EXPERT_FFN)."""
    rng = np.random.default_rng(0)
    ffn = EXPERT_FFN if experts else TOP_K * EXPERT_FFN
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(4096)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(1e6)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_vocab_size(VOCAB)
    if experts:
        writer.add_expert_count(experts)
        writer.add_expert_used_count(TOP_K)
    small = 0.02 / 8  # |w| <= ~0.02
    writer.add_tensor("token_embd.weight", q4_0(rng, VOCAB, HIDDEN, scale=small), raw_dtype=Q4_0)
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    writer.add_tensor("output.weight", q4_0(rng, VOCAB, HIDDEN, scale=small), raw_dtype=Q4_0)
    for i in range(LAYERS):
        blk = f"blk.{i}."
        writer.add_tensor(blk + "attn_norm.weight", np.ones(HIDDEN, np.float32))
        writer.add_tensor(blk + "ffn_norm.weight", np.ones(HIDDEN, np.float32))
        writer.add_tensor(blk + "attn_q.weight", q4_0(rng, HEADS * HEAD_DIM, HIDDEN, scale=small), raw_dtype=Q4_0)
        for kv in ("attn_k", "attn_v"):
            writer.add_tensor(blk + kv + ".weight", q4_0(rng, KV_HEADS * HEAD_DIM, HIDDEN, scale=small),
                              raw_dtype=Q4_0)  # fmt: skip
        writer.add_tensor(blk + "attn_output.weight", q4_0(rng, HIDDEN, HEADS * HEAD_DIM, scale=small),
                          raw_dtype=Q4_0)  # fmt: skip
        if experts:
            router = (rng.standard_normal((experts, HIDDEN)) * 0.5).astype(np.float32)
            writer.add_tensor(blk + "ffn_gate_inp.weight", router)
            for name, rows, cols in (("ffn_gate", ffn, HIDDEN), ("ffn_up", ffn, HIDDEN), ("ffn_down", HIDDEN, ffn)):
                writer.add_tensor(blk + name + "_exps.weight", q4_0(rng, experts, rows, cols, scale=small),
                                  raw_dtype=Q4_0)  # fmt: skip
        else:
            for name, rows, cols in (("ffn_gate", ffn, HIDDEN), ("ffn_up", ffn, HIDDEN), ("ffn_down", HIDDEN, ffn)):
                writer.add_tensor(blk + name + ".weight", q4_0(rng, rows, cols, scale=small), raw_dtype=Q4_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def ensure(path: Path, experts: int) -> Path:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        start = time.perf_counter()
        write_model(partial, experts)
        partial.rename(path)
        print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - start:.0f} s", flush=True)
    return path


class CountingLinear:
    """A packed linear layer that counts its calls (the kernels' objects cannot be patched)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls = 0
        self.nbytes = inner.nbytes

    def forward(self, *args: Any) -> None:
        self.calls += 1
        self.inner.forward(*args)


def bytes_per_token(decoder: Any, active_experts: int) -> int:
    """Weight bytes one decode token must read: attention, ``active_experts`` experts (or the dense
    SwiGLU), the output head."""
    total = decoder.head.nbytes
    for layer in decoder.layers:
        total += layer.qkv.nbytes + layer.o.nbytes
        if layer.experts is None:
            total += layer.gate_up.nbytes + layer.down.nbytes
        else:
            total += active_experts * (layer.experts.gate_up[0].nbytes + layer.experts.down[0].nbytes)
    return int(total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batch-context", type=int, default=16, help="prompt tokens per sequence of the batch")
    parser.add_argument("--bandwidth", type=float, default=34.0, help="GB/s the machine reads (for the bound)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    directory = default_cache_dir(os.environ) / "bench"
    moe_path = ensure(directory / f"mixtral-shape-{EXPERTS}x{HIDDEN}-{LAYERS}l-v2.Q4_0.gguf", EXPERTS)
    dense_path = ensure(directory / f"dense-active-{TOP_K * EXPERT_FFN}-{LAYERS}l-v2.Q4_0.gguf", 0)
    models = {}
    for name, path in (("moe", moe_path), ("dense", dense_path)):
        start = time.perf_counter()
        models[name] = load_model(path, quantization="auto").model
        print(f"loaded {name} in {time.perf_counter() - start:.0f} s: {models[name].config.num_experts} experts")

    # 1. batch 1
    steps: dict[str, Any] = {}
    decoders: dict[str, Any] = {}
    for name, model in models.items():
        runner, steps[name] = paged_runner(model, 1, args.context, args.steps)
        decoders[name] = runner.decoder
    moe_ms, dense_ms = alternate_ms(steps["moe"], steps["dense"], args.steps)
    moe_bytes, dense_bytes = bytes_per_token(decoders["moe"], TOP_K), bytes_per_token(decoders["dense"], 0)
    all_bytes = bytes_per_token(decoders["moe"], EXPERTS)
    print(f"\nbatch 1, context {args.context}, median of {args.steps} steps, {args.threads} threads")
    print(f"| model | weights (GB) | read per token (GB) | bound at {args.bandwidth:.0f} GB/s (ms) | ms/token |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, ms, read, held in (("MoE 8x top-2", moe_ms, moe_bytes, all_bytes), ("dense, same active", dense_ms,
                                 dense_bytes, dense_bytes)):  # fmt: skip
        print(f"| {name} | {held / 1e9:.2f} | {read / 1e9:.2f} | {read / 1e9 / args.bandwidth * 1e3:.1f} | {ms:.1f} |")
    print(f"MoE / dense: {moe_ms / dense_ms:.2f}x (bar: <= 1.3x)")

    # 2. a batch: each expert's matrices run once per step
    for name, model in models.items():
        runner, steps[name] = paged_runner(model, args.batch, args.batch_context, args.steps, distinct=True)
        decoders[name] = runner.decoder
    experts_layers = [layer.experts for layer in decoders["moe"].layers]
    for experts in experts_layers:
        experts.gate_up = [CountingLinear(p) for p in experts.gate_up]
        experts.down = [CountingLinear(p) for p in experts.down]
    before = [sum(experts.tokens) for experts in experts_layers]
    times: dict[str, list[float]] = {"moe": [], "dense": []}
    for _ in range(args.steps):
        for name in ("moe", "dense"):
            start = time.perf_counter()
            steps[name]()
            times[name].append(1000 * (time.perf_counter() - start))
    calls = [max(c.calls for c in e.gate_up + e.down) for e in experts_layers]
    used = [sum(1 for c in e.gate_up if c.calls) for e in experts_layers]
    routed = [sum(e.tokens) - b for e, b in zip(experts_layers, before, strict=True)]
    moe_step, dense_step = statistics.median(times["moe"]), statistics.median(times["dense"])
    print(f"\nbatch {args.batch}, context {args.batch_context}, {args.steps} steps")
    print(f"most calls of any expert matrix per step: {max(calls) / args.steps:.0f} (every layer, every expert)")
    print(f"experts used per layer over the run: min {min(used)}, max {max(used)} of {EXPERTS}")
    print(f"tokens routed per layer per step: {routed[0] / args.steps:.0f} = {args.batch} x top-{TOP_K}")
    print(f"ms/step: MoE {moe_step:.1f}, dense {dense_step:.1f} ({moe_step / dense_step:.2f}x); "
          f"MoE tokens/s {args.batch * 1000 / moe_step:.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
