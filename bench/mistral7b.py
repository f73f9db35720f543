"""Mistral 7B's shape with quantized weights: mistral-serve next to llama.cpp, same files, same run.

Builds once, in the cache directory (``$MISTRALSERVE_CACHE_DIR/bench``): GGUF files with random
weights in Mistral 7B v0.1's exact shape (32 layers, hidden 4096, intermediate 14336, 32 query
heads, 8 KV heads, head dim 128, sliding window 4096, rope theta 10000, vocabulary 32000,
untied head) and the real Mistral v1 tokenizer (mistral-common's ``tokenizer.model.v1``)
embedded: one all-Q4_0 (4.1 GB, norms F32), one all-Q8_0 (7.7 GB). Random weights cost what
real ones do. Then, for each file and for the default model's shipped Q4_1 file:

- mistral-serve: ``mistral-serve serve --model FILE`` (a real server process, 2 threads),
  measured over gRPC: load time (start to SERVING), peak RSS of the process tree, time to first
  token of a 512-token prompt, ms per token at batch 1, output tokens/s at 8 concurrent streams;
- llama.cpp: llama-cpp-python (pinned, built from source once into its own venv in the cache,
  ~15 minutes on 2 cores; ``bench/peer_llamacpp.py``), 2 threads, the same measurements.

    .venv/bin/python -m bench.mistral7b [--skip-llamacpp] [--models q4_0 q8_0 default]

Never part of the tests (minutes to hours, and 12 GB of disk).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from mistralserve.v1 import generation_pb2 as pb
from mistralserve.v1 import generation_pb2_grpc as pb_grpc

from bench.peers import cpu_description
from model.default_model import default_cache_dir, ensure_default_model
from tests.server_process import ServerProcess

LLAMA_CPP = "llama-cpp-python==0.3.36"
LAYERS, HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 32, 4096, 14336, 32, 8, 128, 32000
PROMPT_TTFT, PROMPT, DECODE, STREAMS = 512, 16, 64, 8


# --- the checkpoint -------------------------------------------------------------------------


def tensors() -> list[tuple[str, tuple[int, ...]]]:
    """GGUF names and (rows, columns) of Mistral 7B v0.1, in llama.cpp's file order."""
    out: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (VOCAB, HIDDEN))]
    kv = KV_HEADS * HEAD_DIM
    for i in range(LAYERS):
        out += [
            (f"blk.{i}.attn_norm.weight", (HIDDEN,)), (f"blk.{i}.attn_q.weight", (HEADS * HEAD_DIM, HIDDEN)),
            (f"blk.{i}.attn_k.weight", (kv, HIDDEN)), (f"blk.{i}.attn_v.weight", (kv, HIDDEN)),
            (f"blk.{i}.attn_output.weight", (HIDDEN, HEADS * HEAD_DIM)), (f"blk.{i}.ffn_norm.weight", (HIDDEN,)),
            (f"blk.{i}.ffn_gate.weight", (INTERMEDIATE, HIDDEN)), (f"blk.{i}.ffn_up.weight", (INTERMEDIATE, HIDDEN)),
            (f"blk.{i}.ffn_down.weight", (HIDDEN, INTERMEDIATE)),
        ]  # fmt: skip
    return [*out, ("output_norm.weight", (HIDDEN,)), ("output.weight", (VOCAB, HIDDEN))]


def random_blocks(rng: np.random.Generator, rows: int, cols: int, qtype: Any) -> np.ndarray:
    """Random Q4_0 / Q8_0 blocks whose weights have a std of about 1/64 (activations stay finite)."""
    from gguf import GGMLQuantizationType as Q

    size = 18 if qtype == Q.Q4_0 else 34
    raw = rng.integers(0, 256, size=(rows, cols // 32 * size), dtype=np.uint8)
    blocks = raw.reshape(rows, -1, size)
    step = 1 / 64 / (4.6 if qtype == Q.Q4_0 else 74.0)  # std of q - 8 (4 bits) or of a uniform int8
    scales = (step * (0.5 + rng.random(blocks.shape[:2], dtype=np.float32))).astype(np.float16)
    blocks[:, :, :2] = scales.view(np.uint8).reshape(*blocks.shape[:2], 2)
    return raw


def add_tokenizer(writer: Any) -> None:
    """The Mistral v1 SentencePiece vocabulary, as llama.cpp's converter writes it."""
    import mistral_common
    import sentencepiece

    model = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i).encode())
        scores.append(sp.get_score(i))
        types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)


