"""Weights kept quantized: GGUF blocks decode exactly into the kernels' form, the at-load
quantizers equal llama.cpp's (gguf-py's), and the quantized products equal the dequantized
matrix's product within 1e-4 relative, for this machine's build and the AVX2 one."""

from __future__ import annotations

from types import ModuleType

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize
from gguf.quants import quantize as gguf_quantize

from model.kernels import cpu_kernels
from model.quant import KEPT_GGUF_TYPES, QuantParts, common_format, format_of, from_gguf, new_linear, pack, quantize
from model.quant import set_rows as fill

STORE, ACCUMULATE, SILU_MUL = 0, 1, 2
SCALE_OFFSETS = {Q.Q8_0: [0], Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q4_K: [0, 2], Q.Q6_K: [208]}


@pytest.fixture(scope="module", params=["native", "haswell"])
def kernels(request: pytest.FixtureRequest) -> ModuleType:
    module = cpu_kernels(request.param)
    assert module is not None, f"the {request.param} build failed (see the log)"
    return module


def random_blocks(qtype: Q, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random GGUF blocks whose fp16 scales are finite and small (|d| < 0.01)."""
    rng = np.random.default_rng(seed)
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block * size), dtype=np.uint8)
    blocks = raw.reshape(rows, -1, size)
    for offset in SCALE_OFFSETS[qtype]:
        scales = (rng.random(blocks.shape[:2]) * 0.02 - 0.01).astype(np.float16)
        blocks[:, :, offset : offset + 2] = scales.view(np.uint8).reshape(*blocks.shape[:2], 2)
    return raw


@pytest.mark.parametrize("qtype", KEPT_GGUF_TYPES, ids=lambda q: q.name)
def test_gguf_blocks_decode_exactly(qtype: Q) -> None:
    raw = random_blocks(qtype, 7, 512)
    parts = from_gguf(raw, qtype)
    assert parts.type == qtype.name and parts.shape == (7, 512)
    assert torch.equal(parts.dequantize(), torch.from_numpy(dequantize(raw, qtype)))


@pytest.mark.parametrize(("scheme", "qtype"), [("q8_0", Q.Q8_0), ("q4_0", Q.Q4_0)])
def test_at_load_quantizers_equal_gguf_py(scheme: str, qtype: Q) -> None:
    w = torch.randn(9, 160, generator=torch.Generator().manual_seed(1))
    w[3, 32:64] = 0  # an all-zero block
    expected = dequantize(gguf_quantize(w.numpy(), qtype), qtype)
    assert torch.equal(quantize(w, scheme).dequantize(), torch.from_numpy(expected))


def test_int8_is_per_row_symmetric_within_half_a_step() -> None:
    w = torch.randn(5, 70, generator=torch.Generator().manual_seed(2))
    parts = quantize(w, "int8")
    assert parts.scales.shape == (5, 1) and parts.values.dtype == torch.int8
    assert ((parts.dequantize() - w).abs() <= parts.scales / 2 + 1e-7).all()
    assert parts.values.abs().amax(dim=1).eq(127).all()


def product_error(linear: object, weight: torch.Tensor, m: int, gated: bool) -> float:
    x = torch.randn(m, weight.shape[1], generator=torch.Generator().manual_seed(m), dtype=torch.float64)
    h = x @ weight.double().T
    expected = F.silu(h[:, : h.shape[1] // 2]) * h[:, h.shape[1] // 2 :] if gated else h
    got = linear(x.float())  # type: ignore[operator]
    return float(((got.double() - expected).abs().max() / expected.abs().max()).item())


@pytest.mark.parametrize("qtype", KEPT_GGUF_TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("m", [1, 3, 5, 8, 9, 40])
def test_quantized_product_equals_the_dequantized_one(kernels: ModuleType, qtype: Q, m: int) -> None:
    n, k = 45, 512  # 45 rows: a partial panel; K as GGUF blocks allow
    parts = from_gguf(random_blocks(qtype, n, k, seed=m), qtype)
    linear = pack(parts, kernels)
    weight = parts.dequantize()
    assert torch.equal(linear.unpack(), weight)
    assert product_error(linear, weight, m, gated=False) < 1e-4
    ids = torch.tensor([0, 44, 31, 32, 7])
    rows = torch.empty(5, k)
    linear.gather_rows(ids, rows)
    assert torch.equal(rows, weight[ids])
    out = torch.randn(m, n)
    expected = out.double() + torch.randn(m, k, generator=torch.Generator().manual_seed(m)).double() @ weight.double().T
    linear.forward(torch.randn(m, k, generator=torch.Generator().manual_seed(m)), out, ACCUMULATE)
    assert ((out.double() - expected).abs().max() / expected.abs().max()).item() < 1e-4


@pytest.mark.parametrize("scheme", ["q8_0", "q4_0", "int8"])
@pytest.mark.parametrize(("m", "n", "k"), [(1, 38, 70), (4, 64, 33), (17, 100, 129)])
def test_odd_shapes_quantized_at_load(kernels: ModuleType, scheme: str, m: int, n: int, k: int) -> None:
    parts = quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)), scheme)
    linear = pack(parts, kernels)
    assert torch.equal(linear.unpack(), parts.dequantize())
    assert product_error(linear, parts.dequantize(), m, gated=False) < 1e-4


@pytest.mark.parametrize("m", [1, 6, 33])
def test_fused_weights_of_mixed_types_hold_each_exactly(kernels: ModuleType, m: int) -> None:
    """Q4_K gate + Q6_K up (as Q4_K_M files mix them) in one gated layer, filled chunk by chunk."""
    gate = from_gguf(random_blocks(Q.Q4_K, 40, 512, seed=3), Q.Q4_K)
    up = from_gguf(random_blocks(Q.Q6_K, 40, 512, seed=4), Q.Q6_K)
    form = common_format([format_of("Q4_K", 512), format_of("Q6_K", 512)])
    assert (form.bits, form.group, form.has_min, form.offset8, form.fp16) == (8, 16, True, False, False)
    linear = new_linear(kernels, form, 80, 512, gated=True)
    for start in range(0, 40, 16):  # chunks of rows, as the loader writes them
        fill(linear, start, QuantParts(gate.values[start : start + 16], gate.scales[start : start + 16],
             None if gate.mins is None else gate.mins[start : start + 16], 32, 4, "Q4_K"), form)  # fmt: skip
    fill(linear, 40, up, form)
    weight = torch.cat([gate.dequantize(), up.dequantize()])
    assert torch.equal(linear.unpack(), weight)
    assert product_error(linear, weight, m, gated=True) < 1e-4


def test_q4_0_packs_to_the_files_size(kernels: ModuleType) -> None:
    """Q4_0 stores no mins (each is -8 scale): 18 bytes per 32 weights, as in the file."""
    parts = from_gguf(random_blocks(Q.Q4_0, 64, 4096), Q.Q4_0)
    assert pack(parts, kernels).nbytes == 64 * 4096 // 32 * 18
    mixed = common_format([format_of("Q4_0", 64), format_of("Q4_1", 64)])
    assert (mixed.has_min, mixed.offset8) == (True, False)


def test_an_fp16_layer_refuses_a_scale_that_is_not_an_fp16(kernels: ModuleType) -> None:
    linear = kernels.QuantLinear(32, 32, 32, 8, False, False, True, False)
    with pytest.raises(RuntimeError, match="not exactly an fp16"):
        linear.set_rows(0, torch.zeros(1, 32, dtype=torch.int8), torch.tensor([[0.1]]), torch.empty(0))


def cpu_has_vnni() -> bool:
    with open("/proc/cpuinfo") as f:
        flags = next(line for line in f if line.startswith("flags")).split()
    return "avx512_vnni" in flags and "avx512bw" in flags


@pytest.mark.parametrize("qtype", KEPT_GGUF_TYPES, ids=lambda q: q.name)
def test_a_rows_product_does_not_depend_on_the_batch(kernels: ModuleType, qtype: Q) -> None:
    """Every row count takes the same arithmetic per row (few rows and panels, integer products
    and fp32 ones), so a row's result is bit-identical alone and in any batch."""
    parts = from_gguf(random_blocks(qtype, 70, 512, seed=9), qtype)
    linear = pack(parts, kernels)
    native_4bit = kernels.ISA == "avx512" and parts.bits == 4
    assert linear.integer_products == (native_4bit and cpu_has_vnni())
    x = torch.randn(40, 512, generator=torch.Generator().manual_seed(9))
    together = linear(x)
    for m in (1, 2, 7, 8, 9, 13):
        assert torch.equal(linear(x[:m]), together[:m]), m
    for i in (0, 17, 39):
        assert torch.equal(linear(x[i : i + 1]), together[i : i + 1]), i
    x[5, 100] = float("nan")  # a bad activation spoils its own row only
    spoiled = linear(x)
    assert spoiled[5].isnan().all() and torch.equal(spoiled[torch.arange(40) != 5], together[torch.arange(40) != 5])
