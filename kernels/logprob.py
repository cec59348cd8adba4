"""Fused LM-head log-probs and entropies from the final hidden states, never a [tokens, vocab] tensor (DESIGN.md,
data flow step 7). With h [N, D], the head W [V, D] and T > 0, z = (h @ W^T) / T:

    logprob_t = z[t, y_t] - logsumexp(z[t]),    entropy_t = -sum_v p_tv log p_tv = lse_t - sum_v p_tv z_tv

The vocabulary goes in chunks with an online log-sum-exp (a running max m, s = sum exp(z - m), t = sum exp(z - m) z,
rescaled when m grows: lse = m + log s, entropy = lse - t / s). The backward recomputes z chunk by chunk:

    d logprob_t / d z_tv = (1[v = y_t] - p_tv) / T,    d entropy_t / d z_tv = -p_tv (log p_tv + entropy_t) / T

`logprob` (Triton) and `reference_logprob` (torch) return float32 [N] (float64 for float64 inputs), differentiable
in hidden and weight; z is accumulated in float32, never as bf16 logits (rounding up to 0.06 at |z| = 30).
"""

from functools import partial

import torch
import triton
import triton.language as tl


# ---- plain torch ----

def _reference_forward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float,
                       chunk_size: int, dot_dtype=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logprob, entropy, lse), holding [N, chunk_size] float32 values at a time."""
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    h = hidden.to(dot_dtype or dtype)
    m = torch.full((h.shape[0],), float("-inf"), dtype=dtype, device=h.device)
    s, t, z_target = torch.zeros_like(m), torch.zeros_like(m), torch.zeros_like(m)
    for start in range(0, weight.shape[0], chunk_size):
        z = (h @ weight[start:start + chunk_size].to(h.dtype).T).to(dtype).div_(temperature)
        m_new = torch.maximum(m, z.amax(1))  # finite, so exp(m - m_new) is 0 on the first chunk, never NaN
        alpha = (m - m_new).exp()
        e = (z - m_new[:, None]).exp_()
        s = s * alpha + e.sum(1)
        t = t * alpha + e.mul_(z).sum(1)
        m = m_new
        hit = (targets >= start) & (targets < start + z.shape[1])
        z_target = torch.where(hit, z.gather(1, (targets - start).clamp(0, z.shape[1] - 1)[:, None])[:, 0], z_target)
    lse = m + s.log()
    return z_target - lse, lse - t / s, lse


def _reference_backward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                        entropy: torch.Tensor, grad_logprob: torch.Tensor, grad_entropy: torch.Tensor,
                        temperature: float, chunk_size: int, dot_dtype=None,
                        weight_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(grad_hidden, grad_weight): per chunk, g = dloss/dz, then g @ W_chunk and g^T @ h (not for a frozen head)."""
    h = hidden.to(dot_dtype or lse.dtype)
    a, b = grad_logprob.to(lse.dtype)[:, None], grad_entropy.to(lse.dtype)[:, None]
    grad_hidden = torch.zeros(h.shape, dtype=lse.dtype, device=h.device)
    grad_weight = torch.empty_like(weight) if weight_grad else None
    for start in range(0, weight.shape[0], chunk_size):
        w = weight[start:start + chunk_size].to(h.dtype)
        logp = (h @ w.T).to(lse.dtype).div_(temperature).sub_(lse[:, None])
        p = logp.exp()
        # T g = a (onehot - p) - b p (logp + entropy) = -p (a + b (logp + entropy)) + a onehot
        g = logp.add_(entropy[:, None]).mul_(b).add_(a).mul_(p).neg_()
        hit = (targets >= start) & (targets < start + w.shape[0])
        g.scatter_add_(1, (targets - start).clamp(0, w.shape[0] - 1)[:, None], a * hit[:, None])
        g = g.div_(temperature).to(h.dtype)
        grad_hidden += g @ w  # float32 sum over chunks, whatever the product dtype
        if weight_grad:
            grad_weight[start:start + w.shape[0]] = g.T @ h
    return grad_hidden.to(hidden.dtype), grad_weight


# ---- Triton ----

_BLOCK_N, _BLOCK_V, _BLOCK_D = 64, 128, 32


