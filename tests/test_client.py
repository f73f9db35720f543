"""The client package: sync and async clients, and its CLI installed without torch."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from mistralserve.client import AsyncClient, Client

from tests.server_process import ServerProcess

ROOT = Path(__file__).resolve().parents[1]
GREEDY: dict[str, Any] = {"temperature": 0.0, "max_tokens": 12, "ignore_eos": True}


def test_sync_client(server: ServerProcess) -> None:
    with Client(server.target, timeout=60) as client:
        deltas = list(client.stream("Hello", **GREEDY))
        whole = client.generate("Hello", **GREEDY)
        chat = client.generate(messages=[{"role": "user", "content": "Hi"}], **GREEDY)
        ids = client.tokenize("abc")
        info = client.model_info()
        text = client.detokenize(ids)
    assert "".join(deltas) == whole.text and len(deltas) >= 1
    assert whole.finish_reasons == ["length"] and whole.completion_tokens == 12 and whole.prompt_tokens == 5
    assert chat.prompt_tokens == len("<s>user: Hi\nassistant:") - len("<s>") + 1
    assert text == "abc" and info.vocab_size == 128


def test_async_client(server: ServerProcess) -> None:
    async def run() -> tuple[str, str, list[int]]:
        async with AsyncClient(server.target, timeout=60) as client:
            deltas = [d async for d in client.stream("Hello", **GREEDY)]
            whole = await client.generate("Hello", **GREEDY)
            ids = await client.tokenize("xyz")
        return "".join(deltas), whole.text, ids

    streamed, whole, ids = asyncio.run(run())
    with Client(server.target) as client:
        assert streamed == whole == client.generate("Hello", **GREEDY).text
    assert len(ids) == 3


def test_request_builder_refuses_ambiguous_input(server: ServerProcess) -> None:
    with Client(server.target) as client:
        with pytest.raises(ValueError, match="exactly one of prompt, messages, prompt_token_ids"):
            client.generate("a", prompt_token_ids=[1])
        with pytest.raises(TypeError, match="unknown options: temprature"):
            client.generate("a", temprature=0.5)


def test_client_constraints_shape_the_output(server: ServerProcess) -> None:
    """The tiny model's character vocabulary, spelled out for llguidance: every sample obeys."""
    import json
    import re

    schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["a"], "additionalProperties": False}  # fmt: skip
    with Client(server.target, timeout=120) as client:
        choice = client.generate("Hello", choice=["yes", "no"], temperature=1.0, seed=3, n=4, max_tokens=10)
        regex = client.generate("Hello", regex="[a-c]{2,4}-[0-9]", temperature=1.0, seed=4, n=4, max_tokens=10)
        shaped = client.generate("Hello", json_schema=schema, temperature=1.0, seed=5, n=4, max_tokens=20)
        with pytest.raises(ValueError, match="give at most one of json_schema, json_object, regex, choice, grammar"):
            client.generate("a", regex="a", choice=["a"])
    assert all(text in ("yes", "no") for text in choice.texts) and len(choice.texts) == 4
    assert all(re.fullmatch("[a-c]{2,4}-[0-9]", text) for text in regex.texts), regex.texts
    assert all(json.loads(text)["a"] in range(10) for text in shaped.texts), shaped.texts
    assert set(choice.finish_reasons) == {"stop"}


def test_client_tools_come_back_as_calls(server: ServerProcess) -> None:
    """``tools`` and ``tool_choice`` with messages: the forced call is in ``tool_calls``, not the text."""
    import json

    tool = {"name": "add", "description": "Add two digits", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["a"], "additionalProperties": False}}  # fmt: skip
    with Client(server.target, timeout=120) as client:
        result = client.generate(messages=[{"role": "user", "content": "1+1?"}], tools=[tool], tool_choice="add",
                                 temperature=1.0, seed=2, max_tokens=40)  # fmt: skip
        with pytest.raises(ValueError, match="tools and tool_choice need messages"):
            client.generate("a", tool_choice="required")
    [[call]] = result.tool_calls
    assert result.text == "" and call.name == "add" and json.loads(call.arguments)["a"] in range(10)
    assert result.reasonings == [""]


@pytest.mark.slow
def test_client_installs_without_torch_and_its_cli_streams(server: ServerProcess, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, str(ROOT / "clients" / "python")], check=True, capture_output=True)
    no_torch = subprocess.run([str(venv / "bin" / "python"), "-c", "import torch"], capture_output=True)
    assert no_torch.returncode != 0  # the client pulled in no torch
    cli = str(venv / "bin" / "mistral-serve-client")
    streamed = subprocess.run(
        [cli, "--target", server.target, "generate", "--stream", "--temperature", "0", "--max-tokens", "12", "Hello"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    with Client(server.target) as client:
        expected = client.generate("Hello", temperature=0.0, max_tokens=12).text
    assert streamed.stdout == expected + "\n"
    info = subprocess.run([cli, "--target", server.target, "info"], capture_output=True, text=True, check=True)
    assert '"vocabSize": 128' in info.stdout  # lowerCamelCase JSON names
    bad = subprocess.run(
        [cli, "--target", server.target, "generate", "--max-tokens", "0", "x"], capture_output=True, text=True
    )
    assert bad.returncode == 1
    assert (
        bad.stderr.strip() == "mistral-serve-client: error: INVALID_ARGUMENT: stopping.max_tokens: must be >= 1, got 0"
    )


def test_an_unset_max_tokens_is_the_servers_default_not_the_rest_of_the_context(long_server: ServerProcess) -> None:
    """The README's first command once ran for 8 minutes: with no max_tokens, an 8,192-token
    model generated to the end of its context. Now an unset max_tokens is --default-max-tokens
    (256): exactly 256 tokens when EOS is ignored, and the CLI gives the same text."""
    with Client(long_server.target) as client:
        unbounded = client.generate("Once upon a time", temperature=0.0, ignore_eos=True)
        assert (unbounded.completion_tokens, unbounded.finish_reasons) == (256, ["length"])
        greedy = client.generate("Once upon a time", temperature=0.0)
    cli = Path(sys.executable).with_name("mistral-serve-client")
    streamed = subprocess.run(
        [str(cli), "--target", long_server.target, "generate", "--stream", "--temperature", "0", "Once upon a time"],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    assert streamed.stdout.removesuffix("\n") == greedy.text
