"""Building the serving stack from options: model, tokenizer, KV cache, block manager, engine.

Shared by ``mistral-serve generate`` and the gRPC server, so both run the same engine.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from model.kernels import cpu_has_native_bf16, cpu_kernels
from model.kv_cache import KVCacheSpec, PagedKVCache, cuda_kv_budget
from model.loader import LoadedModel, load_model
from model.runner import ModelRunner, cache_layout, resolve_backend
from scheduler.block_manager import BlockManager
from scheduler.engine import Engine, EngineConfig
from scheduler.request import EngineRequest, SamplingParams
from scheduler.scheduler import SchedulerConfig
from scheduler.structured import GrammarCompiler
from server.detokenizer import IncrementalDetokenizer
from server.grammar_vocab import grammar_tokenizer
from server.tokenizer import Tokenizer
from server.tokenizer_loader import load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_KV_CACHE_DEFAULT = 1 << 30


@dataclass(frozen=True)
class RuntimeOptions:
    model: Path
    dtype: str = "auto"  # auto: bfloat16 on CUDA and on CPUs with native bf16, else float32
    device: str = "auto"
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes; None: 1 GiB on CPU, profiled on CUDA
    gpu_memory_utilization: float = 0.9
    kv_cache_dtype: str = "auto"
    attention_backend: str = "auto"
    quantization: str = "auto"  # auto: keep a GGUF file's quantized types (cpu backend)
    enable_prefix_caching: bool = True
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    max_queued_requests: int = 1024
    seed: int | None = None


@dataclass
class Runtime:
    loaded: LoadedModel
    tokenizer: Tokenizer
    cache: PagedKVCache
    blocks: BlockManager
    engine: Engine

    @property
    def dtype_name(self) -> str:
        """The weights' dtype as users write it: ``float32``."""
        return str(self.loaded.model.dtype).removeprefix("torch.")

    @property
    def weight_types(self) -> str:
        """How the weights are held, e.g. ``Q4_1:210,bfloat16:61,Q8_0:1``."""
        return self.loaded.weight_types_text

    @property
    def kv_dtype_name(self) -> str:
        return str(self.cache.spec.dtype).removeprefix("torch.")

    @property
    def device_name(self) -> str:
        return str(self.loaded.model.device)

    def request(
        self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams, priority: int = 0
    ) -> EngineRequest:
        """An engine request whose text is detokenized incrementally by this model's tokenizer."""
        stream = IncrementalDetokenizer(
            self.tokenizer, prompt_ids, params.stop, params.include_stop_str_in_output, params.kept_special_ids
        )
        return EngineRequest(request_id, list(prompt_ids), params, stream, self.tokenizer.special.eos_ids, priority)


def runtime_options(args: argparse.Namespace, model_path: Path) -> RuntimeOptions:
    """From the parsed ``RUNTIME_FLAGS`` of ``server.options``."""
    return RuntimeOptions(
        model=model_path,
        dtype=args.dtype,
        device=args.device,
        block_size=args.block_size,
        kv_cache_memory=args.kv_cache_memory,
        gpu_memory_utilization=args.gpu_memory_utilization,
        kv_cache_dtype=args.kv_cache_dtype,
        attention_backend=args.attention_backend,
        quantization=args.quantization,
        enable_prefix_caching=args.enable_prefix_caching,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs,
        max_queued_requests=args.max_queued_requests,
    )


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on CUDA, and on CPUs that multiply it natively (AVX512-BF16, AMX) where
    the compiled kernels build; float32 on other CPUs (AVX2 only: bf16 there is emulated, ~100x slower)."""
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_native_bf16() and cpu_kernels() is not None else torch.float32


def resolve_quantization(name: str, backend: str) -> str:
    """``auto`` keeps quantized types only where the cpu backend runs (else dequantizes);
    an explicit scheme needs the cpu backend."""
    if name == "auto":
        return "auto" if backend == "cpu" else "none"
    if name != "none" and backend != "cpu":
        raise ValueError(f"--quantization {name} needs the cpu backend (CPU device, compiled kernels), not {backend!r}")
    return name


def build_runtime(options: RuntimeOptions) -> Runtime:
    device = pick_device(options.device)
    dtype = pick_dtype(options.dtype, device)
    backend = resolve_backend(options.attention_backend, device, dtype)
    quantization = resolve_quantization(options.quantization, backend)
    loaded = load_model(options.model, dtype, device, quantization)
    tokenizer = load_tokenizer(options.model)
    model = loaded.model
    kv_dtype = model.dtype if options.kv_cache_dtype == "auto" else DTYPES[options.kv_cache_dtype]
    spec = KVCacheSpec.for_model(model.config, kv_dtype, options.block_size)
    if options.kv_cache_memory is not None:
        budget = options.kv_cache_memory
    elif device.type == "cuda":
        budget = cuda_kv_budget(model, options.gpu_memory_utilization, options.max_num_batched_tokens)
    else:
        budget = CPU_KV_CACHE_DEFAULT
    cache = PagedKVCache.from_budget(spec, budget, device, cache_layout(backend))
    runner = ModelRunner(model, cache, backend, release_weights=True)
    blocks = BlockManager(
        cache.usable_block_ids, options.block_size, model.config.sliding_window, options.enable_prefix_caching
    )
    config = EngineConfig(
        SchedulerConfig(options.max_num_batched_tokens, options.max_num_seqs), options.max_queued_requests, options.seed
    )
    grammars = GrammarCompiler(lambda: grammar_tokenizer(tokenizer, model.config.vocab_size))
    return Runtime(loaded, tokenizer, cache, blocks, Engine(runner, blocks, config, grammars=grammars))
