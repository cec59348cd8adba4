"""fanout's kernel tests: every Triton kernel against its torch twin on fresh random inputs,
outputs poisoned first, and the sampler with the kernels against the sampler with the twins.

On CPU they run in Triton's interpreter as part of `./run.sh test` (test_all.py imports them);
on a GPU, `./run.sh gpu-check` runs them compiled:
    TRITON_INTERPRET=0 FANOUT_TEST_DEVICE=cuda python3 -m pytest -q kernels/test_kernels.py kernels/test_logprob.py
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the interpreter on CPU

import json
import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode

from forward import ModelConfig
from kernels import attention
from kernels.attention import masked_attention
from kernels.sampling import hash32, reference_sample, sample
from rollout import Sampler

DEVICE = os.environ.get("FANOUT_TEST_DEVICE", "cpu")


# ---- tiny models built from config objects (no download) ----

def tiny_config(kind: str):
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    if kind == "llama":
        return transformers.LlamaConfig(**common, tie_word_embeddings=False)
    if kind == "qwen2":  # biases on q/k/v
        return transformers.Qwen2Config(**common, tie_word_embeddings=True)
    if kind == "qwen3":  # q/k norms, head_dim decoupled from hidden/heads
        return transformers.Qwen3Config(**common, head_dim=32, tie_word_embeddings=False)
    raise ValueError(kind)


def tiny_model(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(kind)).float().eval()
    with torch.no_grad():  # HF's init leaves biases at zero; make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def random_prompts(vocab, lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


# ---- sampling ----

@pytest.fixture
def poisoned_empty():
    """In deterministic mode torch.empty fills floats with NaN and ints with their maximum, so any
    output element a launcher allocates but its kernel never writes fails the comparison."""
    was_on = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    assert torch.empty(3).isnan().all() and (torch.empty(3, dtype=torch.long) == torch.iinfo(torch.long).max).all()
    yield
    torch.use_deterministic_algorithms(was_on)


def random_logits(B: int, V: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    logits = torch.randn(B, V, generator=gen) * 3
    logits[0, :V - 100] = -float("inf")  # whole tiles masked, as top-p or a vocab mask leaves them
    logits[1, torch.randint(0, V, (V // 4,), generator=gen)] = -float("inf")
    return logits.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [1000, 3000, 5000])
def test_triton_sample_matches_reference(poisoned_empty, dtype, V):
    """Also with the temperature as a one-element tensor, as a CUDA graph hands it over to be read at replay, and
    with keys as uint32 values in int64 or as their bits in int32 (as sample_keys makes them)."""
    gen = torch.Generator().manual_seed(V)
    for temperature in (0.0, 0.7, 1.0, 1.3):
        logits = random_logits(6, V, dtype, gen).to(DEVICE)
        keys = torch.randint(0, 2 ** 32, (6,), generator=gen).to(DEVICE)
        keys = keys.int() if temperature in (0.7, 1.3) else keys
        tokens, logprob, entropy = sample(logits, keys, torch.tensor([temperature], device=DEVICE)
                                          if temperature == 1.3 else temperature)
        ref_tokens, ref_logprob, ref_entropy = reference_sample(logits, keys, temperature)
        assert torch.equal(tokens, ref_tokens), (temperature, tokens, ref_tokens)
        torch.testing.assert_close(logprob, ref_logprob, atol=1e-4, rtol=0)
        torch.testing.assert_close(entropy, ref_entropy, atol=1e-4, rtol=0)


def test_largest_hash_gives_no_infinite_noise():
    key, token = 1743, 276  # hash32(hash32(276) ^ 1743) >> 8 is 2^24 - 1, the largest value
    raw = (hash32(hash32(torch.tensor([token])) ^ key) >> 8) & 0xFFFFFF  # int32 bits: the logical shift
    assert raw.item() == 2 ** 24 - 1 and (raw.float() + 0.5).item() * 2 ** -24 == 1.0  # float32 rounds up to 1
    logits = torch.zeros(1, 1000)
    logits[0, token] = -30.0  # softmax gives it ~1e-16: it must not be drawn
    keys = torch.tensor([key])
    assert reference_sample(logits, keys, 1.0)[0].item() != token
    assert sample(logits.to(DEVICE), keys.to(DEVICE), 1.0)[0].item() != token


def test_reference_follows_tempered_softmax():
    N, V, temperature = 20000, 50, 0.7
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(V, generator=gen) * 1.5).expand(N, V)
    keys = torch.randint(0, 2 ** 32, (N,), generator=gen)
    tokens, logprob, entropy = reference_sample(logits, keys, temperature)
    p = (logits[0] / temperature).softmax(-1)
    counts = torch.bincount(tokens, minlength=V).float()
    assert ((counts - N * p).abs() <= 4 * (N * p * (1 - p)).sqrt() + 1).all()
    torch.testing.assert_close(logprob, p.log()[tokens])
    torch.testing.assert_close(entropy, torch.full((N,), -(p * p.log()).sum().item()))


def test_greedy_picks_first_argmax():
    logits = torch.randn(3, 3000, device=DEVICE)
    logits[0, [5, 7]] = 10.0        # a tie inside one tile
    logits[1, [100, 2500]] = 10.0   # a tie across tiles (2048 wide)
    logits[2, 2999] = 10.0          # the maximum in the masked tail tile
    keys = torch.zeros(3, dtype=torch.long, device=DEVICE)
    expected = torch.tensor([5, 100, 2999], device=DEVICE)
    for tokens, token_logprob, _ in (reference_sample(logits, keys, 0.0), sample(logits, keys, 0.0)):
        assert torch.equal(tokens, expected)
        torch.testing.assert_close(token_logprob, logits.log_softmax(-1)[torch.arange(3, device=DEVICE), expected])


KV_HEADS, BLOCK_SIZE = 2, 16
PROMPT_LENS = [5, 23, 40]  # not multiples of BLOCK_SIZE: last blocks are partly used
CASES = [(torch.float32, 32, 2), (torch.bfloat16, 64, 3)]  # pool dtype, head_dim, query heads per kv head
TRITON = (attention.prefix_attention, attention.decode_attention, attention.merge_attention)
REFERENCE = (attention.reference_prefix_attention, attention.reference_decode_attention, attention.merge_attention)


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
        attention.write_kv(k_pool, v_pool, keys[i], values[i], slots)
    groups = len(PROMPT_LENS)
    on = lambda x: x.to(DEVICE)
    return SimpleNamespace(
        q=on(torch.randn(len(own_lens), KV_HEADS * rep, head_dim, generator=g).to(dtype)), k_pool=on(k_pool),
        v_pool=on(v_pool), group_start=on((counts.cumsum(0) - counts).int()), group_count=on(counts.int()),
        prompt_len=on(torch.tensor(PROMPT_LENS, dtype=torch.int32)), prompt_blocks=on(tables[:groups]),
        seq_len=on(own_lens.int()), block_table=on(tables[groups:]), keys=keys, values=values, rep=rep,
        scale=head_dim ** -0.5)


def prefix_args(c: SimpleNamespace) -> tuple:
    return c.q, c.k_pool, c.v_pool, c.group_start, c.group_count, c.prompt_len, c.prompt_blocks, c.scale


def decode_args(c: SimpleNamespace, num_splits: int) -> tuple:
    return c.q, c.k_pool, c.v_pool, c.seq_len, c.block_table, c.scale, num_splits


def zeroed(args: tuple) -> tuple:
    """The torch twins read whole blocks, so a slot never written must hold 0, as the sampler leaves it (its blocks
    are zeroed as they are handed out); the kernels get the NaN-poisoned pools, the twins these."""
    q, k_pool, v_pool, *rest = args
    return (q, k_pool.nan_to_num(0.0), v_pool.nan_to_num(0.0), *rest)


def dense_attention(c: SimpleNamespace) -> torch.Tensor:
    """Softmax attention of every row over [its prompt's keys, its own keys], from unpaged tensors."""
    groups = len(PROMPT_LENS)
    group_of_row = torch.repeat_interleave(torch.arange(groups), c.group_count.long().cpu())
    out = []
    for row, group in enumerate(group_of_row.tolist()):
        k = torch.cat([c.keys[group], c.keys[groups + row]]).float().repeat_interleave(c.rep, 1)
        v = torch.cat([c.values[group], c.values[groups + row]]).float().repeat_interleave(c.rep, 1)
        scores = torch.einsum("hd,khd->hk", c.q[row].float().cpu(), k) * c.scale
        out.append(torch.einsum("hk,khd->hd", scores.softmax(-1), v))
    return torch.stack(out).to(DEVICE)


@pytest.mark.parametrize("kernels", [REFERENCE, TRITON], ids=["reference", "triton"])
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("dtype, head_dim, rep", CASES)
def test_shared_prefix_plus_own_attention_equals_dense(kernels, num_splits, dtype, head_dim, rep):
    prefix, decode, merge = kernels
    c = make_case(dtype, head_dim, rep, seed=num_splits)
    inputs = zeroed if kernels is REFERENCE else (lambda args: args)
    o1, lse1 = prefix(*inputs(prefix_args(c)))
    o2, lse2 = decode(*inputs(decode_args(c, num_splits)))
    o = merge(o1, lse1, o2, lse2, torch.float32)
    torch.testing.assert_close(o, dense_attention(c), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype, head_dim, rep", CASES)
def test_reference_padding_row_sees_only_its_own_keys(dtype, head_dim, rep):
    """The sampler's torch path, as a padded decode step leaves it: a row after the grouped ones belongs to no
    group, so its prompt part has no keys and it attends to its own key alone; the other rows are unchanged."""
    c = make_case(dtype, head_dim, rep, seed=5)
    c.q = torch.cat([c.q, torch.randn_like(c.q[:1])])
    c.seq_len, c.block_table = torch.cat([c.seq_len, c.seq_len.new_ones(1)]), torch.cat([c.block_table,
                                                                                         c.block_table[:1]])
    o1, lse1 = attention.reference_prefix_attention(*zeroed(prefix_args(c)), max_count=int(c.group_count.max()))
    o2, lse2 = attention.reference_decode_attention(*zeroed(decode_args(c, 1)))
    o = attention.merge_attention(o1, lse1, o2, lse2, dtype)
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7  # the bf16 output's rounding
    torch.testing.assert_close(o[:-1].float(), dense_attention(c), atol=tol, rtol=tol)
    own = c.values[len(PROMPT_LENS)][0].float().repeat_interleave(c.rep, 0).to(DEVICE)  # the first rollout's first
    torch.testing.assert_close(o[-1].float(), own, atol=tol, rtol=tol)


@pytest.mark.parametrize("flash", [True, False, "compiled"])
def test_masked_attention_paths_agree(flash):
    """torch's CPU flash attention (the sampler's CPU path), the plain products (its path on a GPU) and, within a
    compiled step, flash attention in bf16 keys' dtype all give softmax attention with an additive mask and its
    log-sum-exp in float32, on strided keys."""
    g = torch.Generator().manual_seed(11)
    q = torch.randn(5, 3, 4, 32, generator=g)
    k, v = (torch.randn(5, 40, 3, 32, generator=g).transpose(1, 2) for _ in range(2))  # [N, heads, keys, d], strided
    tol = 1e-5
    if flash == "compiled":  # bf16 keys, values and queries; the reference on the same rounded values
        q, k, v, tol = q.bfloat16().float(), k.bfloat16(), v.bfloat16(), 2 ** -7
    valid = torch.arange(40) < torch.randint(1, 41, (5,), generator=g)[:, None, None]
    valid = valid.expand(5, 4, 40).clone()
    valid[1, 2] = False  # a query with no key at all: o = 0, lse = -inf, never NaN
    mask = torch.zeros(5, 1, 4, 40).masked_fill(~valid[:, None], float("-inf"))
    o, lse = torch.compile(masked_attention)(q, k, v, mask, 0.2) if flash == "compiled" else \
        masked_attention(q, k, v, mask, 0.2, flash=flash)
    assert o.dtype == lse.dtype == torch.float32
    k, v = k.float(), v.float()
    scores = (q @ k.transpose(-1, -2) * 0.2).masked_fill(~valid[:, None], float("-inf"))
    scores[1, :, 2] = 0.0  # finite, so the others' reference has no NaN; that query's is set below
    want_o, want_lse = scores.softmax(-1) @ v, scores.logsumexp(-1)
    want_o[1, :, 2], want_lse[1, :, 2] = 0.0, -math.inf
    torch.testing.assert_close(o, want_o, atol=tol, rtol=tol)
    torch.testing.assert_close(lse, want_lse, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype, head_dim, rep", CASES + [(torch.float32, 48, 3)])
def test_prefix_kernel_matches_reference(dtype, head_dim, rep, poisoned_empty):
    c = make_case(dtype, head_dim, rep, seed=head_dim)
    o, lse = attention.prefix_attention(*prefix_args(c))
    o_ref, lse_ref = attention.reference_prefix_attention(*zeroed(prefix_args(c)))
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, lse_ref, atol=1e-5, rtol=1e-5)


def test_prefix_kernel_splits_a_big_group_into_query_tiles(poisoned_empty):
    c = make_case(torch.float32, 32, 3)
    c.q = torch.randn(30, 6, 32, device=DEVICE)  # one group of 30 rollouts: 90 query vectors, two tiles of 64
    c.group_start = torch.tensor([0, 30, 30], dtype=torch.int32, device=DEVICE)
    c.group_count = torch.tensor([30, 0, 0], dtype=torch.int32, device=DEVICE)
    o, lse = attention.prefix_attention(*prefix_args(c))
    o_ref, lse_ref = attention.reference_prefix_attention(*zeroed(prefix_args(c)))
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, lse_ref, atol=1e-5, rtol=1e-5)


def test_prefix_kernel_gives_rows_outside_groups_no_keys(poisoned_empty):
    """A CUDA graph pads rows (and groups of 0 rows) onto a decode step; no group owns the extra rows, and
    both versions must give them o = 0, lse = -inf, never uninitialised memory."""
    c = make_case(torch.bfloat16, 64, 3, seed=7)
    pad_rows, rows = 3, c.q.shape[0]
    c.q = torch.cat([c.q, torch.randn(pad_rows, *c.q.shape[1:], device=DEVICE).to(c.q.dtype)])
    c.group_start = torch.cat([c.group_start, c.group_start.new_full((2,), rows)])
    c.group_count = torch.cat([c.group_count, c.group_count.new_zeros(2)])
    c.prompt_len = torch.cat([c.prompt_len, c.prompt_len.new_ones(2)])
    c.prompt_blocks = torch.cat([c.prompt_blocks, c.prompt_blocks[:2]])
    for prefix, inputs in ((attention.reference_prefix_attention, zeroed), (attention.prefix_attention, tuple)):
        o, lse = prefix(*inputs(prefix_args(c)))
        assert (o[rows:] == 0).all() and (lse[rows:] == -math.inf).all() and lse[:rows].isfinite().all()
    o_ref, lse_ref = attention.reference_prefix_attention(*zeroed(prefix_args(c)))
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, lse_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("dtype, head_dim, rep", CASES)
def test_decode_kernel_matches_reference(num_splits, dtype, head_dim, rep, poisoned_empty):
    c = make_case(dtype, head_dim, rep, seed=10 + num_splits)
    o, lse = attention.decode_attention(*decode_args(c, num_splits))
    o_ref, lse_ref = attention.reference_decode_attention(*zeroed(decode_args(c, num_splits)))
    assert lse_ref.isinf().any() == (num_splits > 1)  # 3 splits of 1-3 blocks leave some splits empty
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, lse_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_merge_is_attention_over_all_the_parts_keys(out_dtype):
    """Partials over disjoint key sets (some empty: o 0, lse -inf) merge into attention over their union."""
    g = torch.Generator().manual_seed(0)
    rows, heads, parts, keys, head_dim = 7, 6, 4, 5, 32
    q = torch.randn(rows, heads, head_dim, generator=g)
    k, v = torch.randn(2, rows, heads, parts, keys, head_dim, generator=g)
    present = torch.rand(rows, heads, parts, generator=g) < 0.5
    present[..., 1] = True  # some part of every row has keys
    scores = torch.einsum("rhd,rhpkd->rhpk", q, k)
    lse = scores.logsumexp(-1).masked_fill(~present, -math.inf)
    o = torch.einsum("rhpk,rhpkd->rhpd", scores.softmax(-1), v).masked_fill(~present[..., None], 0.0)
    union = scores.masked_fill(~present[..., None], -math.inf).flatten(2).softmax(-1)
    expected = torch.einsum("rhn,rhnd->rhd", union, v.flatten(2, 3))
    o, lse = o.to(DEVICE), lse.to(DEVICE)
    out = attention.merge_attention(o[:, :, 0], lse[..., 0], o[:, :, 1:], lse[..., 1:], out_dtype)
    assert out.dtype == out_dtype
    tol = 1e-5 if out_dtype == torch.float32 else 2 ** -7  # the bf16 output's rounding
    torch.testing.assert_close(out.float().cpu(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_matches_indexing(dtype):
    g = torch.Generator().manual_seed(0)
    k_pool = torch.randn(5, BLOCK_SIZE, KV_HEADS, 32, generator=g).to(dtype)
    v_pool = torch.randn(5, BLOCK_SIZE, KV_HEADS, 32, generator=g).to(dtype)
    k, v = (torch.randn(20, KV_HEADS, 32, generator=g).to(dtype) for _ in range(2))
    slots = torch.randperm(5 * BLOCK_SIZE, generator=g)[:20]
    k_pool, v_pool, k, v, slots = (x.to(DEVICE) for x in (k_pool, v_pool, k, v, slots))
    expected_k, expected_v = k_pool.clone(), v_pool.clone()
    expected_k[slots // BLOCK_SIZE, slots % BLOCK_SIZE] = k
    expected_v[slots // BLOCK_SIZE, slots % BLOCK_SIZE] = v
    attention.write_kv(k_pool, v_pool, k, v, slots)
    assert torch.equal(k_pool, expected_k) and torch.equal(v_pool, expected_v)


# ---- the sampler with the kernels ----

def test_sampler_with_triton_kernels_matches_reference_path():
    """The whole decode loop with every Triton kernel (and, on a GPU, CUDA graphs) gives the
    reference path's rollouts."""
    model = tiny_model("llama", seed=9)
    config, weights = ModelConfig.from_hf(model.config), model.state_dict()
    prompts = random_prompts(256, [20, 35], seed=4)
    kwargs = dict(max_new_tokens=6, temperature=1.0, seed=5)
    reference = Sampler(config, weights, DEVICE, dtype=torch.float32, use_triton=False, cuda_graphs=False)
    triton = Sampler(config, weights, DEVICE, dtype=torch.float32, use_triton=True)  # CUDA graphs on a GPU
    want, got = (s.generate(prompts, [2, 3], **kwargs) for s in (reference, triton))
    assert got.tokens == want.tokens
    for a, b in zip(got.logprobs + got.entropies, want.logprobs + want.entropies):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert bool(triton.graphs) == triton.cuda_graphs == (DEVICE == "cuda")  # captured, not fallen back


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU the graph replays; the test above covers it")
def test_padded_decode_rows_feed_no_nan_to_sampling(poisoned_empty):
    """The CUDA-graph path with the Triton kernels, run eagerly on CPU: decode steps padded to powers of
    two (3 and 5 running rollouts become 4 and 8 rows), the KV pool and every new buffer poisoned with NaN.
    Every row the sampling kernel sees, padding included, has finite logits, and the rollouts equal the
    unpadded reference path's."""
    model = tiny_model("qwen3", seed=2)
    config, weights = ModelConfig.from_hf(model.config), model.state_dict()
    prompts = random_prompts(256, [9, 30], seed=8)
    kwargs = dict(max_new_tokens=5, temperature=1.0, seed=3)
    reference = Sampler(config, weights, DEVICE, dtype=torch.float32, use_triton=False, cuda_graphs=False)
    padded = Sampler(config, weights, DEVICE, dtype=torch.float32, use_triton=True, cuda_graphs=True)
    rows_seen, sample = [], padded.sample

    def checked_sample(logits, keys, temperature):
        assert logits.isfinite().all(), "a padded row carried NaN or inf into the sampling kernel"
        rows_seen.append(len(logits))
        return sample(logits, keys, temperature)

    padded.sample = checked_sample
    want, got = (s.generate(prompts, [2, 3], **kwargs) for s in (reference, padded))
    assert got.tokens == want.tokens and 8 in rows_seen  # 5 rows padded to 8
    for a, b in zip(got.logprobs + got.entropies, want.logprobs + want.entropies):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)



class HostWaits(TorchDispatchMode):
    """Records each op that makes the host wait for the device (a value read back, a size known only from the data)
    or copies a host list over: a CUDA graph's capture rejects them, and the sampler would decode without graphs."""
    SYNCS = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.lift_fresh", "aten.unique_dim",
             "aten._unique2", "aten.repeat_interleave", "aten.equal", "aten.allclose"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        bool_index = name.startswith("aten.index") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ()) or ())
        if name in self.SYNCS or bool_index:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU the graphs are captured: the test above covers it")
@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_a_graphed_decode_step_never_waits_on_the_host(kind):
    """What a CUDA graph replays (a padded decode step with the Triton kernels, sampled and greedy) makes the host
    wait on no value and copies no host list, so on a GPU its capture succeeds (checked here, on CPU, op by op)."""
    model = tiny_model(kind, seed=6)
    sampler = Sampler(ModelConfig.from_hf(model.config), model.state_dict(), DEVICE, dtype=torch.float32,
                      use_triton=True, cuda_graphs=True)
    decode, steps = sampler._decode, []

    def watched(b, temperature, top_p):
        with HostWaits() as waits:
            out = decode(b, temperature, top_p)
        steps.append(waits.seen)
        return out

    sampler._decode = watched
    for temperature in (1.0, 0.0):
        sampler.generate(random_prompts(256, [9, 30, 17], seed=1), [2, 3, 1], 6, temperature=temperature, seed=2)
    assert len(steps) >= 10 and not any(steps), [s for s in steps if s][:3]

# ---- the kernels compiled for GPUs, on a machine without one ----

SHARED_MEMORY = {86: 101376, 90: 232448}  # the bytes a block may opt into: RTX 30xx / A10 / L40 (sm_89 too), H100


def compile_kernels_for(arch: int) -> list[tuple[str, int, int]]:
    """Every Triton kernel compiled as its launcher calls it, for a CUDA GPU of compute capability `arch`, with no GPU
    present: Triton's compiler and ptxas run, nothing is launched. (kernel, shared memory bytes, cubin bytes) each.
    Run with TRITON_INTERPRET=0, in a process of its own (the fake driver stays active)."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction
    from kernels import logprob

    driver.set_active(SimpleNamespace(get_current_target=lambda: GPUTarget("cuda", arch, 32),
                                      get_current_device=lambda: 0, get_current_stream=lambda device=None: 0))
    compiled, run = [], JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)  # warmup: compile, return, launch nothing
        compiled.append((self.fn.__name__, kernel.metadata.shared, len(kernel.asm["cubin"])))
        return kernel

    JITFunction.run = compile_only
    gen = torch.Generator().manual_seed(arch)
    for dtype in (torch.bfloat16, torch.float32):
        keys = torch.randint(0, 1 << 31, (4,), dtype=torch.int32, generator=gen)
        for V in (49152, 151936):  # SmolLM2's and Qwen2.5's vocabularies
            for temperature in (1.0, 0.0, torch.ones(1)):
                sample(torch.randn(4, V, generator=gen).to(dtype), keys, temperature)
        for heads, kv_heads, head_dim, block_size in ((9, 3, 64, 16), (12, 2, 128, 16), (16, 8, 128, 32)):
            q = torch.randn(8, heads, head_dim, generator=gen).to(dtype)
            pool = torch.randn(64, block_size, kv_heads, head_dim, generator=gen).to(dtype)
            table = torch.randint(0, 64, (8, 4), dtype=torch.int32, generator=gen)
            four = torch.tensor([4, 4], dtype=torch.int32)
            attention.prefix_attention(q, pool, pool, four - 4, four, four * 10, table[:2], 0.1, 4)
            attention.decode_attention(q, pool, pool, torch.full((8,), 50, dtype=torch.int32), table, 0.1, 2)
        for hidden_dtype, D, V in ((dtype, 576, 49152), (torch.bfloat16, 1536, 151936)):  # the second mixed
            h = torch.randn(16, D, generator=gen).to(hidden_dtype).requires_grad_()
            w = torch.randn(V, D, generator=gen).to(dtype).requires_grad_()
            sum(map(torch.sum, logprob.logprob(h, w, torch.randint(0, V, (16,), generator=gen), 0.7))).backward()
    return compiled


@pytest.mark.skipif(DEVICE == "cuda", reason="gpu-check runs them on the GPU itself")
@pytest.mark.parametrize("arch", [86, 90])
def test_every_kernel_compiles_for_a_gpu_without_one(arch):
    """The interpreter does not hold a kernel to what the compiler accepts (its types, its constexprs, shared
    memory): each kernel as its launcher calls it compiles to a cubin for an H100 (sm_90) and an RTX 30xx / A10
    (sm_86, the least shared memory), within the shared memory a block may use there."""
    script = f"import json, kernels.test_kernels as k; print(json.dumps(k.compile_kernels_for({arch})))"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-c", script], cwd=root, env={**os.environ, "TRITON_INTERPRET": "0"},
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    compiled = json.loads(run.stdout.splitlines()[-1])
    names = {name for name, _, _ in compiled}
    assert names == {"_sample_kernel", "_paged_attention_kernel", "_forward_kernel", "_backward_kernel"}, names
    assert all(cubin > 0 for _, _, cubin in compiled)
    for name, shared, _ in compiled:
        assert 0 < shared <= SHARED_MEMORY[arch], f"{name} needs {shared} bytes of shared memory on sm_{arch}"
