"""GPU decode micro-benchmark: Mistral-7B-shaped random weights in bf16, paged runner.

Batch 1, 16 and 64 with a 512-token context, both attention backends: milliseconds per
decode step, and at batch 1 the share of HBM bandwidth used (bytes of weights and KV
read per step / step time / the device's peak). Run through ``bench/gpu_check.sh``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from model.batch import Batch, Chunk
from model.config import ModelConfig
from model.kv_cache import KVCacheSpec, PagedKVCache
from model.mistral import MistralModel
from model.runner import ModelRunner

MISTRAL_7B = ModelConfig(
    architecture="mistral", vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_layers=32,
    num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=1e6, rms_norm_eps=1e-5,
    max_position_embeddings=32768, sliding_window=None, tie_word_embeddings=False,
)  # fmt: skip
BLOCK = 16


def random_model(device: torch.device) -> MistralModel:
    model = MistralModel(MISTRAL_7B, torch.bfloat16, device)
    gen = torch.Generator(device=device).manual_seed(0)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.data.fill_(1.0)
        else:
            param.data.normal_(0.0, 0.02, generator=gen)
    return model


def decode_ms(model: MistralModel, backend: str, batch: int, context: int, steps: int) -> float:
    per_seq = -(-(context + steps + 8) // BLOCK)
    cache = PagedKVCache(KVCacheSpec.for_model(MISTRAL_7B, torch.bfloat16, BLOCK), batch * per_seq + 1, model.device)
    runner = ModelRunner(model, cache, backend)
    tables = [list(range(1 + i * per_seq, 1 + (i + 1) * per_seq)) for i in range(batch)]
    runner.execute(Batch([Chunk(list(range(context)), 0, t) for t in tables]))
    times = []
    for step in range(steps + 3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        runner.execute(Batch([Chunk([7], context + step, t) for t in tables]))
        torch.cuda.synchronize()
        if step >= 3:
            times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--hbm-tb-per-s", type=float, default=4.8, help="peak HBM bandwidth (H200: 4.8 TB/s)")
    args = parser.parse_args()
    device = torch.device("cuda")
    model = random_model(device)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_per_token = KVCacheSpec.for_model(MISTRAL_7B, torch.bfloat16, BLOCK).bytes_per_token
    print(f"{torch.cuda.get_device_name()}: Mistral-7B shape, bf16, {weight_bytes / 1e9:.1f} GB of weights")
    print("| backend | batch | ms/step | tokens/s | HBM share (batch 1) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for backend in ("torch", "xformers"):
        for batch in (1, 16, 64):
            ms = decode_ms(model, backend, batch, args.context, args.steps)
            share = ""
            if batch == 1:
                read = weight_bytes + kv_per_token * args.context
                share = f"{read / (ms / 1000) / (args.hbm_tb_per_s * 1e12):.0%}"
            print(f"| {backend} | {batch} | {ms:.2f} | {batch * 1000 / ms:.0f} | {share} |", flush=True)


if __name__ == "__main__":
    main()
