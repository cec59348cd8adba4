"""fanout's sampler: our own forward pass for Llama / Qwen2 / Qwen3-shaped decoder LMs over a
paged KV cache in which each prompt's KV is stored once and shared by all of its rollouts.

    sampler = Sampler(ModelConfig.from_hf(hf_config), model.state_dict(), "cuda", kv_budget_tokens=1 << 20)
    out = sampler.generate([[1, 2, 3]], n=[512], max_new_tokens=1024, temperature=1.0, stop_token_ids=[2])

Memory: the pool holds fixed-size blocks. A prompt's KV fills blocks once (P tokens); each
rollout owns blocks for its own tokens (T each), so N rollouts cost P + N*T tokens, not
N*(P+T). At every decode step a rollout attends to (a) its prompt's KV, computed for all
running rollouts of that prompt together as one matrix product, and (b) its own blocks
(paged decode attention); the partials are merged with their log-sum-exps (kernels/attention.py).

Scheduling is continuous batching over a fixed number of decode slots: a finished rollout
frees its slot and blocks and the next waiting rollout takes them; a prompt's blocks are
freed when its last rollout ends. When blocks run out the newest running rollout is
preempted and restarted later. Randomness is keyed by (seed, prompt, sample, position), so
none of this changes which tokens come out.
"""

import warnings
from collections import Counter, deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kernels import attention, sampling


@dataclass(frozen=True)
class ModelConfig:
    """Shapes of a decoder LM; biases and Qwen3's q/k norms are read off the weights."""
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float

    @staticmethod
    def from_hf(cfg) -> "ModelConfig":
        if cfg.model_type not in ("llama", "qwen2", "qwen3"):
            raise ValueError(f"model type '{cfg.model_type}' is not supported by fanout's sampler; "
                             "use a Llama, Qwen2 or Qwen3 shaped model")
        act = getattr(cfg, "hidden_act", "silu")
        if act != "silu":  # the forward below computes SiLU MLPs only: anything else gives wrong logits
            raise ValueError(f"hidden_act '{act}' is not supported by fanout's sampler (it computes SiLU MLPs); "
                             "use a model whose config has hidden_act silu")
        rope = getattr(cfg, "rope_parameters", None) or {}
        if rope.get("rope_type", "default") != "default" or getattr(cfg, "use_sliding_window", False):
            raise ValueError(f"rope scaling {rope.get('rope_type')} or sliding-window attention is not "
                             "supported by fanout's sampler; use a model with plain RoPE and full attention")
        return ModelConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_layers=cfg.num_hidden_layers,
            num_heads=cfg.num_attention_heads, num_kv_heads=cfg.num_key_value_heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
            rms_norm_eps=cfg.rms_norm_eps,
            rope_theta=rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


@dataclass
class Rollouts:
    """One entry per response, ordered by (prompt index, sample index); groups share a prompt index."""
    prompt_index: list[int]
    sample_index: list[int]
    tokens: list[list[int]]
    logprobs: list[torch.Tensor]   # sampler logprob of each token under the sampling distribution
    entropies: list[torch.Tensor]  # entropy of the sampling distribution at each token
    finish_reason: list[str]       # "stop" or "length"

    def __len__(self) -> int:
        return len(self.tokens)


# ---- sampling ----