def build_checkpoint(path: Path, qtype_name: str) -> Path:
    """Write the file once (streaming, tensor by tensor); later runs reuse it."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    if path.exists():
        return path
    qtype = Q[qtype_name]
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    print(f"writing {path} (once)", flush=True)
    writer = gguf.GGUFWriter(str(partial), "llama")
    writer.add_name(f"mistral-7b-v0.1-shape-random-{qtype_name}")
    writer.add_block_count(LAYERS)
    writer.add_context_length(32768)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_sliding_window(4096)
    writer.add_vocab_size(VOCAB)
    add_tokenizer(writer)
    size = 18 if qtype == Q.Q4_0 else 34
    for name, shape in tensors():
        if len(shape) == 1:
            writer.add_tensor_info(name, shape, np.dtype(np.float32), 4 * shape[0])
        else:
            rows, cols = shape
            byte_shape = (rows, cols // 32 * size)
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), rows * byte_shape[1], raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(7)
    for _, shape in tensors():
        if len(shape) == 1:
            writer.write_tensor_data(np.ones(shape, dtype=np.float32))
        else:
            writer.write_tensor_data(random_blocks(rng, shape[0], shape[1], qtype))
    writer.close()
    partial.rename(path)
    return path


# --- mistral-serve over gRPC ----------------------------------------------------------------


def tree_peak_rss_kb(pid: int) -> int:
    """Sum of the peak resident sizes (VmHWM) of ``pid`` and its children (the engine core)."""
    total = 0
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    for p in pids:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1])
    return total


async def generate(stub: Any, prompt: list[int], tokens: int) -> list[float]:
    """Arrival times of every token of one greedy request (EOS ignored)."""
    request = pb.GenerateStreamRequest(
        prompt_token_ids=pb.TokenIds(ids=prompt),
        sampling=pb.SamplingOptions(temperature=0.0),
        stopping=pb.StoppingOptions(max_tokens=tokens, min_tokens=tokens, ignore_eos=True),
    )
    times = [time.perf_counter()]
    async for response in stub.GenerateStream(request):
        times += [time.perf_counter()] * len(response.token_ids)
    return times


async def measure_server(target: str, vocab: int) -> dict[str, float]:
    rng = np.random.default_rng(1)

    def prompt(n: int) -> list[int]:
        return [int(t) for t in rng.integers(100, vocab, n)]

    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        await generate(stub, prompt(8), 2)  # warm
        ttft = [(t := await generate(stub, prompt(PROMPT_TTFT), 1))[1] - t[0] for _ in range(2)]
        decode = await generate(stub, prompt(PROMPT), DECODE)
        start = time.perf_counter()
        runs = await asyncio.gather(*(generate(stub, prompt(PROMPT), DECODE) for _ in range(STREAMS)))
        elapsed = time.perf_counter() - start
    return {
        "ttft_s": min(ttft),
        "ms_per_token": 1000 * (decode[-1] - decode[1]) / (len(decode) - 2),
        "streams_tok_s": sum(len(r) - 1 for r in runs) / elapsed,
    }


def run_ours(path: Path, vocab: int) -> dict[str, float]:
    start = time.perf_counter()
    server = ServerProcess(path, "--kv-cache-memory", "1GiB", env={"OMP_NUM_THREADS": "2"}, start_timeout=900)
    try:
        server.wait_serving(timeout=900)
        load_s = time.perf_counter() - start
        result = asyncio.run(measure_server(server.target, vocab))
        result["load_s"] = load_s
        result["peak_rss_gb"] = tree_peak_rss_kb(server.process.pid) * 1024 / 1e9
        with server.channel() as channel:
            info = server.stub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
        print(f"  mistral-serve weights: {info.weight_types}, dtype {info.dtype}", flush=True)
    finally:
        server.close()
    return result


# --- the bound ------------------------------------------------------------------------------


def read_bandwidth_gbs(reps: int = 3) -> float:
    """This machine's streaming read: torch.sum over 4 GiB of (touched) memory, 2 threads, best of reps."""
    import torch

    torch.set_num_threads(2)
    data = torch.randint(0, 1 << 20, (1 << 29,), dtype=torch.int64)
    best = 0.0
    for _ in range(reps):
        start = time.perf_counter()
        data.sum()
        best = max(best, data.numel() * 8 / (time.perf_counter() - start) / 1e9)
    return best


def bytes_per_token(path: Path) -> int:
    """Bytes of weights one batch-1 decode step reads: every tensor, but of the token embedding
    only one row when the head is a separate tensor."""
    from gguf import GGUFReader

    sizes = {t.name: int(t.n_bytes) for t in GGUFReader(path).tensors}
    if "output.weight" in sizes:
        sizes.pop("token_embd.weight")
    return sum(sizes.values())


