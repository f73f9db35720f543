"""llama.cpp's side of bench/mistral7b.py, run inside llama-cpp-python's own venv (not ours).

    python peer_llamacpp.py FILE PROMPT_TTFT PROMPT DECODE STREAMS

Through llama.cpp's C API (llama-cpp-python's bindings), 2 threads, greedy: load time, time
to first token of a PROMPT_TTFT-token prompt, ms per token decoding DECODE tokens after a
PROMPT-token prompt at batch 1, and output tokens/s with STREAMS sequences decoded together
in one batch per step (as its server's parallel slots do). Prints one JSON line.
"""

from __future__ import annotations

import json
import random
import resource
import sys
import time

import llama_cpp as L  # type: ignore[import-not-found]
import numpy as np


def main() -> None:
    path, prompt_ttft, prompt_len, decode, streams = sys.argv[1], *map(int, sys.argv[2:6])
    L.llama_backend_init()
    start = time.perf_counter()
    model = L.llama_model_load_from_file(path.encode(), L.llama_model_default_params())
    params = L.llama_context_default_params()
    params.n_ctx = max(prompt_ttft + 16, streams * (prompt_len + decode + 8))
    params.n_batch = params.n_ubatch = 512
    params.n_seq_max = streams
    params.kv_unified = True  # the sequences share the cache's cells (llama-server's default)
    params.n_threads = params.n_threads_batch = 2
    ctx = L.llama_init_from_model(model, params)
    load_s = time.perf_counter() - start
    vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    rng = random.Random(1)
    batch = L.llama_batch_init(512, 0, streams)

    def decode_step(items: list[tuple[int, int, int]]) -> list[int]:
        """(token, position, sequence) per row, logits for each; the greedy next token of each row."""
        batch.n_tokens = len(items)
        for i, (token, pos, seq) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = True
        assert L.llama_decode(ctx, batch) == 0
        return [argmax(i) for i in range(len(items))]

    def argmax(row: int) -> int:
        return int(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, row), shape=(vocab,)).argmax())

    def prefill(tokens: list[int], seq: int) -> int:
        for s in range(0, len(tokens), 512):
            part = tokens[s : s + 512]
            batch.n_tokens = len(part)
            for i, token in enumerate(part):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, s + i, 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = s + i == len(tokens) - 1
            assert L.llama_decode(ctx, batch) == 0
        return argmax(-1)

    def prompt(n: int) -> list[int]:
        return [rng.randrange(100, vocab) for _ in range(n)]

    memory = L.llama_get_memory(ctx)
    prefill(prompt(8), 0)  # warm
    L.llama_memory_clear(memory, True)
    ttft = []
    for _ in range(2):
        t = time.perf_counter()
        prefill(prompt(prompt_ttft), 0)
        ttft.append(time.perf_counter() - t)
        L.llama_memory_clear(memory, True)
    token = prefill(prompt(prompt_len), 0)
    t = time.perf_counter()
    for pos in range(prompt_len, prompt_len + decode - 1):
        (token,) = decode_step([(token, pos, 0)])
    ms_per_token = 1000 * (time.perf_counter() - t) / (decode - 1)
    L.llama_memory_clear(memory, True)
    t = time.perf_counter()
    tokens = [prefill(prompt(prompt_len), s) for s in range(streams)]
    for step in range(decode - 1):
        tokens = decode_step([(tokens[s], prompt_len + step, s) for s in range(streams)])
    streams_tok_s = streams * decode / (time.perf_counter() - t)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)
    print(json.dumps({"load_s": load_s, "peak_rss_gb": peak_gb, "ttft_s": min(ttft), "ms_per_token": ms_per_token,
                      "streams_tok_s": streams_tok_s}))  # fmt: skip


if __name__ == "__main__":
    main()
