"""``mistral-serve generate``: run prompts through the engine, print the continuations.

One prompt with ``--n 1`` streams to stdout as it is generated; several prompts (a file,
one per line) or several samples print each completion under a header once done.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from scheduler.output_stream import SyncOutputStream
from scheduler.request import SamplingParams
from server.runtime import build_runtime, runtime_options


def read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompts_file is None:
        if args.prompt is None:
            raise ValueError("give a PROMPT or --prompts-file")
        return [args.prompt]
    try:
        lines = Path(args.prompts_file).read_text().splitlines()
    except OSError as exc:
        raise ValueError(f"--prompts-file: cannot read {args.prompts_file} ({exc.strerror})") from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts-file: {args.prompts_file} has no prompts")
    return prompts


def run_generate(args: argparse.Namespace, model_path: Path) -> int:
    prompts = read_prompts(args)
    runtime = build_runtime(runtime_options(args, model_path))
    tokenizer, engine = runtime.tokenizer, runtime.engine
    streams = []
    for i, prompt in enumerate(prompts):
        message = [{"role": "user", "content": prompt}]
        ids = tokenizer.encode_chat(message) if args.chat else tokenizer.encode(prompt)
        room = engine.max_model_len - len(ids)
        params = SamplingParams(
            temperature=args.temperature,
            seed=args.seed,
            n=args.n,
            max_tokens=max(1, min(args.default_max_tokens if args.max_tokens is None else args.max_tokens, room)),
            stop=tuple(args.stop),
        )
        stream = SyncOutputStream(args.n)
        engine.submit(runtime.request(f"prompt-{i}", ids, params), stream)
        streams.append(stream)
    engine.start()
    try:
        if len(prompts) == 1 and args.n == 1:
            for output in streams[0]:
                sys.stdout.write(output.text)
                sys.stdout.flush()
            sys.stdout.write("\n")
            return 0
        for i, stream in enumerate(streams):
            texts: dict[int, str] = {}
            for output in stream:
                texts[output.index] = texts.get(output.index, "") + output.text
            for index in sorted(texts):
                print(f"=== prompt {i + 1}, sample {index + 1} ===")
                print(texts[index])
        return 0
    finally:
        engine.shutdown()
