"""The compiled CPU kernels against plain torch references, for this machine's build and for an
AVX2-only build (``-march=haswell``), fp32 and bf16: packed linears and their epilogues, the
embedding gather, RMSNorm, rotary + cache write, and paged attention (prefill and decode chunks,
sliding windows, released blocks, GQA) against a dense masked softmax."""

from __future__ import annotations

import math
import os
import random
import threading
import time
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F

from model.attention import window_mask
from model.kernels import cpu_kernels, wait_for_build_lock
from model.layers import apply_rotary

STORE, ACCUMULATE, SILU_MUL = 0, 1, 2


def builds() -> list[str]:
    return ["native", "haswell"]


@pytest.fixture(scope="module", params=builds())
def kernels(request: pytest.FixtureRequest) -> ModuleType:
    module = cpu_kernels(request.param)
    assert module is not None, f"the {request.param} build failed (see the log)"
    if request.param == "haswell":
        assert module.ISA == "avx2"
    return module


def bf16_modes(k: ModuleType) -> list[int]:
    return [0, 1] if k.has_bf16_dot() else [0]


@pytest.mark.parametrize(("m", "n", "k"), [(1, 40, 7), (5, 64, 33), (8, 96, 64), (17, 100, 129), (300, 130, 576)])
def test_packed_linear_equals_matmul(kernels: ModuleType, m: int, n: int, k: int) -> None:
    gen = torch.Generator().manual_seed(m * n + k)
    weight, x = torch.randn(n, k, generator=gen), torch.randn(m, k, generator=gen)
    packed = kernels.PackedLinear(weight, False, False)
    assert torch.equal(packed.unpack(), weight)
    assert (packed(x) - x @ weight.T).abs().max().item() < 1e-4 * math.sqrt(k)
    out = torch.randn(m, n, generator=gen)
    expected = out + x @ weight.T
    packed.forward(x, out, ACCUMULATE)
    assert (out - expected).abs().max().item() < 1e-4 * math.sqrt(k)


@pytest.mark.parametrize(("m", "n", "k"), [(1, 40, 7), (9, 96, 64), (300, 130, 577)])
def test_packed_linear_bf16_weights(kernels: ModuleType, m: int, n: int, k: int) -> None:
    gen = torch.Generator().manual_seed(m + n + k)
    weight, x = torch.randn(n, k, generator=gen).bfloat16(), torch.randn(m, k, generator=gen)
    for mode in bf16_modes(kernels):
        packed = kernels.PackedLinear(weight, False, True, mode)
        assert torch.equal(packed.unpack(), weight.float())  # stored exactly
        got = packed(x)
        if mode == 0:  # widened to fp32 in registers: fp32 products of the bf16 weights
            assert (got - x @ weight.float().T).abs().max().item() < 1e-4 * math.sqrt(k)
        else:  # vdpbf16ps rounds x to bf16 too
            assert (got - x.bfloat16().float() @ weight.float().T).abs().max().item() < 1e-4 * math.sqrt(k)


@pytest.mark.parametrize("bf16", [False, True])
def test_gated_linear_writes_silu_gate_times_up(kernels: ModuleType, bf16: bool) -> None:
    gen = torch.Generator().manual_seed(7)
    intermediate, hidden = 40, 24  # 40 is not a multiple of 16: a partial last panel
    weight, x = torch.randn(2 * intermediate, hidden, generator=gen), torch.randn(11, hidden, generator=gen)
    if bf16:
        weight = weight.bfloat16()
    packed = kernels.PackedLinear(weight, True, bf16)
    assert packed.out_features == intermediate and packed.gated
    assert torch.equal(packed.unpack(), weight.float())
    gate, up = (x @ weight.float().T).chunk(2, dim=-1)
    assert (packed(x) - F.silu(gate) * up).abs().max().item() < 1e-4


