"""Shared-prefix attention over a paged KV pool (DESIGN.md): a decode query attends to its prompt's keys, stored
once for all of the prompt's rollouts, and to its own keys; the partials merge by their log-sum-exps.

    o1, lse1 = prefix_attention(q, k_pool, v_pool, group_start, group_count, prompt_len, prompt_blocks, scale)
    o2, lse2 = decode_attention(q, k_pool, v_pool, seq_len, block_table, scale, num_splits)
    o = merge_attention(o1, lse1, o2, lse2, q.dtype)

A layer's pool is [num_blocks, block_size (a power of two >= 16), kv_heads, head_dim]; position p of a sequence
with block-table row `table` is slot table[p // block_size] * block_size + p % block_size. Rows are sorted by
prompt: group g owns group_count[g] rows from group_start[g]. Each launcher's torch `reference_*` twin (same
signature) is the CPU's path and the kernels' reference; it reads whole blocks, so slots past a length must be
finite (the sampler zeroes blocks it hands out).
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_attention_kernel(q_ptr, k_pool_ptr, v_pool_ptr, o_ptr, lse_ptr, group_start_ptr, group_count_ptr,
                            seq_len_ptr, table_ptr, table_stride, scale, num_splits,
                            KV_HEADS: tl.constexpr, REP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                            BLOCK_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One program: BLOCK_Q query vectors of a group against one split of its blocks, each read once."""
    group, tile = tl.program_id(0), tl.program_id(2)
    kv_head, split = tl.program_id(1) // num_splits, tl.program_id(1) % num_splits
    count = tl.load(group_count_ptr + group)
    if tile * BLOCK_Q >= count * REP:
        return
    i = tile * BLOCK_Q + tl.arange(0, BLOCK_Q)  # query vector index within the group
    row_head = (tl.load(group_start_ptr + group) + i // REP) * (KV_HEADS * REP) + kv_head * REP + i % REP
    i_valid = i < count * REP
    d = tl.arange(0, D_PAD)
    mask = i_valid[:, None] & (d < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + row_head[:, None] * HEAD_DIM + d[None, :], mask=mask, other=0.0).to(tl.float32)

    seq_len = tl.load(seq_len_ptr + group)
    num_blocks = tl.cdiv(seq_len, BLOCK_SIZE)
    per_split = tl.cdiv(num_blocks, num_splits)
    first = tl.minimum(split * per_split, num_blocks)
    last = tl.minimum(first + per_split, num_blocks)
    # online softmax of q over the blocks table[first:last]: unnormalised o (acc), running max m and sum l
    offset = tl.arange(0, BLOCK_SIZE)
    m = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_Q], tl.float32)
    acc = tl.zeros([BLOCK_Q, D_PAD], tl.float32)
    for b in range(first, last):
        # int64: block * block_size * kv_heads * head_dim overflows int32 in a large pool.
        block = tl.load(table_ptr + group * table_stride + b).to(tl.int64)
        key_valid = b * BLOCK_SIZE + offset < seq_len
        slot = ((block * BLOCK_SIZE + offset) * KV_HEADS + kv_head) * HEAD_DIM
        # other=0 matters: the unused tail of the last block may hold anything, NaN included.
        k_t = tl.load(k_pool_ptr + slot[None, :] + d[:, None],  # [D_PAD, BLOCK_SIZE], loaded transposed
                      mask=(d < HEAD_DIM)[:, None] & key_valid[None, :], other=0.0).to(tl.float32)
        v = tl.load(v_pool_ptr + slot[:, None] + d[None, :],
                    mask=key_valid[:, None] & (d < HEAD_DIM)[None, :], other=0.0).to(tl.float32)
        s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * scale
        s = tl.where(key_valid[None, :], s, float("-inf"))
        # Every visited block holds at least one key, so m_new is finite and no inf - inf occurs.
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
        m = m_new
    # A split with no keys (l = 0) writes o = 0, lse = -inf: it weighs nothing in the merge.
    has_keys = l > 0
    l = tl.where(has_keys, l, 1.0)
    o = acc / l[:, None]
    lse = tl.where(has_keys, m + tl.log(l), float("-inf"))
    out = row_head * num_splits + split
    tl.store(o_ptr + out[:, None] * HEAD_DIM + d[None, :], o, mask=mask)
    tl.store(lse_ptr + out, lse, mask=i_valid)


