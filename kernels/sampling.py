"""Keyed Gumbel-max sampling: each row's token, its logprob and the entropy, in one pass over the vocabulary. Row r with
uint32 key k gets, for token j, u = ((hash32(hash32(j) ^ k) >> 8) + 0.5) * 2^-24 and samples argmax(z - log(-log u))
= argmax(softmax(z) / -log u), z = logits / temperature (taken the second way: one log a token): an exact draw from
softmax(z) that depends on the row's logits and key alone, never on its batch (DESIGN.md, Sampler contract). `sample`
(Triton) and `reference_sample` (torch) return (tokens, logprob, entropy) per row; temperature 0 is greedy.
"""

import torch
import triton
import triton.language as tl

# The largest hash gives k + 0.5 = 2^24 - 0.5, which float32 rounds to 2^24: u = 1 and a noise of
# +inf would pick that token whatever its logit (about 1% of rows with a 150k vocabulary).
_U_MAX = 1.0 - 2.0 ** -24


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A bijective mixing function (Wellons' lowbias32) on x mod 2^32, as the bits of int32 values: products wrap,
    and each shift is masked to the logical one (half the bytes of uint32 values held in int64)."""
    x = x.to(torch.int32, copy=True)  # the rest works in place
    x ^= (x >> 16) & 0xFFFF
    x *= 0x21F0AAAD
    x ^= (x >> 15) & 0x1FFFF
    x *= 0x735A2D97
    x ^= (x >> 15) & 0x1FFFF
    return x


def sample_keys(seed: int, prompt: torch.Tensor, sample: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """One key per row (uint32 bits, in int32) from (seed, prompt index, sample index, position), whatever the batch."""
    k = hash32(torch.full_like(prompt, seed) + 0x9E3779B9)
    for part in (prompt, sample, position):
        k = hash32(k + part)
    return k


def uniform(keys: torch.Tensor, token_hash: torch.Tensor) -> torch.Tensor:
    """[rows, vocab] uniforms in (0, 1) from hash32(hash32(token id) ^ key)."""
    x = hash32(token_hash[None] ^ keys.int()[:, None])
    return (((x >> 8) & 0xFFFFFF).float() + 0.5).mul_(2.0 ** -24).clamp_(max=_U_MAX)


def reference_sample(logits: torch.Tensor, keys: torch.Tensor, temperature: float | torch.Tensor,
                     chunk_elements: int | None = 1 << 18,
                     token_hash: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens, logprob, entropy) per row, in row chunks of 2^18 elements (cache-sized temporaries; None: all rows at
    once, as a compiled step does, its temporaries fused away); token_hash: hash32 of the token ids, if made once."""
    noise = isinstance(temperature, torch.Tensor) or temperature > 0
    rows = len(logits) if chunk_elements is None else max(1, chunk_elements // logits.shape[-1])
    starts = (0,) if chunk_elements is None else range(0, len(logits), rows)  # a range would fix a compile's rows
    token_hash = hash32(torch.arange(logits.shape[-1], device=logits.device)) if token_hash is None else token_hash
    out = [torch.empty(len(logits), dtype=dtype, device=logits.device) for dtype in (torch.long, torch.float32,
                                                                                   torch.float32)]
    for s in starts:
        z = logits[s:s + rows].float() / temperature if noise else logits[s:s + rows].float()
        logp = z.log_softmax(-1)
        p = logp.exp()
        # Gumbel-max, argmax(z - log E) with E = -log u ~ Exp(1), taken as argmax(p / E): one log a token, not two
        tokens = (p / uniform(keys[s:s + rows], token_hash).log_().neg_()).argmax(-1) if noise else z.argmax(-1)
        out[0][s:s + rows], out[1][s:s + rows] = tokens, logp.gather(-1, tokens[:, None])[:, 0]
        out[2][s:s + rows] = -(p * logp.clamp(min=torch.finfo(torch.float32).min)).sum(-1)  # 0 log 0 = 0
    return tuple(out)


@triton.jit
def _hash32(x):
    # x is uint32: shifts are logical and products wrap mod 2^32, as hash32's masks do
    x ^= x >> 16
    x *= 0x21F0AAAD
    x ^= x >> 15
    x *= 0x735A2D97
    x ^= x >> 15
    return x


@triton.jit
def _sample_kernel(logits_ptr, keys_ptr, temperature_ptr, tokens_ptr, logprob_ptr, entropy_ptr, V, row_stride,
                   NOISE: tl.constexpr, U_MAX: tl.constexpr, BLOCK_V: tl.constexpr):
    """One program per row: a running Gumbel-max and an online log-sum-exp over tiles of the vocabulary."""
    row = tl.program_id(0)
    temperature = tl.load(temperature_ptr)
    key = tl.load(keys_ptr + row).to(tl.uint32)
    row_ptr = logits_ptr + row.to(tl.int64) * row_stride
    # best score so far (with noise p / E >= 0, p = exp(z - m) as the running max m last moved, else z), its token, z
    best, best_idx, best_z = 0.0 if NOISE else float("-inf"), 0, 0.0
    # m: running max of z (finite from the start, so exp(m - m_new) never meets -inf - -inf);
    # s = sum exp(z - m), t = sum exp(z - m) * z, both rescaled whenever m grows
    m, s, t = -3.0e38, 0.0, 0.0
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        z = tl.math.div_rn(x, temperature)  # IEEE division like torch's: "/" is approximate on CUDA
        m_new = tl.maximum(m, tl.max(z, 0))
        alpha = tl.exp(m - m_new)
        p = tl.exp(z - m_new)
        score = z
        if NOISE:  # argmax p / E, E = -log u ~ Exp(1), as the reference; the best so far rescaled to m_new as p is
            h = _hash32(_hash32(offs.to(tl.uint32)) ^ key)
            u = tl.minimum(((h >> 8).to(tl.float32) + 0.5) * 2.0 ** -24, U_MAX)
            score, best = p / -tl.log(u), best * alpha
        tile_best, i = tl.max(score, 0, return_indices=True, return_indices_tie_break_left=True)
        if tile_best > best:  # strict, so ties keep the earlier tile, as torch.argmax does
            best, best_idx = tile_best, start + i
            best_z = tl.sum(tl.where(offs == best_idx, z, 0.0), 0)
        s = s * alpha + tl.sum(p, 0)
        t = t * alpha + tl.sum(p * tl.where(p > 0, z, 0.0), 0)  # where z = -inf, p = 0 and 0 * -inf is nan
        m = m_new
    lse = m + tl.log(s)
    tl.store(tokens_ptr + row, best_idx.to(tl.int64))
    tl.store(logprob_ptr + row, best_z - lse)
    tl.store(entropy_ptr + row, lse - t / s)  # -sum p log p with log p = z - lse


def sample(logits: torch.Tensor, keys: torch.Tensor,
           temperature: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton twin of reference_sample. It reads the temperature from device memory, so a CUDA graph replays at
    any temperature it is handed as a one-element tensor (> 0); a float is put there for it (0: greedy)."""
    logits, keys = logits.contiguous(), keys.contiguous()
    B, V = logits.shape
    noise = isinstance(temperature, torch.Tensor) or temperature > 0
    if not isinstance(temperature, torch.Tensor):
        temperature = torch.full((1,), temperature if noise else 1.0, device=logits.device)
    tokens = torch.empty(B, dtype=torch.long, device=logits.device)
    logprob, entropy = torch.empty(2, B, dtype=torch.float32, device=logits.device)
    _sample_kernel[(B,)](logits, keys, temperature, tokens, logprob, entropy, V, logits.stride(0), NOISE=noise,
                         U_MAX=_U_MAX, BLOCK_V=min(2048, triton.next_power_of_2(V)), num_warps=8)
    return tokens, logprob, entropy
