"""Tests for kernels/attention.py: each Triton kernel (interpreter mode on CPU) against its torch
reference, and the references against plain softmax attention over unpaged tensors."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run in interpreter mode on CPU

import math
from types import SimpleNamespace

import pytest
import torch

from kernels import attention

KV_HEADS, BLOCK_SIZE = 2, 16
PROMPT_LENS = [5, 23, 40]  # not multiples of BLOCK_SIZE: last blocks are partly used
CASES = [(torch.float32, 32, 2), (torch.bfloat16, 64, 3)]  # pool dtype, head_dim, query heads per kv head
TRITON = (attention.prefix_attention, attention.decode_attention, attention.merge_attention)
REFERENCE = (attention.reference_prefix_attention, attention.reference_decode_attention,
             attention.reference_merge_attention)


@pytest.fixture
def poisoned_empty():
    """In deterministic mode torch.empty fills float memory with NaN, so any output element a
    launcher allocates but its kernel never writes fails the comparison."""
    was_on = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    assert torch.empty(3).isnan().all()
    yield
    torch.use_deterministic_algorithms(was_on)


def make_case(dtype: torch.dtype, head_dim: int, rep: int, seed: int = 0) -> SimpleNamespace:
    """Three prompts with 1-5 rollouts each, paged into a shuffled pool whose unused slots hold NaN,
    with block tables padded by garbage, plus the unpaged keys and values of every sequence."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 6, (len(PROMPT_LENS),), generator=g)
    own_lens = torch.randint(1, 41, (int(counts.sum()),), generator=g)
    lens = PROMPT_LENS + own_lens.tolist()  # prompts first, then one sequence per rollout
    need = [-(-n // BLOCK_SIZE) for n in lens]
    free = torch.randperm(sum(need) + 4, generator=g).tolist()
    k_pool = torch.full((len(free), BLOCK_SIZE, KV_HEADS, head_dim), math.nan, dtype=dtype)
    v_pool = k_pool.clone()
    tables = torch.randint(-2**30, 2**30, (len(lens), max(need) + 2), generator=g, dtype=torch.int32)
    keys = [torch.randn(n, KV_HEADS, head_dim, generator=g).to(dtype) for n in lens]
    values = [torch.randn(n, KV_HEADS, head_dim, generator=g).to(dtype) for n in lens]
    for i, n in enumerate(lens):
        tables[i, :need[i]] = torch.tensor([free.pop() for _ in range(need[i])])
        pos = torch.arange(n)
        slots = tables[i, pos // BLOCK_SIZE].long() * BLOCK_SIZE + pos % BLOCK_SIZE
        attention.reference_write_kv(k_pool, v_pool, keys[i], values[i], slots)
    groups = len(PROMPT_LENS)
    return SimpleNamespace(
        q=torch.randn(len(own_lens), KV_HEADS * rep, head_dim, generator=g).to(dtype), k_pool=k_pool,
        v_pool=v_pool, group_start=(counts.cumsum(0) - counts).int(), group_count=counts.int(),
        prompt_len=torch.tensor(PROMPT_LENS, dtype=torch.int32), prompt_blocks=tables[:groups],
        seq_len=own_lens.int(), block_table=tables[groups:], keys=keys, values=values, rep=rep,
        scale=head_dim ** -0.5)


def prefix_args(c: SimpleNamespace) -> tuple:
    return c.q, c.k_pool, c.v_pool, c.group_start, c.group_count, c.prompt_len, c.prompt_blocks, c.scale


def decode_args(c: SimpleNamespace, num_splits: int) -> tuple:
    return c.q, c.k_pool, c.v_pool, c.seq_len, c.block_table, c.scale, num_splits


def dense_attention(c: SimpleNamespace) -> torch.Tensor:
    """Softmax attention of every row over [its prompt's keys, its own keys], from unpaged tensors."""
    groups = len(PROMPT_LENS)
    group_of_row = torch.repeat_interleave(torch.arange(groups), c.group_count.long())
    out = []
    for row, group in enumerate(group_of_row.tolist()):
        k = torch.cat([c.keys[group], c.keys[groups + row]]).float().repeat_interleave(c.rep, 1)
        v = torch.cat([c.values[group], c.values[groups + row]]).float().repeat_interleave(c.rep, 1)
        scores = torch.einsum("hd,khd->hk", c.q[row].float(), k) * c.scale
        out.append(torch.einsum("hk,khd->hd", scores.softmax(-1), v))
    return torch.stack(out)


@pytest.mark.parametrize("kernels", [REFERENCE, TRITON], ids=["reference", "triton"])
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("dtype, head_dim, rep", CASES)
def test_shared_prefix_plus_own_attention_equals_dense(kernels, num_splits, dtype, head_dim, rep):
    prefix, decode, merge = kernels
    c = make_case(dtype, head_dim, rep, seed=num_splits)
    o1, lse1 = prefix(*prefix_args(c))
    o2, lse2 = decode(*decode_args(c, num_splits))
    o = merge(o1, lse1, o2, lse2, torch.float32)
    torch.testing.assert_close(o, dense_attention(c), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype, head_dim, rep", CASES + [(torch.float32, 48, 3)])
def test_prefix_kernel_matches_reference(dtype, head_dim, rep, poisoned_empty):
    c = make_case(dtype, head_dim, rep, seed=head_dim)
    o, lse = attention.prefix_attention(*prefix_args(c))
    o_ref, lse_ref = attention.reference_prefix_attention(*prefix_args(c))
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, lse_ref, atol=1e-5, rtol=1e-5)


def test_prefix_kernel_splits_a_big_group_into_query_tiles(poisoned_empty):
    c = make_case(torch.float32, 32, 3)
    c.q = torch.randn(30, 6, 32)  # one group of 30 rollouts: 90 query vectors, two tiles of 64
    c.group_start, c.group_count = torch.tensor([0, 30, 30], dtype=torch.int32), torch.tensor([30, 0, 0]).int()
    o, lse = attention.prefix_attention(*prefix_args(c))
    o_ref, lse_ref = attention.reference_prefix_attention(*prefix_args(c))
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, lse_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("dtype, head_dim, rep", CASES)
def test_decode_kernel_matches_reference(num_splits, dtype, head_dim, rep, poisoned_empty):
    c = make_case(dtype, head_dim, rep, seed=10 + num_splits)
    o, lse = attention.decode_attention(*decode_args(c, num_splits))
    o_ref, lse_ref = attention.reference_decode_attention(*decode_args(c, num_splits))
    assert lse_ref.isinf().any() == (num_splits > 1)  # 3 splits of 1-3 blocks leave some splits empty
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, lse_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_merge_kernel_matches_reference(out_dtype, poisoned_empty):
    g = torch.Generator().manual_seed(0)
    rows, heads, splits, head_dim = 7, 6, 3, 32
    lse = torch.randn(rows, heads, splits + 1, generator=g) * 3
    empty = torch.rand(rows, heads, splits + 1, generator=g) < 0.5
    empty[..., 1] = False  # some part of every row has keys
    lse = lse.masked_fill(empty, -math.inf)
    o = torch.randn(rows, heads, splits + 1, head_dim, generator=g).masked_fill(empty[..., None], 0.0)
    args = (o[:, :, 0], lse[..., 0], o[:, :, 1:], lse[..., 1:], out_dtype)
    out, out_ref = attention.merge_attention(*args), attention.reference_merge_attention(*args)
    assert out.dtype == out_dtype
    # The interpreter truncates float32 to bfloat16 where CUDA rounds to nearest: allow one bf16 step.
    tol = 1e-5 if out_dtype == torch.float32 else 2 ** -7
    torch.testing.assert_close(out.float(), out_ref.float(), atol=1e-5, rtol=tol)


@pytest.mark.parametrize("write", [attention.write_kv, attention.reference_write_kv], ids=["triton", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_matches_indexing(write, dtype):
    g = torch.Generator().manual_seed(0)
    k_pool = torch.randn(5, BLOCK_SIZE, KV_HEADS, 32, generator=g).to(dtype)
    v_pool = torch.randn(5, BLOCK_SIZE, KV_HEADS, 32, generator=g).to(dtype)
    k, v = (torch.randn(20, KV_HEADS, 32, generator=g).to(dtype) for _ in range(2))
    slots = torch.randperm(5 * BLOCK_SIZE, generator=g)[:20]
    expected_k, expected_v = k_pool.clone(), v_pool.clone()
    expected_k[slots // BLOCK_SIZE, slots % BLOCK_SIZE] = k
    expected_v[slots // BLOCK_SIZE, slots % BLOCK_SIZE] = v
    write(k_pool, v_pool, k, v, slots)
    assert torch.equal(k_pool, expected_k) and torch.equal(v_pool, expected_v)