# --- llama.cpp --------------------------------------------------------------------------------


def llamacpp_venv(cache: Path) -> Path:
    """The venv's Python; llama-cpp-python built from source once (~15 min on 2 cores)."""
    venv = cache / "peers" / "llama-cpp-python-0.3.36-venv"
    python = venv / "bin" / "python"
    if (venv / ".complete").exists():
        return python
    print(f"building {LLAMA_CPP} in {venv} (from source, ~15 minutes, once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-binary", "llama-cpp-python", LLAMA_CPP],
                   check=True, env=env)  # fmt: skip
    (venv / ".complete").touch()
    return python


def run_llamacpp(python: Path, path: Path) -> dict[str, float]:
    out = subprocess.run(
        [str(python), str(Path(__file__).with_name("peer_llamacpp.py")), str(path), str(PROMPT_TTFT), str(PROMPT),
         str(DECODE), str(STREAMS)],
        capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "2"},
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


# --- report -----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["default", "q4_0", "q8_0"])
    parser.add_argument("--skip-llamacpp", action="store_true")
    args = parser.parse_args()
    cache = default_cache_dir(os.environ)
    files = {
        "default": (ensure_default_model(cache), 49152),
        "q4_0": (cache / "bench" / "mistral-7b-shape.Q4_0.gguf", VOCAB),
        "q8_0": (cache / "bench" / "mistral-7b-shape.Q8_0.gguf", VOCAB),
    }
    python = None if args.skip_llamacpp else llamacpp_venv(cache)
    print(cpu_description(), flush=True)
    rows = []
    for name in args.models:
        path, vocab = files[name]
        if name != "default":
            build_checkpoint(path, name.upper())
        size = path.stat().st_size / 1e9
        print(f"{name}: {path} ({size:.2f} GB)", flush=True)
        before = read_bandwidth_gbs()
        ours = run_ours(path, vocab)
        ours["read_gbs"] = max(before, read_bandwidth_gbs())
        ours["bytes_per_token"] = bytes_per_token(path)
        print(f"  mistral-serve: {ours}", flush=True)
        theirs = None if python is None else run_llamacpp(python, path)
        print(f"  llama.cpp: {theirs}", flush=True)
        rows.append((name, size, ours, theirs))
    print(f"\nmistral-serve vs {LLAMA_CPP}, 2 threads, greedy, prompt {PROMPT} + {DECODE} generated tokens")
    print("| model | file GB | system | load s | peak RSS GB | TTFT 512 (s) | ms/token batch 1 | tok/s 8 streams |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for name, size, ours, theirs in rows:
        for system, r in (("mistral-serve", ours), ("llama.cpp", theirs)):
            if r is not None:
                print(f"| {name} | {size:.2f} | {system} | {r['load_s']:.1f} | {r['peak_rss_gb']:.2f} | "
                      f"{r['ttft_s']:.2f} | {r['ms_per_token']:.1f} | {r['streams_tok_s']:.1f} |")  # fmt: skip
        if theirs is not None:
            print(f"| {name} | | ours / llama.cpp | {ours['load_s'] / theirs['load_s']:.2f}x | "
                  f"{ours['peak_rss_gb'] / theirs['peak_rss_gb']:.2f}x | {ours['ttft_s'] / theirs['ttft_s']:.2f}x | "
                  f"{ours['ms_per_token'] / theirs['ms_per_token']:.2f}x | "
                  f"{ours['streams_tok_s'] / theirs['streams_tok_s']:.2f}x |")  # fmt: skip
    print("\nBatch-1 decode against the read bound (weights read per token / the faster of two torch.sum runs "
          "over 4 GiB, before and after the server):")  # fmt: skip
    for name, _, ours, theirs in rows:
        gb = ours["bytes_per_token"] / 1e9
        line = f"- {name}: {gb:.2f} GB per token, read {ours['read_gbs']:.1f} GB/s; mistral-serve "
        rate = gb / ours["ms_per_token"] * 1000
        line += f"{rate:.1f} GB/s ({100 * rate / ours['read_gbs']:.0f}%)"
        if theirs is not None:
            line += f", llama.cpp {gb / theirs['ms_per_token'] * 1000:.1f} GB/s"
            line += f" ({gb / theirs['ms_per_token'] * 1e5 / ours['read_gbs']:.0f}%)"
        print(line)


if __name__ == "__main__":
    main()