def check_request(n: list[int], max_new_tokens: int, temperature: float, top_p: float) -> None:
    """One sentence for each request that would otherwise sample nonsense (top_p = 0 gives token 0 with NaN
    logprobs) or fail deep inside (max_new_tokens = 0), or silently mean something else."""
    checks = [(min(n, default=0) >= 0, f"a rollout count is negative ({min(n, default=0)}); ask for 0 or more "
                                       "rollouts per prompt"),
              (max_new_tokens >= 1, f"max_new_tokens={max_new_tokens} must be at least 1"),
              (temperature >= 0, f"temperature={temperature} is negative; use 0 for greedy decoding or a positive "
                                 "value to sample"),
              (0 < top_p <= 1, f"top_p={top_p} is outside (0, 1]; use 1.0 to sample from the whole distribution")]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def sample_keys(seed: int, prompt: torch.Tensor, sample: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """One uint32 key per row from (seed, prompt index, sample index, position)."""
    k = sampling.hash32(torch.full_like(prompt, seed) + 0x9E3779B9)
    for part in (prompt, sample, position):
        k = sampling.hash32(k + part)
    return k


def nucleus(z: torch.Tensor, top_p: float) -> torch.Tensor:
    """z with every token outside the smallest set whose probability reaches top_p set to -inf."""
    sorted_z, order = z.sort(-1, descending=True)
    probs = sorted_z.softmax(-1)
    return z.scatter(-1, order, sorted_z.masked_fill(probs.cumsum(-1) - probs >= top_p, -torch.inf))


# ---- the model ----

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., T, heads, head_dim]; cos, sin [T, head_dim] (HF's rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), -1)
    return x * cos[:, None] + rotated * sin[:, None]


@dataclass
class KeyPlan:
    """Which pool blocks a CPU decode step's keys lie in, computed once for all layers (key_plan)."""
    row_of: torch.Tensor         # [G, W] the rows of each group (W = its largest), R where a group has fewer
    prompt_blocks: torch.Tensor  # [G, Pb] each group's prompt blocks
    prompt_mask: torch.Tensor    # [G, 1, 1, Pb x block_size] 0 on a prompt key, -inf past the prompt
    own_blocks: torch.Tensor     # [R, Tb] each row's own blocks
    own_mask: torch.Tensor       # [R, 1, 1, Tb x block_size]


def key_plan(b: "DecodeBatch", block_size: int) -> KeyPlan:
    """Whole blocks are read and the slots past a length masked. A table's columns past a sequence's last
    block repeat its first (the rest may be garbage), and the sampler zeroes a block as it hands it out
    (Sampler.clear_blocks), so a slot never written holds 0, never a NaN that would survive its zero weight."""
    rows, dev = len(b.tokens), b.tokens.device

    def blocks(table, length):
        n = -(-int(length.max()) // block_size)
        used = torch.arange(n, device=dev) < -(-length[:, None] // block_size)
        valid = torch.arange(n * block_size, device=dev) < length[:, None]
        mask = torch.zeros(valid.shape, device=dev).masked_fill_(~valid, float("-inf"))
        return torch.where(used, table[:, :n], table[:, :1]).long(), mask[:, None, None]

    place = torch.arange(int(b.group_count.max()), device=dev)
    row_of = torch.where(place < b.group_count[:, None], b.group_start[:, None].long() + place, rows)
    return KeyPlan(row_of, *blocks(b.prompt_blocks, b.prompt_len), *blocks(b.block_table, b.seq_len))


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
                     flash: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T x scale + mask) v and its log-sum-exp, q [N, H, M, d], k and v [N, H, keys, d] (any strides):
    torch's CPU flash attention on a CPU (flash=None), plain products elsewhere (the reference path on a GPU)."""
    if q.device.type == "cpu" if flash is None else flash:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=mask.expand(-1, -1, q.shape[2], -1), scale=scale)
    scores = q @ k.transpose(-1, -2) * scale + mask
    lse = scores.logsumexp(-1, keepdim=True)
    return (scores - lse).exp() @ v, lse[..., 0]


def cpu_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, plan: KeyPlan,
                  scale: float) -> torch.Tensor:
    """Decode attention without Triton, [R, heads, d]: the rows of a group attend to their prompt's keys
    in one call (the keys read once per group, not once per rollout), each row to its own keys, and the
    two parts merge by their log-sum-exps (kernels/attention.py's rule). Both parts run in float32, keys
    gathered a block at a time and read in place head-major through strides (masked_attention)."""
    rows, heads, d = q.shape
    kv = k_pool.shape[-2]
    rep, (groups, width) = heads // kv, plan.row_of.shape

    def gather(pool, blocks):  # [N, blocks] -> [N, kv, blocks x block_size, d] float32, a strided view
        return pool[blocks].float().flatten(1, 2).transpose(1, 2)

    def attend(qh, blocks, mask):  # qh [N, kv, M, d] -> o [N, kv, M, d], lse [N, kv, M]
        return masked_attention(qh, gather(k_pool, blocks), gather(v_pool, blocks), mask, scale)

    qf = torch.cat([q.float(), q.new_zeros(1, heads, d, dtype=torch.float32)])  # row R: no row
    qg = qf[plan.row_of].view(groups, width, kv, rep, d).transpose(1, 2).reshape(groups, kv, width * rep, d)
    o1, lse1 = attend(qg, plan.prompt_blocks, plan.prompt_mask)
    o1 = o1.reshape(groups, kv, width, rep, d).transpose(1, 2).reshape(groups * width, heads, d)
    lse1 = lse1.reshape(groups, kv, width, rep).transpose(1, 2).reshape(groups * width, heads)
    prompt_o = q.new_zeros(rows + 1, heads, d, dtype=torch.float32)
    prompt_lse = torch.full((rows + 1, heads), float("-inf"), device=q.device)
    prompt_o[plan.row_of.flatten()], prompt_lse[plan.row_of.flatten()] = o1, lse1
    o2, lse2 = attend(qf[:rows].view(rows, kv, rep, d), plan.own_blocks, plan.own_mask)
    lse2 = lse2.reshape(rows, heads, 1)
    lse = torch.logaddexp(prompt_lse[:rows, :, None], lse2)
    return (prompt_o[:rows] * (prompt_lse[:rows, :, None] - lse).exp()
            + o2.reshape(rows, heads, d) * (lse2 - lse).exp()).to(q.dtype)


