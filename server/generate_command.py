"""``mistral-serve generate``: load a checkpoint and stream one continuation to stdout."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from model.generate import generate
from model.loader import load_model
from server.tokenizer_loader import load_tokenizer


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def run_generate(args: argparse.Namespace, model_path: Path) -> int:
    device = pick_device(args.device)
    loaded = load_model(model_path, pick_dtype(args.dtype, device), device)
    tokenizer = load_tokenizer(model_path)
    if args.chat:
        prompt_ids = tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
    else:
        prompt_ids = tokenizer.encode(args.prompt)
    stop_ids = tokenizer.special.eos_ids
    generated: list[int] = []
    printed = ""
    for token in generate(
        loaded.model, prompt_ids, args.max_tokens, temperature=args.temperature, seed=args.seed, stop_ids=stop_ids
    ):
        if token in stop_ids:
            break
        generated.append(token)
        text = tokenizer.decode(generated)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(printed) :])
            sys.stdout.flush()
            printed = text
    sys.stdout.write(tokenizer.decode(generated)[len(printed) :] + "\n")
    return 0