def _paged_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, group_start: torch.Tensor,
                     group_count: torch.Tensor, seq_len: torch.Tensor, block_table: torch.Tensor, scale: float,
                     num_splits: int, max_count: int,
                     rows_outside_groups: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One program per (group, kv head x split, query tile); rows outside groups: o 0, lse -inf."""
    rows, heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_pool.shape
    assert heads % kv_heads == 0 and block_size >= 16 and block_size & (block_size - 1) == 0, \
        f"need heads ({heads}) divisible by kv_heads ({kv_heads}) and a power-of-two block_size >= 16 ({block_size})"
    assert k_pool.is_contiguous() and v_pool.is_contiguous(), "the KV pools must be contiguous"
    tile_rows = max_count * (heads // kv_heads)  # the query vectors of a kv head in the largest group: tiles of <= 64
    block_q = min(64, max(16, triton.next_power_of_2(tile_rows)))
    o = torch.empty(rows, heads, num_splits, head_dim, device=q.device, dtype=torch.float32)
    lse = torch.empty(rows, heads, num_splits, device=q.device, dtype=torch.float32)
    if rows_outside_groups:
        o.zero_()
        lse.fill_(float("-inf"))
    table = block_table.contiguous()
    # tf32 holds bf16/fp16 q and k exactly (and rounds p to 10 bits); only float32 inputs need ieee.
    precision = "ieee" if torch.float32 in (q.dtype, k_pool.dtype) else "tf32"
    _paged_attention_kernel[(group_start.numel(), kv_heads * num_splits, triton.cdiv(tile_rows, block_q))](
        q.contiguous(), k_pool, v_pool, o, lse, group_start, group_count, seq_len, table, table.stride(0), scale,
        num_splits, KV_HEADS=kv_heads, REP=heads // kv_heads, HEAD_DIM=head_dim,
        D_PAD=max(16, triton.next_power_of_2(head_dim)), BLOCK_SIZE=block_size, BLOCK_Q=block_q,
        DOT_PRECISION=precision)
    return o, lse


def prefix_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, group_start: torch.Tensor,
                     group_count: torch.Tensor, prompt_len: torch.Tensor, prompt_blocks: torch.Tensor,
                     scale: float, max_count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of every row over its prompt's keys: o [R, heads, d], lse [R, heads], float32. max_count bounds
    the largest group (None: read from group_count, a host sync a CUDA graph avoids). No group: o 0, lse -inf."""
    o, lse = _paged_attention(q, k_pool, v_pool, group_start, group_count, prompt_len, prompt_blocks, scale, 1,
                              int(group_count.max()) if max_count is None else max_count, rows_outside_groups=True)
    return o.squeeze(2), lse.squeeze(2)


def decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, seq_len: torch.Tensor,
                     block_table: torch.Tensor, scale: float, num_splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each row over its own tokens in num_splits chunks: o [R, heads, S, d], lse [R, heads, S]."""
    # Decode is the grouped computation with one row per group and the row's own block table.
    starts = torch.arange(q.shape[0], device=q.device, dtype=torch.int32)
    return _paged_attention(q, k_pool, v_pool, starts, torch.ones_like(starts), seq_len, block_table, scale,
                            num_splits, 1)


# ---- plain torch: the sampler's path off CUDA, and what the kernels are tested against ----

def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
                     flash: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T x scale + mask) v and its log-sum-exp in float32, q [N, H, M, d], k and v [N, H, keys, d] (any
    strides), mask [N, 1, M or 1, keys] of 0 and -inf: torch's CPU flash attention on a CPU (flash=None), plain
    products elsewhere. The products are float32's, or the pools' dtype within a compiled step (bf16 ones on a CPU
    with bf16 units, as HF's attention computes them). A query with every key masked gets o = 0, lse = -inf."""
    empty = mask.isneginf().all(-1)
    dtype = k.dtype if torch.compiler.is_compiling() else torch.float32
    q, k, v, mask = q.to(dtype), k.to(dtype), v.to(dtype), mask.to(dtype)
    if q.device.type == "cpu" if flash is None else flash:
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=mask.expand(-1, -1, q.shape[2], -1), scale=scale)
    else:
        scores = (q @ k.transpose(-1, -2)).float() * scale + mask
        lse = scores.logsumexp(-1)
        o = (scores - torch.where(empty, 0.0, lse)[..., None]).exp().to(dtype) @ v  # exp(-inf - 0) = 0, not NaN
    return o.float(), lse.masked_fill(empty, float("-inf"))


