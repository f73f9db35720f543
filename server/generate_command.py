"""``mistral-serve generate``: load a checkpoint and stream one continuation to stdout.

Runs one sequence through the paged KV cache and the model runner (prefill, then one
token per step); the engine issue replaces this loop with the continuous-batching engine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from model.batch import Batch, Chunk
from model.generate import sample_token
from model.kv_cache import KVCacheSpec, PagedKVCache, cuda_kv_budget
from model.loader import load_model
from model.mistral import MistralModel
from model.runner import ModelRunner
from scheduler.block_manager import BlockManager
from server.tokenizer_loader import load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def build_cache(args: argparse.Namespace, model: MistralModel) -> PagedKVCache:
    """A budget from --kv-cache-memory; else 1 GiB on CPU, or what CUDA has left after a profiling pass."""
    kv_dtype = model.dtype if args.kv_cache_dtype == "auto" else DTYPES[args.kv_cache_dtype]
    spec = KVCacheSpec.for_model(model.config, kv_dtype, args.block_size)
    if args.kv_cache_memory is not None:
        budget = args.kv_cache_memory
    elif model.device.type == "cuda":
        budget = cuda_kv_budget(model, args.gpu_memory_utilization, profile_tokens=2048)
    else:
        budget = 1 << 30
    return PagedKVCache.from_budget(spec, budget, model.device)


def run_generate(args: argparse.Namespace, model_path: Path) -> int:
    device = pick_device(args.device)
    loaded = load_model(model_path, pick_dtype(args.dtype, device), device)
    tokenizer = load_tokenizer(model_path)
    if args.chat:
        prompt_ids = tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
    else:
        prompt_ids = tokenizer.encode(args.prompt)
    context = loaded.config.max_position_embeddings
    if not prompt_ids or len(prompt_ids) >= context:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens; it must have 1 to {context - 1}")
    cache = build_cache(args, loaded.model)
    runner = ModelRunner(loaded.model, cache, args.attention_backend)
    blocks = BlockManager(cache.usable_block_ids, cache.spec.block_size, loaded.config.sliding_window, False)
    generator = torch.Generator(device=device)
    if args.seed is None:
        generator.seed()
    else:
        generator.manual_seed(args.seed)

    stop_ids = tokenizer.special.eos_ids
    tokens = list(prompt_ids)
    computed = 0
    generated: list[int] = []
    printed = ""
    for _ in range(min(args.max_tokens, context - len(prompt_ids))):
        new = tokens[computed:]
        if not blocks.allocate_slots("generate", len(new)):
            raise ValueError(f"the KV cache holds {cache.token_capacity} tokens: raise --kv-cache-memory")
        table, first = blocks.block_table("generate")
        logits = runner.execute(Batch([Chunk(new, computed, list(table), first)]))
        computed = len(tokens)
        blocks.commit("generate", tokens, computed)
        token = sample_token(logits[0], args.temperature, generator)
        if token in stop_ids:
            break
        tokens.append(token)
        generated.append(token)
        text = tokenizer.decode(generated)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(printed) :])
            sys.stdout.flush()
            printed = text
    sys.stdout.write(tokenizer.decode(generated)[len(printed) :] + "\n")
    return 0
