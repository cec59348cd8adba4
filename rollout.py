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


class Sampler:
    """Generation over a paged KV pool with shared prompt KV and continuous batching."""

    def __init__(self, model_config: ModelConfig, weights: dict, device="cpu", kv_budget_tokens: int = 1 << 20,
                 block_size: int = 16, dtype: torch.dtype = torch.bfloat16, max_slots: int = 1024,
                 use_triton: bool | None = None):
        c = model_config
        self.cfg, self.device, self.dtype = c, torch.device(device), dtype
        self.block_size, self.max_slots = block_size, max_slots
        self.num_blocks = kv_budget_tokens // block_size
        self.weights = {name: w.detach().to(self.device, dtype).clone() for name, w in weights.items()}
        if "lm_head.weight" not in self.weights:  # tied embeddings
            self.weights["lm_head.weight"] = self.weights["model.embed_tokens.weight"]
        half = c.head_dim // 2
        self.inv_freq = 1.0 / c.rope_theta ** (torch.arange(half, device=self.device).float() / half)
        shape = (c.num_layers, self.num_blocks, block_size, c.num_kv_heads, c.head_dim)
        self.k_pool = torch.empty(shape, device=self.device, dtype=dtype)
        self.v_pool = torch.empty(shape, device=self.device, dtype=dtype)
        self.kv_bytes_per_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * self.k_pool.element_size()
        # Triton kernels on CUDA, their plain-torch twins elsewhere (DESIGN.md, Kernels)
        prefix = "" if (self.device.type == "cuda" if use_triton is None else use_triton) else "reference_"
        self.write_kv = getattr(attention, prefix + "write_kv")
        self.prefix_attention = getattr(attention, prefix + "prefix_attention")
        self.decode_attention = getattr(attention, prefix + "decode_attention")
        self.merge_attention = getattr(attention, prefix + "merge_attention")
        self.sample = getattr(sampling, prefix + "sample")

    def load_weights(self, weights: dict) -> None:
        """Copy new weights into the sampler's buffers in place (tied heads follow the embedding)."""
        with torch.no_grad():
            for name, w in weights.items():
                if name in self.weights:
                    self.weights[name].copy_(w)

    # -- forward pieces --

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self.weights[name + ".weight"], self.weights.get(name + ".bias"))

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, attend) -> torch.Tensor:
        """Logits [..., T, vocab] (float32); attend(layer, q, k, v) -> [..., T, heads, d]."""
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
        x = rms_norm(x, w["model.norm.weight"], c.rms_norm_eps)
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

        logits = self.forward(tokens, torch.arange(max(lengths), device=self.device), attend)
        return logits[torch.arange(len(prompts)), torch.tensor(lengths) - 1]

    def sample_tokens(self, logits: torch.Tensor, keys: torch.Tensor, temperature: float, top_p: float):
        """Token, its logprob and the entropy of the sampling distribution, per row."""
        if top_p < 1.0 and temperature > 0:  # nucleus on the tempered distribution (evaluation)
            logits, temperature = nucleus(logits.float() / temperature, top_p), 1.0
        return self.sample(logits, keys, temperature)

    # -- generation --

    def generate(self, prompts: list[list[int]], n: list[int], max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, stop_token_ids=(), seed: int = 0, prompt_offset: int = 0) -> Rollouts:
        """n[i] rollouts of prompts[i]; returns them ordered by (prompt index, sample index).

        Prompt i is keyed as prompt_offset + i, so a request split over several calls (or ranks)
        samples exactly the same tokens as the whole request in one call."""
        if len(n) != len(prompts):
            raise ValueError(f"generate got {len(prompts)} prompts but {len(n)} rollout counts; pass one n per prompt")
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
            if self._blocks_for(len(p)) + self._blocks_for(max_new_tokens) > self.num_blocks:
                raise ValueError(f"prompt {i} ({len(p)} tokens) plus max_new_tokens={max_new_tokens} does not fit "
                                 f"kv_budget_tokens={self.num_blocks * self.block_size}; raise the budget")
        with torch.no_grad():
            run = _Generation(self, prompts, n, max_new_tokens, temperature, top_p, stop_token_ids, seed, prompt_offset)
            results = run.run()
        self.stats = {"preemptions": run.preemptions, "evictions": run.evictions,
                      "peak_kv_tokens": run.peak_blocks * self.block_size}
        keys = sorted(results)
        return Rollouts(prompt_index=[p for p, _ in keys], sample_index=[s for _, s in keys],
                        tokens=[results[k][0] for k in keys], logprobs=[results[k][1] for k in keys],
                        entropies=[results[k][2] for k in keys], finish_reason=[results[k][3] for k in keys])

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

    def __init__(self, s: Sampler, prompts, n, max_new_tokens, temperature, top_p, stop_token_ids, seed, offset):
        self.s, self.max_new, self.temperature, self.top_p = s, max_new_tokens, temperature, top_p
        self.seed, self.offset = seed, offset
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
        rows = torch.tensor([(r.prompt.index + self.offset, r.sample, r.length) for r in rollouts],
                            device=self.s.device).T
        return sample_keys(self.seed, *rows)

    def decode(self) -> None:
        """One token for every running rollout: feed its last token, attend, sample."""
        s, c = self.s, self.s.cfg
        rows = sorted(self.running, key=lambda r: r.prompt.index)  # a prompt's rollouts are contiguous
        groups = list(dict.fromkeys(r.prompt for r in rows))
        dev = s.device
        slot = torch.tensor([r.slot for r in rows], device=dev)
        own_len = torch.tensor([r.length for r in rows], device=dev)  # the fed token is the last of these
        prompt_len = torch.tensor([len(g.tokens) for g in groups], dtype=torch.int32, device=dev)
        counts = Counter(r.prompt.index for r in rows)
        group_count = torch.tensor([counts[g.index] for g in groups], dtype=torch.int32, device=dev)
        group_start = torch.cumsum(group_count, 0, dtype=torch.int32) - group_count
        prompt_blocks = torch.nn.utils.rnn.pad_sequence(
            [torch.tensor(g.blocks, dtype=torch.int32) for g in groups], batch_first=True).to(dev)
        block_table = self.slot_blocks[slot]
        pos = own_len - 1
        write_slots = block_table[torch.arange(len(rows), device=dev), pos // s.block_size].long() * s.block_size \
            + pos % s.block_size
        seq_len = own_len.to(torch.int32)
        splits = max(1, min(8, -(-int(own_len.max()) // 512)))
        scale = c.head_dim ** -0.5

        def attend(layer, q, k, v):
            kp, vp = s.k_pool[layer], s.v_pool[layer]
            s.write_kv(kp, vp, k, v, write_slots)
            o1, lse1 = s.prefix_attention(q, kp, vp, group_start, group_count, prompt_len, prompt_blocks, scale)
            o2, lse2 = s.decode_attention(q, kp, vp, seq_len, block_table, scale, splits)
            return s.merge_attention(o1, lse1, o2, lse2, q.dtype)

        tokens = self.out_tok[slot, pos]
        logits = s.forward(tokens, prompt_len.repeat_interleave(group_count.long()) + pos, attend)
        self.record(rows, *s.sample_tokens(logits, self.keys(rows), self.temperature, self.top_p))

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