class BlockPool:
    """KV memory in fixed-size blocks: a free list and a reference count per block."""

    def __init__(self, num_blocks: int):
        self.free = list(range(num_blocks))[::-1]
        self.refs = [0] * num_blocks

    def alloc(self, n: int) -> list[int] | None:
        if n > len(self.free):
            return None
        blocks = [self.free.pop() for _ in range(n)]
        self.retain(blocks)
        return blocks

    def retain(self, blocks: list[int]) -> None:
        for b in blocks:
            self.refs[b] += 1

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            self.refs[b] -= 1
            if self.refs[b] == 0:
                self.free.append(b)


@dataclass
class DecodeBatch:
    """The inputs of one decode step. Rows are sorted by prompt: group g owns rows
    group_start[g] .. group_start[g] + group_count[g] - 1 and attends to prompt_blocks[g]."""
    tokens: torch.Tensor         # [R] the token each row feeds
    positions: torch.Tensor      # [R] its absolute position
    keys: torch.Tensor           # [R] randomness keys of the token each row samples next
    write_slots: torch.Tensor    # [R] pool slot for the fed token's K/V
    seq_len: torch.Tensor        # [R] int32: own tokens, the fed one included
    block_table: torch.Tensor    # [R, own blocks] int32
    group_start: torch.Tensor    # [G] int32
    group_count: torch.Tensor    # [G] int32
    prompt_len: torch.Tensor     # [G] int32
    prompt_blocks: torch.Tensor  # [G, prompt blocks] int32
    num_splits: int              # split-K chunks of the own-token attention
    max_count: int               # rows of the largest group


def next_pow2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