def test_gather_rows_reads_the_packed_head(kernels: ModuleType) -> None:
    gen = torch.Generator().manual_seed(3)
    table = torch.randn(70, 33, generator=gen)
    ids = torch.tensor([0, 69, 5, 5, 31, 32, 33])
    for weight, bf16 in ((table, False), (table.bfloat16(), True)):
        out = torch.empty(len(ids), 33)
        kernels.PackedLinear(weight, False, bf16).gather_rows(ids, out)
        assert torch.equal(out, weight.float()[ids])
    with pytest.raises(RuntimeError, match=r"gather_rows: id 70 outside \[0, 70\)"):
        kernels.PackedLinear(table, False, False).gather_rows(torch.tensor([70]), torch.empty(1, 33))


def test_packed_linear_rejects_wrong_shapes(kernels: ModuleType) -> None:
    packed = kernels.PackedLinear(torch.randn(8, 4), False, False)
    with pytest.raises(RuntimeError, match="x has 5 features, expected 4"):
        packed(torch.randn(2, 5))
    with pytest.raises(RuntimeError, match="the silu-mul epilogue is for gated weights"):
        packed.forward(torch.randn(2, 4), torch.empty(2, 8), SILU_MUL)


def test_rms_norm(kernels: ModuleType) -> None:
    gen = torch.Generator().manual_seed(0)
    for width in (8, 576, 1001):
        x, weight = torch.randn(13, width, generator=gen) * 3, torch.randn(width, generator=gen)
        out = torch.empty_like(x)
        kernels.rms_norm(x, weight, 1e-5, out)
        assert (out - F.rms_norm(x, (width,), weight, 1e-5)).abs().max().item() < 1e-5


def rotary_tables(positions: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.outer(torch.arange(positions).float(), inv_freq)
    return torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [8, 64])
