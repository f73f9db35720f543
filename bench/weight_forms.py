"""The default model's weights in each form the engine can hold them, side by side in one run.

    .venv/bin/python -m bench.weight_forms [--reps 3]

Forms: the shipped Q4_1 file kept quantized (``--quantization auto``, the default), and the same
weights dequantized to bfloat16 and to float32 (``--quantization none``). For each, in-process
(the engine on this thread, 2 threads for the kernels): W = 64 requests x 128 prompt x 128
generated tokens (greedy, EOS ignored) in output tokens/s, and W2 = one such request in ms per
token; repetitions interleaved, min / median / max. This is what decides the default form.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
import warnings

import torch

from bench.engine_bench import OUTPUT, REQUESTS, engine_run, prompts
from bench.peers import cpu_description
from model.default_model import default_cache_dir, ensure_default_model
from scheduler.output_stream import SyncOutputStream
from scheduler.request import SamplingParams
from server.runtime import Runtime, RuntimeOptions, build_runtime

FORMS = {"Q4_1 kept (auto)": ("auto", "auto"), "bfloat16": ("none", "bfloat16"), "float32": ("none", "float32")}


def one_request(runtime: Runtime, prompt: list[int]) -> float:
    """ms per generated token of one request alone."""
    stream = SyncOutputStream(1)
    params = SamplingParams(temperature=0.0, max_tokens=OUTPUT, ignore_eos=True)
    start = time.perf_counter()
    runtime.engine.submit(runtime.request(f"w2-{time.monotonic_ns()}", prompt, params), stream)
    runtime.engine.run_until_idle()
    return 1000 * (time.perf_counter() - start) / OUTPUT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    path = ensure_default_model(default_cache_dir(os.environ))
    w: dict[str, list[float]] = {name: [] for name in FORMS}
    w2: dict[str, list[float]] = {name: [] for name in FORMS}
    types: dict[str, str] = {}
    workload = None
    for _ in range(args.reps):
        for name, (quantization, dtype) in FORMS.items():
            options = RuntimeOptions(path, dtype=dtype, quantization=quantization, max_num_seqs=REQUESTS,
                                     enable_prefix_caching=False, kv_cache_memory=1 << 30)  # fmt: skip
            runtime = build_runtime(options)
            types[name] = f"{runtime.weight_types}; KV {runtime.kv_dtype_name}"
            workload = workload or prompts(runtime.loaded.config.vocab_size)
            one_request(runtime, workload[0][:8])  # warm
            w[name].append(engine_run(runtime, workload)[0])
            w2[name].append(one_request(runtime, workload[1]))
            del runtime
            gc.collect()
    print(f"\n{cpu_description()}; 2 threads; W = {REQUESTS} x 128 x {OUTPUT}; {args.reps} reps (min / median / max)")
    print("| weights | held as | W output tok/s | W2 ms per token |")
    print("| --- | --- | ---: | ---: |")
    for name in FORMS:
        print(f"| {name} | {types[name]} | {' / '.join(f'{v:.1f}' for v in sorted(w[name]))} | "
              f"{' / '.join(f'{v:.1f}' for v in sorted(w2[name]))} |")  # fmt: skip
    base = statistics.median(w["float32"]), statistics.median(w2["float32"])
    for name in FORMS:
        print(f"- {name}: W {statistics.median(w[name]) / base[0]:.2f}x float32's, "
              f"W2 {statistics.median(w2[name]) / base[1]:.2f}x float32's ms per token")  # fmt: skip


if __name__ == "__main__":
    main()