class Sampler:
    """Generation over a paged KV pool with shared prompt KV and continuous batching."""

    def __init__(self, model_config: ModelConfig, weights: dict, device="cpu", kv_budget_tokens: int = 1 << 20,
                 block_size: int = 16, dtype: torch.dtype = torch.bfloat16, max_slots: int = 1024,
                 use_triton: bool | None = None, cuda_graphs: bool | None = None):
        c = model_config
        self.cfg, self.device, self.dtype = c, torch.device(device), dtype
        self.block_size, self.max_slots = block_size, max_slots
        self.num_blocks = kv_budget_tokens // block_size
        self.weights = {name: w.detach().to(self.device, dtype).clone() for name, w in weights.items()}
        if "lm_head.weight" not in self.weights:  # tied embeddings
            self.weights["lm_head.weight"] = self.weights["model.embed_tokens.weight"]
        half = c.head_dim // 2
        self.inv_freq = 1.0 / c.rope_theta ** (torch.arange(half, device=self.device).float() / half)
        # One block past the pool's own is scratch: padded rows of a graphed step write there.
        self.scratch_block = self.num_blocks
        self.kv_shape = (c.num_layers, self.num_blocks + 1, block_size, c.num_kv_heads, c.head_dim)
        self.k_pool = self.v_pool = None  # allocated by generate(), freed by release_kv()
        self.kv_bytes_per_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * dtype.itemsize
        # Triton kernels on CUDA, plain torch elsewhere (DESIGN.md, Kernels): there the KV write and sampling
        # twins, and cpu_attention
        self.use_triton = self.device.type == "cuda" if use_triton is None else use_triton
        prefix = "" if self.use_triton else "reference_"
        self.write_kv = getattr(attention, prefix + "write_kv")
        self.sample = getattr(sampling, prefix + "sample")
        # Decode steps padded to power-of-two sizes and replayed as CUDA graphs, one per size
        # (on CPU, cuda_graphs=True pads and runs eagerly: that is how the padding is tested).
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self.graphs = {}
        self.graph_pool = torch.cuda.graph_pool_handle() if self.cuda_graphs and self.device.type == "cuda" else None

    def release_kv(self) -> None:
        """Free the KV pool and the CUDA graphs that point into it, so that training can use the memory;
        the next generate() allocates them again (README, memory)."""
        self.k_pool = self.v_pool = None
        self.graphs = {}
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def load_weights(self, weights: dict) -> None:
        """Copy new weights into the sampler's buffers in place (tied heads follow the embedding)."""
        with torch.no_grad():
            for name, w in weights.items():
                if name in self.weights:
                    self.weights[name].copy_(w)

    # -- forward pieces --

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self.weights[name + ".weight"], self.weights.get(name + ".bias"))

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, attend, keep=None) -> torch.Tensor:
        """Logits [..., T, vocab] (float32), or of the positions x[keep] only (the LM head is a large share
        of the work); attend(layer, q, k, v) -> [..., T, heads, d]."""
        c, w = self.cfg, self.weights
        x = w["model.embed_tokens.weight"][tokens]
        angles = positions.float()[:, None] * self.inv_freq[None]
        angles = torch.cat((angles, angles), -1)
        cos, sin = angles.cos().to(self.dtype), angles.sin().to(self.dtype)
        shape = tokens.shape
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            h = rms_norm(x, w[p + "input_layernorm.weight"], c.rms_norm_eps)
            q = self._linear(h, p + "self_attn.q_proj").view(*shape, c.num_heads, c.head_dim)
            k = self._linear(h, p + "self_attn.k_proj").view(*shape, c.num_kv_heads, c.head_dim)
            v = self._linear(h, p + "self_attn.v_proj").view(*shape, c.num_kv_heads, c.head_dim)
            if p + "self_attn.q_norm.weight" in w:  # Qwen3
                q = rms_norm(q, w[p + "self_attn.q_norm.weight"], c.rms_norm_eps)
                k = rms_norm(k, w[p + "self_attn.k_norm.weight"], c.rms_norm_eps)
            o = attend(i, rope(q, cos, sin), rope(k, cos, sin), v)
            x = x + self._linear(o.flatten(-2), p + "self_attn.o_proj")
            h = rms_norm(x, w[p + "post_attention_layernorm.weight"], c.rms_norm_eps)
            x = x + self._linear(F.silu(self._linear(h, p + "mlp.gate_proj")) * self._linear(h, p + "mlp.up_proj"),
                                 p + "mlp.down_proj")
        x = rms_norm(x if keep is None else x[keep], w["model.norm.weight"], c.rms_norm_eps)
        return F.linear(x, w["lm_head.weight"]).float()

    def prefill(self, prompts: list[list[int]], blocks: list[list[int]]) -> torch.Tensor:
        """Run the prompts once, right-padded into one batch, writing their KV into their blocks;
        returns each prompt's last-position logits. Causal attention never lets a real position
        see the padding."""
        c, bs = self.cfg, self.block_size
        lengths = [len(p) for p in prompts]
        tokens = torch.zeros(len(prompts), max(lengths), dtype=torch.long, device=self.device)
        for i, p in enumerate(prompts):
            tokens[i, :len(p)] = torch.tensor(p, device=self.device)
        valid = torch.arange(max(lengths), device=self.device)[None] < torch.tensor(lengths, device=self.device)[:, None]
        slots = torch.tensor([bl[t // bs] * bs + t % bs for bl, n in zip(blocks, lengths) for t in range(n)],
                             device=self.device)
        rep = c.num_heads // c.num_kv_heads

        def attend(layer, q, k, v):
            self.write_kv(self.k_pool[layer], self.v_pool[layer], k[valid], v[valid], slots)
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(rep, 1),
                                               v.transpose(1, 2).repeat_interleave(rep, 1), is_causal=True)
            return o.transpose(1, 2)

        last = (torch.arange(len(prompts)), torch.tensor(lengths) - 1)
        return self.forward(tokens, torch.arange(max(lengths), device=self.device), attend, keep=last)

    def sample_tokens(self, logits: torch.Tensor, keys: torch.Tensor, temperature: float, top_p: float):
        """Token, its logprob and the entropy of the sampling distribution, per row."""
        if top_p < 1.0 and temperature > 0:  # nucleus on the tempered distribution (evaluation)
            logits, temperature = nucleus(logits.float() / temperature, top_p), 1.0
        return self.sample(logits, keys, temperature)

    # -- one decode step, eager or as a CUDA graph --

    def decode_step(self, b: DecodeBatch, temperature: float, top_p: float):
        """Feed one token per row, attend, sample: (tokens, logprobs, entropies) per row."""
        if not self.cuda_graphs or top_p < 1.0:
            return self._decode(b, temperature, top_p)
        rows, padded = len(b.tokens), self._pad(b)
        if self.device.type != "cuda":
            out = self._decode(padded, temperature, 1.0)
        else:
            key = (len(padded.tokens), len(padded.group_start), padded.prompt_blocks.shape[1], padded.num_splits,
                   padded.max_count, temperature)
            if key not in self.graphs:
                try:
                    self.graphs[key] = self._capture(padded, temperature)
                except RuntimeError as e:  # never lose a run to a capture problem: decode eagerly instead
                    warnings.warn(f"CUDA graph capture failed ({e}); decoding without graphs from now on")
                    self.cuda_graphs = False
                    return self._decode(b, temperature, top_p)
            graph, static, out = self.graphs[key]
            for name, value in vars(padded).items():
                if isinstance(value, torch.Tensor):
                    getattr(static, name).copy_(value)
            graph.replay()
        return tuple(x[:rows].clone() for x in out)

    def _decode(self, b: DecodeBatch, temperature: float, top_p: float):
        scale = self.cfg.head_dim ** -0.5
        plan = None if self.use_triton else key_plan(b, self.block_size)  # once for all layers

        def attend(layer, q, k, v):
            kp, vp = self.k_pool[layer], self.v_pool[layer]
            self.write_kv(kp, vp, k, v, b.write_slots)
            if not self.use_triton:
                return cpu_attention(q, kp, vp, plan, scale)
            o1, lse1 = attention.prefix_attention(q, kp, vp, b.group_start, b.group_count, b.prompt_len,
                                                  b.prompt_blocks, scale, b.max_count)
            o2, lse2 = attention.decode_attention(q, kp, vp, b.seq_len, b.block_table, scale, b.num_splits)
            return attention.merge_attention(o1, lse1, o2, lse2, q.dtype)

        return self.sample_tokens(self.forward(b.tokens, b.positions, attend), b.keys, temperature, top_p)

    def _pad(self, b: DecodeBatch) -> DecodeBatch:
        """b with rows, groups, prompt-block width and largest group rounded up to powers of two.
        Padded rows belong to no group and read and write only the scratch block."""
        rows, groups = len(b.tokens), len(b.group_start)
        extra_rows, extra_groups = next_pow2(rows) - rows, next_pow2(groups) - groups
        width = next_pow2(b.prompt_blocks.shape[1])

        def pad(x, n, value):
            return torch.cat([x, x.new_full((n, *x.shape[1:]), value)])

        scratch = self.scratch_block
        prompt_blocks = F.pad(b.prompt_blocks, (0, width - b.prompt_blocks.shape[1]), value=scratch)
        return DecodeBatch(
            tokens=pad(b.tokens, extra_rows, 0), positions=pad(b.positions, extra_rows, 0),
            keys=pad(b.keys, extra_rows, 0), write_slots=pad(b.write_slots, extra_rows, scratch * self.block_size),
            seq_len=pad(b.seq_len, extra_rows, 1), block_table=pad(b.block_table, extra_rows, scratch),
            group_start=pad(b.group_start, extra_groups, rows), group_count=pad(b.group_count, extra_groups, 0),
            prompt_len=pad(b.prompt_len, extra_groups, 1), prompt_blocks=pad(prompt_blocks, extra_groups, scratch),
            num_splits=b.num_splits, max_count=min(next_pow2(b.max_count), next_pow2(rows)))

    def _capture(self, static: DecodeBatch, temperature: float):
        """Record one padded decode step as a CUDA graph; `static`'s tensors become its inputs."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compile the Triton kernels and warm the allocator outside capture
            self._decode(static, temperature, 1.0)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.graph_pool):  # every size shares one memory pool
            out = self._decode(static, temperature, 1.0)
        return graph, static, out

    # -- generation --

    def generate(self, prompts: list[list[int]], n: list[int], max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, stop_token_ids=(), seed: int = 0, prompt_keys: list[int] | None = None) -> Rollouts:
        """n[i] rollouts of prompts[i]; returns them ordered by (prompt index, sample index).

        Prompt i is keyed as prompt_keys[i] (default i): a request split over several calls (or ranks),
        each passing its prompts' positions in the whole request, samples exactly the same tokens as
        the whole request in one call."""
        if len(n) != len(prompts) or (prompt_keys is not None and len(prompt_keys) != len(prompts)):
            raise ValueError(f"generate got {len(prompts)} prompts but {len(n)} rollout counts and "
                             f"{len(prompt_keys or prompts)} prompt keys; pass one of each per prompt")
        check_request(n, max_new_tokens, temperature, top_p)
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
            if self._blocks_for(len(p)) + self._blocks_for(max_new_tokens) > self.num_blocks:
                raise ValueError(f"prompt {i} ({len(p)} tokens) plus max_new_tokens={max_new_tokens} does not fit "
                                 f"kv_budget_tokens={self.num_blocks * self.block_size}; raise the budget")
        if self.k_pool is None:
            self.k_pool = torch.empty(self.kv_shape, device=self.device, dtype=self.dtype)
            self.v_pool = torch.empty(self.kv_shape, device=self.device, dtype=self.dtype)
            self.clear_blocks([self.scratch_block])
        keys = list(range(len(prompts))) if prompt_keys is None else prompt_keys
        with torch.no_grad():
            run = _Generation(self, prompts, n, max_new_tokens, temperature, top_p, stop_token_ids, seed, keys)
            results = run.run()
        self.stats = {"preemptions": run.preemptions, "evictions": run.evictions,
                      "peak_kv_tokens": run.peak_blocks * self.block_size}
        keys = sorted(results)
        return Rollouts(prompt_index=[p for p, _ in keys], sample_index=[s for _, s in keys],
                        tokens=[results[k][0] for k in keys], logprobs=[results[k][1] for k in keys],
                        entropies=[results[k][2] for k in keys], finish_reason=[results[k][3] for k in keys])

    def clear_blocks(self, blocks: list[int]) -> None:
        """Zero blocks as they are handed out, on the torch path: cpu_attention reads whole blocks and masks the
        slots past a length, and a slot never written must hold 0, not a NaN that survives its zero weight.
        (The Triton kernels read only written slots; zeroing the whole pool would touch all of its memory.)"""
        if not self.use_triton and blocks:
            index = torch.tensor(blocks, device=self.device)
            self.k_pool[:, index] = 0
            self.v_pool[:, index] = 0

    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)


@dataclass(eq=False)
class _Prompt:
    index: int
    tokens: list[int]
    waiting: deque                       # sample indices not running yet (a preempted one goes back in front)
    unfinished: int                      # rollouts not finished yet, running or waiting
    running: int = 0                     # rollouts running now
    blocks: list[int] | None = None      # its KV blocks once prefilled
    logits: torch.Tensor | None = None   # its last-position logits: every rollout's first token comes from them


@dataclass(eq=False)
class _Rollout:
    prompt: _Prompt
    sample: int
    slot: int
    length: int = 0                      # tokens generated so far
    blocks: list[int] = field(default_factory=list)


class _Generation:
    """The state of one generate() call: waiting prompts, running slots, results."""

    def __init__(self, s: Sampler, prompts, n, max_new_tokens, temperature, top_p, stop_token_ids, seed, prompt_keys):
        self.s, self.max_new, self.temperature, self.top_p = s, max_new_tokens, temperature, top_p
        self.seed, self.prompt_keys = seed, prompt_keys
        self.pool = BlockPool(s.num_blocks)
        self.pending = deque(_Prompt(i, p, deque(range(k)), k) for i, (p, k) in enumerate(zip(prompts, n)) if k > 0)
        self.active: list[_Prompt] = []    # prefilled prompts with unfinished rollouts, oldest first
        self.running: list[_Rollout] = []  # admission order: the last is the newest
        self.free_slots = list(range(s.max_slots))[::-1]
        self.results = {}
        self.preemptions = self.evictions = self.peak_blocks = 0
        dev = s.device
        self.stop_ids = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long, device=dev)
        self.out_tok = torch.zeros(s.max_slots, max_new_tokens, dtype=torch.long, device=dev)
        self.out_lp = torch.zeros(s.max_slots, max_new_tokens, device=dev)
        self.out_ent = torch.zeros(s.max_slots, max_new_tokens, device=dev)
        self.slot_blocks = torch.zeros(s.max_slots, s._blocks_for(max_new_tokens), dtype=torch.int32, device=dev)

    def run(self) -> dict:
        while self.pending or self.active:
            if not self.admit() and not self.running:
                # Every block is held by prompts whose rollouts wait for room: drop the newest one's KV.
                self.evict(self.active[-1])
                continue
            self.reserve_blocks()
            if self.running:
                self.peak_blocks = max(self.peak_blocks, self.s.num_blocks - len(self.pool.free))
                self.decode()
        return self.results

    # -- admission --

    def admit(self) -> int:
        """Start waiting rollouts while slots and blocks allow, prefilling new prompts as needed."""
        started = []
        while self.free_slots and len(self.pool.free) > len(started):
            prompt = next((p for p in self.active if p.waiting), None)
            if prompt is None:
                if not self.prefill_pending(len(self.pool.free) - len(started)):
                    break
                continue
            rollout = _Rollout(prompt, prompt.waiting.popleft(), self.free_slots.pop())
            self.pool.retain(prompt.blocks)
            prompt.running += 1
            self.running.append(rollout)
            started.append(rollout)
        if started:  # first tokens come straight from the prompts' last logits
            logits = torch.stack([r.prompt.logits for r in started])
            self.record(started, *self.s.sample_tokens(logits, self.keys(started), self.temperature, self.top_p))
        return len(started)

    def prefill_pending(self, free_blocks: int) -> bool:
        """Prefill the next pending prompts that fit (their KV plus one block for a first rollout)."""
        batch = []
        while self.pending and len(batch) < len(self.free_slots):
            need = self.s._blocks_for(len(self.pending[0].tokens)) + 1
            if need > free_blocks:
                break
            free_blocks -= need
            prompt = self.pending.popleft()
            prompt.blocks = self.pool.alloc(need - 1)
            self.s.clear_blocks(prompt.blocks[-1:])  # the others are written whole
            batch.append(prompt)
        if batch:
            logits = self.s.prefill([p.tokens for p in batch], [p.blocks for p in batch])
            for prompt, row in zip(batch, logits):
                prompt.logits = row
            self.active.extend(batch)
        return bool(batch)

    # -- memory --

    def reserve_blocks(self) -> None:
        """Give every running rollout the block its next token goes into."""
        writes, i = [], 0
        while i < len(self.running):  # oldest first; preemption only ever removes the newest
            rollout = self.running[i]
            if len(rollout.blocks) * self.s.block_size < rollout.length:
                block = self.alloc_block(rollout)
                if block is None:  # the rollout itself was the newest and was preempted
                    break
                writes.append((rollout.slot, len(rollout.blocks), block))
                rollout.blocks.append(block)
            i += 1
        if writes:
            self.s.clear_blocks([block for _, _, block in writes])
            slot, index, block = torch.tensor(writes, device=self.s.device).T
            self.slot_blocks[slot, index] = block.to(torch.int32)

    def alloc_block(self, rollout: _Rollout) -> int | None:
        """A free block; when none is left, first drop the KV of prompts with no running rollout
        (newest first), then preempt the newest running rollout (it restarts later)."""
        while not (got := self.pool.alloc(1)):
            idle = [p for p in self.active if p.running == 0]
            if idle:
                self.evict(idle[-1])
                continue
            victim = self.running.pop()
            self.preemptions += 1
            self.pool.release(victim.blocks + victim.prompt.blocks)
            victim.prompt.waiting.appendleft(victim.sample)
            victim.prompt.running -= 1
            self.free_slots.append(victim.slot)
            if victim is rollout:
                return None
        return got[0]

    def evict(self, prompt: _Prompt) -> None:
        """Free an idle prompt's KV; it is prefilled again when its rollouts get room."""
        self.evictions += 1
        self.pool.release(prompt.blocks)
        prompt.blocks = prompt.logits = None
        self.active.remove(prompt)
        self.pending.appendleft(prompt)  # evicted newest-first, so pending stays in prompt order

    # -- decoding --

    def keys(self, rollouts: list[_Rollout]) -> torch.Tensor:
        rows = torch.tensor([(self.prompt_keys[r.prompt.index], r.sample, r.length) for r in rollouts],
                            device=self.s.device).T
        return sample_keys(self.seed, *rows)

    def decode(self) -> None:
        """One token for every running rollout: feed its last token, attend, sample."""
        s, dev = self.s, self.s.device
        rows = sorted(self.running, key=lambda r: r.prompt.index)  # a prompt's rollouts are contiguous
        groups = list(dict.fromkeys(r.prompt for r in rows))
        counts = Counter(r.prompt.index for r in rows)
        slot = torch.tensor([r.slot for r in rows], device=dev)
        pos = torch.tensor([r.length - 1 for r in rows], device=dev)  # own position of the fed token
        group_count = torch.tensor([counts[g.index] for g in groups], dtype=torch.int32, device=dev)
        prompt_len = torch.tensor([len(g.tokens) for g in groups], dtype=torch.int32, device=dev)
        block_table = self.slot_blocks[slot]
        batch = DecodeBatch(
            tokens=self.out_tok[slot, pos], positions=prompt_len.repeat_interleave(group_count.long()) + pos,
            keys=self.keys(rows), seq_len=(pos + 1).to(torch.int32), block_table=block_table,
            write_slots=block_table[torch.arange(len(rows), device=dev), pos // s.block_size].long() * s.block_size
            + pos % s.block_size,
            group_start=torch.cumsum(group_count, 0, dtype=torch.int32) - group_count, group_count=group_count,
            prompt_len=prompt_len, prompt_blocks=torch.nn.utils.rnn.pad_sequence(
                [torch.tensor(g.blocks, dtype=torch.int32) for g in groups], batch_first=True).to(dev),
            num_splits=max(1, min(8, -(-max(r.length for r in rows) // 512))), max_count=max(counts.values()))
        self.record(rows, *s.decode_step(batch, self.temperature, self.top_p))

    def record(self, rollouts: list[_Rollout], tok, lp, ent) -> None:
        """Store each rollout's new token; finished rollouts leave and free their slot and blocks."""
        slot = torch.tensor([r.slot for r in rollouts], device=self.s.device)
        length = torch.tensor([r.length for r in rollouts], device=self.s.device)
        self.out_tok[slot, length], self.out_lp[slot, length], self.out_ent[slot, length] = tok, lp, ent
        stopped = torch.isin(tok, self.stop_ids)
        done = (stopped | (length + 1 == self.max_new)).tolist()
        for rollout, is_done, is_stop in zip(rollouts, done, stopped.tolist()):
            rollout.length += 1
            if is_done:
                self.finish(rollout, "stop" if is_stop else "length")

    def finish(self, rollout: _Rollout, reason: str) -> None:
        i, n = rollout.slot, rollout.length
        self.results[(rollout.prompt.index, rollout.sample)] = (
            self.out_tok[i, :n].tolist(), self.out_lp[i, :n].clone(), self.out_ent[i, :n].clone(), reason)
        self.running.remove(rollout)
        self.free_slots.append(rollout.slot)
        prompt = rollout.prompt
        self.pool.release(rollout.blocks + prompt.blocks)
        prompt.running -= 1
        prompt.unfinished -= 1
        if prompt.unfinished == 0:  # its last rollout: the prompt's own reference goes
            self.pool.release(prompt.blocks)
            self.active.remove(prompt)
