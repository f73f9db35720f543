"""W and W2 on vLLM's offline ``LLM.generate``; run by ``bench.peers`` with the vLLM venv's Python.

Imports only vLLM and the standard library (this file runs in another environment). Reads the
prompts (token ids) from a JSON file, prints one JSON line: startup seconds, and per repetition
W output tokens per second and W2 milliseconds per generated token.

    python bench/peer_vllm.py MODEL_DIR DTYPE PROMPTS_JSON REPS
"""

from __future__ import annotations

import json
import sys
import time

OUTPUT = 128


def main() -> None:
    model, dtype, prompts_file, reps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    with open(prompts_file) as f:
        prompts = json.load(f)
    start = time.perf_counter()
    llm = LLM(model=model, dtype=dtype, enable_prefix_caching=False, max_num_seqs=len(prompts), seed=0)
    startup = time.perf_counter() - start
    params = SamplingParams(temperature=0, max_tokens=OUTPUT, min_tokens=OUTPUT, ignore_eos=True, detokenize=False)
    llm.generate([TokensPrompt(prompt_token_ids=prompts[0])], params, use_tqdm=False)  # warm-up
    w, w2 = [], []
    for _ in range(reps):
        start = time.perf_counter()
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        assert tokens == OUTPUT * len(prompts), tokens
        w.append(tokens / elapsed)
        start = time.perf_counter()
        (single,) = llm.generate([TokensPrompt(prompt_token_ids=prompts[1])], params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        assert len(single.outputs[0].token_ids) == OUTPUT
        w2.append(1000 * elapsed / OUTPUT)
    print(json.dumps({"startup": startup, "w": w, "w2": w2}), flush=True)


if __name__ == "__main__":  # vLLM's engine core starts worker processes: keep imports under the guard
    main()