@triton.jit
def _load_rows(ptr, rows, d, n_rows, D):
    """The tile ptr[rows, d] of a contiguous [n_rows, D] matrix in float32 (zeros outside)."""
    mask = (rows < n_rows)[:, None] & (d < D)[None, :]
    return tl.load(ptr + rows.to(tl.int64)[:, None] * D + d[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _logits_tile(h_ptr, w_ptr, rows, cols, N, V, D, temperature,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """z [BLOCK_N, BLOCK_V] = h[rows] @ W[cols]^T / T, in float32 steps of BLOCK_D over the hidden size."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        h = _load_rows(h_ptr, rows, d, N, D)
        w = _load_rows(w_ptr, cols, d, V, D)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
    return tl.math.div_rn(acc, temperature)  # IEEE division like torch's: "/" is approximate on CUDA


@triton.jit
def _forward_kernel(h_ptr, w_ptr, targets_ptr, lse_ptr, mean_z_ptr, z_target_ptr, N, V, D, chunk, temperature,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One program: BLOCK_N tokens against one vocabulary chunk: its lse, p-weighted mean of z, target z."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    lo = tl.program_id(1) * chunk
    hi = tl.minimum(lo + chunk, V)
    targets = tl.load(targets_ptr + rows, mask=rows < N, other=-1)
    # m starts finite and every tile holds a column below hi, so exp(m - m_new) never meets -inf - -inf
    m = tl.full([BLOCK_N], -3.0e38, tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    t = tl.zeros([BLOCK_N], tl.float32)
    z_target = tl.zeros([BLOCK_N], tl.float32)
    for start in range(lo, hi, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = _logits_tile(h_ptr, w_ptr, rows, cols, N, V, D, temperature, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION)
        z = tl.where((cols < hi)[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(z - m_new[:, None])
        s = s * alpha + tl.sum(p, 1)
        t = t * alpha + tl.sum(p * tl.where(p > 0, z, 0.0), 1)  # where z = -inf, p = 0 and 0 * -inf is NaN
        z_target += tl.sum(tl.where(cols[None, :] == targets[:, None], z, 0.0), 1)
        m = m_new
    out = tl.program_id(1) * N + rows
    tl.store(lse_ptr + out, m + tl.log(s), mask=rows < N)
    tl.store(mean_z_ptr + out, t / s, mask=rows < N)
    tl.store(z_target_ptr + rows, z_target, mask=(rows < N) & (targets >= lo) & (targets < hi))


@triton.jit
def _backward_kernel(h_ptr, w_ptr, targets_ptr, lse_ptr, entropy_ptr, grad_logprob_ptr, grad_entropy_ptr,
                     grad_h_ptr, grad_w_ptr, N, V, D, temperature, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                     BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One program per [BLOCK_N tokens, BLOCK_V vocab] tile: recompute z, g = dloss/dz, then add g @ W[cols] to
    grad_h[rows] and g^T @ h[rows] to grad_w[cols] with float32 atomics, as Cut Cross-Entropy does (Wijmans et
    al. 2024): no [N, V] buffer, at the price of a summation order that varies run to run."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    z = _logits_tile(h_ptr, w_ptr, rows, cols, N, V, D, temperature, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION)
    logp = z - tl.load(lse_ptr + rows, mask=row_ok, other=0.0)[:, None]
    p = tl.exp(logp)
    a = tl.load(grad_logprob_ptr + rows, mask=row_ok, other=0.0)[:, None]
    b = tl.load(grad_entropy_ptr + rows, mask=row_ok, other=0.0)[:, None]
    entropy = tl.load(entropy_ptr + rows, mask=row_ok, other=0.0)[:, None]
    onehot = cols[None, :] == tl.load(targets_ptr + rows, mask=row_ok, other=-1)[:, None]
    g = a * (tl.where(onehot, 1.0, 0.0) - p) - b * p * (logp + entropy)
    g = tl.where(row_ok[:, None] & (cols < V)[None, :], tl.math.div_rn(g, temperature), 0.0)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        h = _load_rows(h_ptr, rows, d, N, D)
        w = _load_rows(w_ptr, cols, d, V, D)
        tl.atomic_add(grad_h_ptr + rows.to(tl.int64)[:, None] * D + d[None, :],
                      tl.dot(g, w, input_precision=DOT_PRECISION),
                      mask=row_ok[:, None] & (d < D)[None, :], sem="relaxed")
        tl.atomic_add(grad_w_ptr + cols.to(tl.int64)[:, None] * D + d[None, :],
                      tl.dot(tl.trans(g), h, input_precision=DOT_PRECISION),
                      mask=(cols < V)[:, None] & (d < D)[None, :], sem="relaxed")


def _launch(hidden: torch.Tensor, weight: torch.Tensor) -> dict:
    # tf32 holds bf16/fp16 values exactly (it rounds g to 10 bits in the backward); float32 needs ieee.
    return dict(BLOCK_N=_BLOCK_N, BLOCK_V=_BLOCK_V, BLOCK_D=_BLOCK_D, num_warps=8,
                DOT_PRECISION="ieee" if torch.float32 in (hidden.dtype, weight.dtype) else "tf32")


def _triton_forward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float,
                    chunk_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chunks run in parallel (one grid column each, so few tokens still fill the GPU);
    their partial log-sum-exps are merged here: lse = logsumexp_c lse_c, E[z] = sum_c exp(lse_c - lse) E_c[z]."""
    (N, D), V = hidden.shape, weight.shape[0]
    chunk = triton.cdiv(chunk_size, _BLOCK_V) * _BLOCK_V
    num_chunks = triton.cdiv(V, chunk)
    lse_part, mean_z = torch.empty(2, num_chunks, N, dtype=torch.float32, device=hidden.device)
    z_target = torch.empty(N, dtype=torch.float32, device=hidden.device)
    _forward_kernel[(triton.cdiv(N, _BLOCK_N), num_chunks)](
        hidden, weight, targets, lse_part, mean_z, z_target, N, V, D, chunk, temperature, **_launch(hidden, weight))
    lse = lse_part.logsumexp(0)
    entropy = lse - ((lse_part - lse).exp() * mean_z).sum(0)
    return z_target - lse, entropy, lse


def _triton_backward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                     entropy: torch.Tensor, grad_logprob: torch.Tensor, grad_entropy: torch.Tensor,
                     temperature: float, chunk_size: int, weight_grad=True) -> tuple[torch.Tensor, torch.Tensor]:
    (N, D), V = hidden.shape, weight.shape[0]  # the kernel computes grad_weight whatever weight_grad says
    grad_hidden = torch.zeros(N, D, dtype=torch.float32, device=hidden.device)
    grad_weight = torch.zeros(V, D, dtype=torch.float32, device=hidden.device)
    # .float() and .contiguous(): the gradient of a .sum() arrives as an expanded tensor with stride 0
    _backward_kernel[(triton.cdiv(N, _BLOCK_N), triton.cdiv(V, _BLOCK_V))](
        hidden, weight, targets, lse, entropy, grad_logprob.float().contiguous(),
        grad_entropy.float().contiguous(), grad_hidden, grad_weight, N, V, D, temperature, **_launch(hidden, weight))
    return grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype)


class _ChunkedLogprob(torch.autograd.Function):
    """Saves hidden, weight, targets, lse and entropy; autocast off (the reference's products stay float32)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_size, forward_fn, backward_fn):
        assert hidden.dim() == 2 and weight.dim() == 2 and hidden.shape[1] == weight.shape[1], \
            f"need hidden [N, D] and weight [V, D], got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        assert targets.shape == hidden.shape[:1], f"need targets [{hidden.shape[0]}], got {tuple(targets.shape)}"
        assert temperature > 0, f"temperature must be > 0 (use 1.0 for greedy rollouts), got {temperature}"
        with torch.autocast(hidden.device.type, enabled=False):
            logprob, entropy, lse = forward_fn(hidden, weight, targets, temperature, chunk_size)
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.args = temperature, chunk_size, backward_fn
        return logprob, entropy

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy):
        temperature, chunk_size, backward_fn = ctx.args
        with torch.autocast(grad_logprob.device.type, enabled=False):
            grad_hidden, grad_weight = backward_fn(*ctx.saved_tensors, grad_logprob, grad_entropy, temperature,
                                                   chunk_size, weight_grad=ctx.needs_input_grad[1])
        return grad_hidden, grad_weight, None, None, None, None, None


def reference_logprob(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float,
                      chunk_size: int = 4096, dot_dtype: torch.dtype | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [N, D], weight [V, D], targets [N] -> (logprob, entropy) of softmax(h W^T / T), one [N, chunk_size]
    slice of logits at a time. dot_dtype=torch.bfloat16: the products in bf16 (the CPU trainer's), the rest float32."""
    return _ChunkedLogprob.apply(hidden, weight, targets, temperature, chunk_size,
                                 partial(_reference_forward, dot_dtype=dot_dtype),
                                 partial(_reference_backward, dot_dtype=dot_dtype))


def logprob(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float,
            chunk_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of reference_logprob; its backward's atomics sum in an order that varies run to run."""
    return _ChunkedLogprob.apply(hidden.contiguous(), weight.contiguous(), targets.contiguous(), temperature,
                                 chunk_size, _triton_forward, _triton_backward)
