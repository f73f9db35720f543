"""A bad checkpoint gets one clear line naming the file and the problem, and exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import mistral_common
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from server.cli import main
from tests.checkpoint_writers import hf_state, write_gguf, write_mistral
from tests.hf_reference import TinySpec, build_hf_model, save_hf_model

SPEC = TinySpec("bad", heads=4, kv_heads=2, hidden=64, intermediate=128, architecture="llama")
MOE_SPEC = TinySpec("bad_moe", heads=4, kv_heads=2, intermediate=96, architecture="mixtral", experts=4, top_k=2)


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("good")
    hf = build_hf_model(SPEC)
    hf_dir = save_hf_model(hf, root / "hf")
    from model.loader import load_model

    gguf_path = root / "m.gguf"
    write_gguf(hf_state(hf), load_model(hf_dir).config, gguf_path, Q.F32)
    moe = build_hf_model(MOE_SPEC)
    moe_dir = save_hf_model(moe, root / "moe")
    return {"hf": hf_dir, "gguf": gguf_path, "moe": moe_dir, "moe_model": moe}


def copy_hf(good: dict[str, Path], tmp_path: Path, which: str = "hf") -> Path:
    target = tmp_path / which
    target.mkdir()
    for file in good[which].iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    return target


def truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def missing_path(good: dict[str, Path], tmp_path: Path) -> tuple[Path, Path, str]:
    return tmp_path / "nope", tmp_path / "nope", "no such file or directory"


def truncated_safetensors(good: dict[str, Path], tmp_path: Path) -> tuple[Path, Path, str]:
    directory = copy_hf(good, tmp_path)
    truncate(directory / "model.safetensors", 0.6)
    return directory, directory / "model.safetensors", "truncated file: tensor"


def corrupt_safetensors_header(good: dict[str, Path], tmp_path: Path) -> tuple[Path, Path, str]:
    directory = copy_hf(good, tmp_path)
    data = bytearray((directory / "model.safetensors").read_bytes())
    data[8:20] = b"\xff\xfe garbage!!"
    (directory / "model.safetensors").write_bytes(bytes(data))
    return directory, directory / "model.safetensors", "corrupt safetensors header"


def safetensors_length_overflow(good: dict[str, Path], tmp_path: Path) -> tuple[Path, Path, str]:
    directory = copy_hf(good, tmp_path)
    data = bytearray((directory / "model.safetensors").read_bytes())
    data[:8] = (2**40).to_bytes(8, "little")
    (directory / "model.safetensors").write_bytes(bytes(data))
    return directory, directory / "model.safetensors", "corrupt or truncated safetensors file"


def unsupported_hf_architecture(good: dict[str, Path], tmp_path: Path) -> tuple[Path, Path, str]:
    directory = copy_hf(good, tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config["model_type"] = "gpt2"
    (directory / "config.json").write_text(json.dumps(config))
    return (
        directory,
        directory / "config.json",
        "unsupported architecture model_type='gpt2' (supported: mistral, llama, mixtral, ministral)",
    )


def truncated_gguf_data(good: dict[str, Path], tmp_path: Path) -> tuple[Path, Path, str]:
    path = tmp_path / "t.gguf"
    path.write_bytes(good["gguf"].read_bytes())
    truncate(path, 0.7)
    return path, path, "truncated file: tensor"


def truncated_gguf_header(good: dict[str, Path], tmp_path: Path) -> tuple[Path, Path, str]:
    path = tmp_path / "h.gguf"
    path.write_bytes(good["gguf"].read_bytes()[:200])
    return path, path, "truncated GGUF file"


def corrupt_gguf(good: dict[str, Path], tmp_path: Path) -> tuple[Path, Path, str]:
    path = tmp_path / "junk.gguf"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return path, path, "not a GGUF file (bad magic)"


def _rewrite_gguf(good: Path, target: Path, architecture: str, qtype_of: Callable[[str], Q | None]) -> None:
    from model.loader.gguf_format import GGUFFile

    source = GGUFFile(good)
    writer = gguf.GGUFWriter(str(target), architecture)
    for key, value in source.metadata.items():
        if key.startswith("llama."):
            key = key.replace("llama.", f"{architecture}.", 1)
            (writer.add_float32 if isinstance(value, float) else writer.add_uint32)(key, value)
    for tensor in source.tensors:
        qtype = qtype_of(tensor.name)
        if qtype is None:
            writer.add_tensor(tensor.name, np.array(source.raw(tensor)), raw_dtype=tensor.type)
        else:
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            rows, cols = tensor.shape
            writer.add_tensor(tensor.name, np.zeros((rows, cols // block * size), np.uint8), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def unsupported_gguf_architecture(good: dict[str, Path], tmp_path: Path) -> tuple[Path, Path, str]:
    path = tmp_path / "qwen.gguf"
    _rewrite_gguf(good["gguf"], path, "qwen2", lambda name: None)
    return path, path, "unsupported GGUF architecture 'qwen2' (supported: llama)"


def unsupported_quantization(good: dict[str, Path], tmp_path: Path) -> tuple[Path, Path, str]:
    path = tmp_path / "iq.gguf"
    _rewrite_gguf(good["gguf"], path, "llama", lambda name: Q.IQ4_NL if name == "blk.0.ffn_up.weight" else None)
    return path, path, "tensor blk.0.ffn_up.weight has unsupported quantization type IQ4_NL (supported: F32"


def sigmoid_router_hf(good: dict[str, Any], tmp_path: Path) -> tuple[Path, Path, str]:
    directory = copy_hf(good, tmp_path, "moe")
    config = json.loads((directory / "config.json").read_text())
    config["scoring_func"] = "sigmoid"
    (directory / "config.json").write_text(json.dumps(config))
    return directory, directory / "config.json", "unsupported MoE router scoring_func='sigmoid' (supported: 'softmax')"


def _moe_config(good: dict[str, Any]) -> Any:
    from model.loader import load_model

    return load_model(good["moe"]).config


def shared_experts_consolidated(good: dict[str, Any], tmp_path: Path) -> tuple[Path, Path, str]:
    directory = write_mistral(hf_state(good["moe_model"]), _moe_config(good), tmp_path / "consolidated")
    params = json.loads((directory / "params.json").read_text())
    params["moe"]["num_shared_experts"] = 1
    (directory / "params.json").write_text(json.dumps(params))
    return (
        directory,
        directory / "params.json",
        "unsupported MoE router field moe.num_shared_experts=1 (supported: num_experts, num_experts_per_tok)",
    )


def sigmoid_gating_gguf(good: dict[str, Any], tmp_path: Path) -> tuple[Path, Path, str]:
    path = tmp_path / "moe.gguf"
    write_gguf(hf_state(good["moe_model"]), _moe_config(good), path, Q.F32, {"llama.expert_gating_func": 2})
    return path, path, "unsupported MoE router llama.expert_gating_func='sigmoid' (supported: 'softmax')"


def unknown_tekken_version(good: dict[str, Any], tmp_path: Path) -> tuple[Path, Path, str]:
    from model.loader import load_model

    directory = write_mistral(hf_state(build_hf_model(SPEC)), load_model(good["hf"]).config, tmp_path / "nemo")
    tekken = json.loads((Path(mistral_common.__file__).parent / "data" / "tekken_240718.json").read_text())
    tekken["config"]["version"] = "v99"
    (directory / "tekken.json").write_text(json.dumps(tekken))
    return directory, directory / "tekken.json", "unsupported Tekken version config.version='v99' (supported: v3,"


CASES = [
    missing_path,
    truncated_safetensors,
    corrupt_safetensors_header,
    safetensors_length_overflow,
    unsupported_hf_architecture,
    truncated_gguf_data,
    truncated_gguf_header,
    corrupt_gguf,
    unsupported_gguf_architecture,
    unsupported_quantization,
    sigmoid_router_hf,
    shared_experts_consolidated,
    sigmoid_gating_gguf,
    unknown_tekken_version,
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__)
def test_bad_checkpoint_is_one_line_and_exit_2(
    case: Callable[..., tuple[Path, Path, str]],
    good: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    model_arg, named_file, problem = case(good, tmp_path)
    code = main(["generate", "--model", str(model_arg), "--max-tokens", "2", "hello"])
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"mistral-serve: error: {named_file}: ")
    assert problem in lines[0]


def test_requantizing_a_quantized_gguf_is_refused_with_exit_2(
    good: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "q8.gguf"
    _rewrite_gguf(good["gguf"], path, "llama", lambda name: Q.Q8_0 if name == "blk.0.ffn_up.weight" else None)
    code = main(["generate", "--model", str(path), "--quantization", "q4_0", "--max-tokens", "2", "hello"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.splitlines() == [
        f"mistral-serve: error: {path}: tensor model.layers.0.mlp.up_proj.weight is already quantized (Q8_0); "
        "--quantization q4_0 cannot requantize it (use auto to keep its types, or none to dequantize)"
    ]


def test_console_script_prints_no_traceback(good: dict[str, Path], tmp_path: Path) -> None:
    model_arg, named_file, problem = truncated_gguf_data(good, tmp_path)
    script = Path(sys.executable).parent / "mistral-serve"
    result = subprocess.run(
        [str(script), "generate", "--model", str(model_arg), "hello"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and str(named_file) in result.stderr and problem in result.stderr


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--max-tokens", "0"], "argument --max-tokens: must be >= 1, got 0"),
        (["--temperature", "-1"], "argument --temperature: must be a finite number >= 0, got -1"),
        (["--temperature", "nan"], "argument --temperature: must be a finite number >= 0, got nan"),
        (["--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
        (
            ["--quantization", "q4_k"],
            "argument --quantization: invalid choice: 'q4_k' (choose from 'none', 'auto', 'int8', 'q8_0', 'q4_0')",
        ),
    ],
)
def test_bad_flags_name_the_flag_and_allowed_values(
    args: list[str], fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", *args, "hello"])
    assert exit_info.value.code == 2
    assert fragment in capsys.readouterr().err