def _paged_keys(k_pool: torch.Tensor, v_pool: torch.Tensor, table: torch.Tensor, length: torch.Tensor,
                splits: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's keys and values as whole blocks of its table row, [N, kv_heads, blocks x block_size, d],
    and a mask [N, 1, splits, keys]: 0 on a key below length[n] in split s's blocks, -inf elsewhere. A table column
    past a row's last block may hold anything: its first block is read there instead, masked."""
    block_size, dev = k_pool.shape[1], table.device
    used = (length.long() + (block_size - 1)) // block_size  # blocks of each row
    n = table.shape[1]
    blocks = torch.where(torch.arange(n, device=dev) < used[:, None], table, table[:, :1]).long()
    k, v = (pool[blocks].flatten(1, 2).transpose(1, 2) for pool in (k_pool, v_pool))
    key = torch.arange(n * block_size, device=dev)
    valid = key < length[:, None, None]  # [N, 1, keys]
    if splits > 1:  # split s: a row's blocks [s x per, (s + 1) x per)
        per = ((used + splits - 1) // splits).clamp_min(1)[:, None, None]
        valid = valid & (key // block_size // per == torch.arange(splits, device=dev)[:, None])
    return k, v, torch.where(valid, 0.0, float("-inf"))[:, None]


def reference_prefix_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, group_start: torch.Tensor,
                               group_count: torch.Tensor, prompt_len: torch.Tensor, prompt_blocks: torch.Tensor,
                               scale: float, max_count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch twin of prefix_attention: each group's rows attend to their prompt in one call."""
    rows, heads, d = q.shape
    groups, kv = len(group_start), k_pool.shape[2]
    rep, width = heads // kv, int(group_count.max()) if max_count is None else max_count
    place = torch.arange(width, device=q.device)
    row_of = torch.where(place < group_count[:, None], group_start[:, None].long() + place, rows).flatten()
    qf = torch.cat([q.float(), q.new_zeros(1, heads, d, dtype=torch.float32)])[row_of]  # row `rows`: no row
    qg = qf.view(groups, width, kv, rep, d).transpose(1, 2).reshape(groups, kv, width * rep, d)
    o, lse = masked_attention(qg, *_paged_keys(k_pool, v_pool, prompt_blocks, prompt_len), scale)
    o_rows = q.new_zeros(rows + 1, heads, d, dtype=torch.float32)
    lse_rows = torch.full((rows + 1, heads), float("-inf"), device=q.device)
    o_rows[row_of] = o.view(groups, kv, width, rep, d).transpose(1, 2).reshape(-1, heads, d)
    lse_rows[row_of] = lse.view(groups, kv, width, rep).transpose(1, 2).reshape(-1, heads)
    return o_rows[:rows], lse_rows[:rows]


def reference_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, seq_len: torch.Tensor,
                               block_table: torch.Tensor, scale: float,
                               num_splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch twin of decode_attention (the sampler's torch path takes 1 split)."""
    rows, heads, d = q.shape
    kv = k_pool.shape[2]
    rep = heads // kv
    k, v, mask = _paged_keys(k_pool, v_pool, block_table, seq_len, num_splits)
    qs = q.float().view(rows, kv, 1, rep, d).expand(-1, -1, num_splits, -1, -1).reshape(rows, kv, -1, d)
    o, lse = masked_attention(qs, k, v, mask if num_splits == 1 else mask.repeat_interleave(rep, 2), scale)
    return (o.view(rows, kv, num_splits, rep, d).transpose(2, 3).reshape(rows, heads, num_splits, d),
            lse.view(rows, kv, num_splits, rep).transpose(2, 3).reshape(rows, heads, num_splits))


def merge_attention(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor,
                    out_dtype: torch.dtype) -> torch.Tensor:
    """The prefix partial and S decode partials merged into o [R, heads, d] (a part of each row has keys), on every
    device: o = sum_i exp(lse_i - logsumexp(lse)) o_i (torch ops; CUDA graphs replay them, a compiler fuses them)."""
    lse = torch.cat([lse1[..., None], lse2], -1)
    o = torch.cat([o1[:, :, None], o2], 2)
    weight = (lse - lse.logsumexp(-1, keepdim=True)).exp()
    return (weight[..., None] * o).sum(2).to(out_dtype)


def write_kv(k_pool: torch.Tensor, v_pool: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """Write k, v [T, kv_heads, d] into the pools' slots [T] in place, on every device (an indexed copy, which CUDA
    graphs capture); view, not reshape, so a non-contiguous pool fails instead of writing a copy."""
    k_pool.view(-1, *k_pool.shape[2:])[slots] = k
    v_pool.view(-1, *v_pool.shape[2:])[slots] = v