def test_rotary_cache_rotates_and_writes_transposed_keys(
    kernels: ModuleType, dtype: torch.dtype, head_dim: int
) -> None:
    heads, kv_heads, block, blocks, tokens = 6, 2, 4, 5, 7
    gen = torch.Generator().manual_seed(head_dim)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen)
    positions = torch.tensor([0, 1, 2, 9, 10, 30, 31])
    slots = torch.tensor([4, 5, 6, 13, 14, 19, -1])  # -1: not written
    cos, sin = rotary_tables(32, head_dim)
    keys = torch.zeros(blocks, kv_heads, head_dim, block, dtype=dtype)
    values = torch.zeros(blocks, kv_heads, block, head_dim, dtype=dtype)
    original = qkv.clone()
    kernels.rotary_cache(qkv, positions, cos[:, : head_dim // 2].contiguous(), sin[:, : head_dim // 2].contiguous(),
                         slots, keys, values, heads)  # fmt: skip
    qk = original[:, : (heads + kv_heads) * head_dim].view(tokens, heads + kv_heads, head_dim)
    rotated = apply_rotary(qk, cos[positions].unsqueeze(1), sin[positions].unsqueeze(1))
    assert (qkv[:, : (heads + kv_heads) * head_dim].view_as(rotated) - rotated).abs().max().item() < 1e-5
    v = original[:, (heads + kv_heads) * head_dim :].view(tokens, kv_heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    for t, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        b, offset = divmod(slot, block)
        assert torch.equal(keys[b, :, :, offset], k[t].to(dtype))  # the rotated keys, each dimension a row
        assert torch.equal(values[b, :, offset, :], v[t].to(dtype))
    written = {divmod(s, block) for s in slots.tolist() if s >= 0}
    untouched = [(b, o) for b in range(blocks) for o in range(block) if (b, o) not in written]
    assert all(not keys[b, :, :, o].any() and not values[b, :, o].any() for b, o in untouched)


def dense_reference(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: list[int], window: int | None
) -> torch.Tensor:
    """q (T, H, D) at ``positions``; keys/values (L, KVH, D) at positions 0..L-1."""
    mask = window_mask(torch.tensor(positions), torch.arange(keys.shape[0]), window)
    return F.scaled_dot_product_attention(
        q.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1), attn_mask=mask, enable_gqa=True
    ).transpose(0, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "block", "window"),
    [(9, 3, 64, 16, None), (4, 1, 8, 4, 5), (8, 2, 16, 32, 20), (4, 4, 16, 16, 16)],
)
def test_paged_attention_equals_dense_softmax(
    kernels: ModuleType, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, block: int, window: int | None
) -> None:
    """Chunks of 1 (decode), a few and many queries (prefill, continued prefill), each sequence's
    history scattered over shuffled physical blocks; with a window, blocks wholly behind it are
    released (``first_block`` > 0) and their table entries gone."""
    rng = random.Random(heads * block)
    gen = torch.Generator().manual_seed(block)
    seq_lens = [1, 37, 70, 5, 130]  # total tokens per sequence, the chunk is the last few
    chunk_lens = [1, 37, 3, 1, 40]
    num_blocks = sum(-(-n // block) for n in seq_lens) + 1
    physical = list(range(1, num_blocks))
    rng.shuffle(physical)
    key_cache = torch.zeros(num_blocks, kv_heads, head_dim, block, dtype=dtype)
    value_cache = torch.zeros(num_blocks, kv_heads, block, head_dim, dtype=dtype)
    total = sum(chunk_lens)
    q = torch.randn(total, heads * head_dim + 2 * kv_heads * head_dim, generator=gen)
    meta: dict[str, list[int]] = {k: [] for k in ("row_start", "nq", "start", "first", "offset", "length", "tables")}
    expected = []
    row = 0
    for seq_len, chunk_len in zip(seq_lens, chunk_lens, strict=True):
        keys = torch.randn(seq_len, kv_heads, head_dim, generator=gen).to(dtype)
        values = torch.randn(seq_len, kv_heads, head_dim, generator=gen).to(dtype)
        table = [physical.pop() for _ in range(-(-seq_len // block))]
        for position in range(seq_len):
            b, offset = table[position // block], position % block
            key_cache[b, :, :, offset] = keys[position]
            value_cache[b, :, offset, :] = values[position]
        start = seq_len - chunk_len
        first = max(0, start - window + 1) // block if window else 0  # blocks behind every query's window
        meta["row_start"].append(row)
        meta["nq"].append(chunk_len)
        meta["start"].append(start)
        meta["first"].append(first)
        meta["offset"].append(len(meta["tables"]))
        meta["length"].append(len(table) - first)
        meta["tables"].extend(table[first:])
        chunk_q = q[row : row + chunk_len, : heads * head_dim].view(chunk_len, heads, head_dim)
        positions = list(range(start, seq_len))
        expected.append(dense_reference(chunk_q, keys.float(), values.float(), positions, window))
        row += chunk_len
    out = torch.full((total, heads * head_dim), float("nan"))
    t = {k: torch.tensor(v, dtype=torch.int64) for k, v in meta.items()}
    kernels.paged_attention(q, key_cache, value_cache, t["row_start"], t["nq"], t["start"], t["first"], t["offset"],
                            t["length"], t["tables"], heads, window or 0, head_dim**-0.5, out)  # fmt: skip
    reference = torch.cat(expected).reshape(total, heads * head_dim)
    assert (out - reference).abs().max().item() < 2e-5


def test_paged_attention_refuses_a_block_outside_the_table(kernels: ModuleType) -> None:
    key_cache, value_cache = torch.zeros(3, 1, 8, 4), torch.zeros(3, 1, 4, 8)
    ones = torch.ones(1, dtype=torch.int64)
    zero = torch.zeros(1, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="key block 1 is outside the block table of chunk 0"):
        kernels.paged_attention(torch.randn(1, 24), key_cache, value_cache, zero, ones, 5 * ones, zero, zero, ones,
                                ones, 1, 0, 1.0, torch.empty(1, 8))  # fmt: skip


def test_a_stale_build_lock_is_removed_and_a_fresh_one_waited_for(tmp_path: Path) -> None:
    """A build killed half-way leaves torch's lock file behind; torch would wait for it forever."""

    stale = tmp_path / "stale" / "lock"
    stale.parent.mkdir()
    stale.touch()
    old = time.time() - 3600
    os.utime(stale, (old, old))
    wait_for_build_lock(stale, stale_after=1200)
    assert not stale.exists()
    fresh = tmp_path / "fresh" / "lock"
    fresh.parent.mkdir()
    fresh.touch()
    threading.Timer(0.3, fresh.unlink).start()  # another process finishing its build
    start = time.monotonic()
    wait_for_build_lock(fresh, stale_after=1200, poll=0.05)
    assert time.monotonic() - start >= 0.25
