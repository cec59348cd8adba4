"""fanout's sampler: our own forward pass for Llama / Qwen2 / Qwen3-shaped decoder LMs.

Each prompt is prefilled once and its KV is shared by all of its rollouts: at every decode
step a rollout attends to (a) its prompt's KV, computed for all rollouts of that prompt
together as one matrix product, and (b) its own generated KV; the two partial results are
merged with their log-sum-exps (DESIGN.md, "Shared-prefix attention").

    sampler = Sampler(ModelConfig.from_hf(hf_config), model.state_dict(), "cpu", kv_budget_tokens=1 << 16)
    out = sampler.generate([[1, 2, 3]], n=[8], max_new_tokens=32, temperature=1.0, stop_token_ids=[2], seed=0)

Randomness is keyed by (seed, prompt index, sample index, position) with a counter-based
hash and Gumbel-max, so a request gives the same tokens whatever the batch it runs in.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


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


# ---- keyed randomness: a 32-bit integer hash held in int64 (constants < 2^31, so no overflow) ----

_M32 = 0xFFFFFFFF


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A bijective mixing function on uint32 values (Wellons' lowbias32 family)."""
    x = x & _M32  # a fresh copy; the rest works in place
    x ^= x >> 16
    x *= 0x21F0AAAD
    x &= _M32
    x ^= x >> 15
    x *= 0x735A2D97
    x &= _M32
    x ^= x >> 15
    return x


def sample_keys(seed: int, prompt: torch.Tensor, sample: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """One uint32 key per row from (seed, prompt index, sample index, position)."""
    k = hash32(torch.full_like(prompt, seed) + 0x9E3779B9)
    for part in (prompt, sample, position):
        k = hash32(k + part)
    return k


def uniform(keys: torch.Tensor, token_hash: torch.Tensor) -> torch.Tensor:
    """[rows, vocab] uniforms in (0, 1) from hash32(hash32(token id) ^ key).

    Two rows share a value only where hash32(i) ^ hash32(j) equals their keys' xor: about
    vocab^2 / 2^32 pairs, under one for a 50k vocabulary, so rows are independent in practice."""
    x = hash32(token_hash[None] ^ keys[:, None])
    return ((x >> 8).float() + 0.5) * 2.0 ** -24


def gumbel_argmax(z: torch.Tensor, keys: torch.Tensor, rows_per_chunk: int = 16) -> torch.Tensor:
    """argmax(z + Gumbel noise) per row: an exact draw from softmax(z). Row chunks keep the
    [chunk, vocab] integer temporaries in cache (12x faster than whole-batch on CPU)."""
    token_hash = hash32(torch.arange(z.shape[-1], device=z.device))
    out = torch.empty(z.shape[0], dtype=torch.long, device=z.device)
    for s in range(0, z.shape[0], rows_per_chunk):
        u = uniform(keys[s:s + rows_per_chunk], token_hash)
        out[s:s + rows_per_chunk] = (z[s:s + rows_per_chunk] - u.log_().neg_().log_()).argmax(-1)
    return out


def sample_tokens(logits: torch.Tensor, keys: torch.Tensor, temperature: float, top_p: float = 1.0):
    """Token, its logprob and the entropy of the sampling distribution, per row.

    temperature 0 is greedy; its logprob and entropy are those of softmax(logits)."""
    z = logits.float() / (temperature if temperature > 0 else 1.0)
    if top_p < 1.0:  # nucleus: keep the smallest set of tokens whose mass reaches top_p
        sorted_z, order = z.sort(-1, descending=True)
        mass_before = sorted_z.softmax(-1).cumsum(-1) - sorted_z.softmax(-1)
        z = z.scatter(-1, order, sorted_z.masked_fill(mass_before >= top_p, -math.inf))
    logp = z.log_softmax(-1)
    tokens = gumbel_argmax(z, keys) if temperature > 0 else z.argmax(-1)
    entropy = torch.special.entr(logp.exp()).sum(-1)
    return tokens, logp.gather(-1, tokens[:, None])[:, 0], entropy


# ---- the model ----

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim]; cos, sin [T, head_dim] (HF's rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), -1)
    return x * cos[:, None] + rotated * sin[:, None]


def attention_partial(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, key_mask=None):
    """Grouped-query attention of q [..., kv_heads, rows, d] over k, v [..., kv_heads, S, d].

    Returns the partial output and its log-sum-exp, to be merged with another partial."""
    scores = (q @ k.transpose(-1, -2)).float() * scale
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask, -math.inf)
    lse = scores.logsumexp(-1)
    out = (scores - lse[..., None]).exp().to(v.dtype) @ v
    return out, lse


def merge_partials(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor) -> torch.Tensor:
    """Combine two softmax-attention partials over disjoint key sets."""
    lse = torch.logaddexp(lse1, lse2)
    return (o1.float() * (lse1 - lse).exp()[..., None] + o2.float() * (lse2 - lse).exp()[..., None]).to(o1.dtype)


class Sampler:
    """Batched generation over a KV cache in which each prompt's KV is stored once."""

    def __init__(self, model_config: ModelConfig, weights: dict, device="cpu", kv_budget_tokens: int = 1 << 20,
                 block_size: int = 16, dtype: torch.dtype = torch.bfloat16):
        self.cfg, self.device, self.dtype = model_config, torch.device(device), dtype
        self.kv_budget_tokens, self.block_size = kv_budget_tokens, block_size
        self.weights = {name: w.detach().to(self.device, dtype).clone() for name, w in weights.items()}
        if "lm_head.weight" not in self.weights:  # tied embeddings
            self.weights["lm_head.weight"] = self.weights["model.embed_tokens.weight"]
        half = model_config.head_dim // 2
        self.inv_freq = 1.0 / model_config.rope_theta ** (torch.arange(half, device=self.device).float() / half)

    def load_weights(self, weights: dict) -> None:
        """Copy new weights into the sampler's buffers in place (tied heads follow the embedding)."""
        with torch.no_grad():
            for name, w in weights.items():
                if name in self.weights:
                    self.weights[name].copy_(w)

    # -- forward pieces --

    def _rope_tables(self, positions: torch.Tensor):
        freqs = positions.float()[:, None] * self.inv_freq[None]
        emb = torch.cat((freqs, freqs), -1)
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self.weights[name + ".weight"], self.weights.get(name + ".bias"))

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, attend) -> torch.Tensor:
        """Final hidden states [..., T, hidden]; attend(layer, q, k, v) -> [..., T, heads, d]."""
        c, w = self.cfg, self.weights
        x = w["model.embed_tokens.weight"][tokens]
        cos, sin = self._rope_tables(positions)
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
        return rms_norm(x, w["model.norm.weight"], c.rms_norm_eps)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weights["lm_head.weight"]).float()

    def prefill(self, prompts: list[list[int]]):
        """Run the prompts once, right-padded into one batch (causal attention never lets a real
        position see the padding). Returns per-layer (k, v) [prompts, kv_heads, P_max, d], the
        prompt lengths and each prompt's last-position logits."""
        c = self.cfg
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        tokens = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long, device=self.device)
        for i, p in enumerate(prompts):
            tokens[i, :len(p)] = torch.tensor(p, device=self.device)
        kv = []

        def attend(layer, q, k, v):
            k, v = k.transpose(1, 2), v.transpose(1, 2)  # [prompts, kv_heads, P, d]
            kv.append((k, v))
            rep = c.num_heads // c.num_kv_heads
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.repeat_interleave(rep, 1),
                                               v.repeat_interleave(rep, 1), is_causal=True)
            return o.transpose(1, 2)

        hidden = self._forward(tokens, torch.arange(tokens.shape[1], device=self.device), attend)
        return kv, lengths, self._logits(hidden[torch.arange(len(prompts)), lengths - 1])

    def _decode_step(self, tokens, positions, prompt_kv, prompt_len, row_group, row_slot, own_k, own_v, t):
        """Feed one token per row at own-cache index t. Row r belongs to prompt row_group[r] and is
        its row_slot[r]-th running rollout."""
        c = self.cfg
        rep, scale = c.num_heads // c.num_kv_heads, c.head_dim ** -0.5
        groups, width = prompt_len.shape[0], int(row_slot.max()) + 1
        key_mask = torch.arange(prompt_kv[0][0].shape[2], device=self.device)[None] < prompt_len[:, None]

        def attend(layer, q, k, v):
            own_k[layer][:, :, t], own_v[layer][:, :, t] = k, v
            q = q.view(-1, c.num_kv_heads, rep, c.head_dim)
            # (a) prompt KV: the queries of every rollout of a prompt against that prompt's keys,
            # one matrix product per prompt, so the prompt KV is read once per step
            pk, pv = prompt_kv[layer]
            qg = q.new_zeros(groups, width, c.num_kv_heads, rep, c.head_dim)
            qg[row_group, row_slot] = q
            qg = qg.permute(0, 2, 1, 3, 4).reshape(groups, c.num_kv_heads, width * rep, c.head_dim)
            o1, lse1 = attention_partial(qg, pk, pv, scale, key_mask[:, None, None, :])
            o1 = o1.view(groups, c.num_kv_heads, width, rep, -1).permute(0, 2, 1, 3, 4)[row_group, row_slot]
            lse1 = lse1.view(groups, c.num_kv_heads, width, rep).permute(0, 2, 1, 3)[row_group, row_slot]
            # (b) each rollout's own tokens so far
            o2, lse2 = attention_partial(q, own_k[layer][:, :, :t + 1], own_v[layer][:, :, :t + 1], scale)
            return merge_partials(o1, lse1, o2, lse2).reshape(-1, c.num_heads, c.head_dim)

        return self._logits(self._forward(tokens, positions, attend))

    # -- generation --

    def generate(self, prompts: list[list[int]], n: list[int], max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, stop_token_ids=(), seed: int = 0, prompt_offset: int = 0) -> Rollouts:
        """n[i] rollouts of prompts[i]; returns them ordered by (prompt index, sample index).

        Prompt i is keyed as prompt_offset + i, so a request split over several calls (or ranks)
        samples exactly the same tokens as the whole request in one call."""
        if len(n) != len(prompts):
            raise ValueError(f"generate got {len(prompts)} prompts but {len(n)} rollout counts; pass one n per prompt")
        results = {}
        for wave in self._waves(prompts, n, max_new_tokens):
            results.update(self._generate_wave(prompts, wave, max_new_tokens, temperature, top_p,
                                               set(stop_token_ids), seed, prompt_offset))
        order = sorted(results)
        return Rollouts(prompt_index=[p for p, _ in order], sample_index=[s for _, s in order],
                        tokens=[results[key][0] for key in order], logprobs=[results[key][1] for key in order],
                        entropies=[results[key][2] for key in order], finish_reason=[results[key][3] for key in order])

    def _waves(self, prompts, n, max_new_tokens):
        """Split the request into waves whose KV (prompts once + each rollout's own tokens) fits the budget."""
        wave, cost = [], 0
        for p, count in enumerate(n):
            need = len(prompts[p]) + max_new_tokens
            if need > self.kv_budget_tokens:
                raise ValueError(f"prompt {p} ({len(prompts[p])} tokens) plus max_new_tokens={max_new_tokens} "
                                 f"exceeds kv_budget_tokens={self.kv_budget_tokens}; raise the budget")
            for s in range(count):
                extra = max_new_tokens + (len(prompts[p]) if not wave or wave[-1][0] != p else 0)
                if wave and cost + extra > self.kv_budget_tokens:
                    yield wave
                    wave, cost = [], 0
                    extra = need
                wave.append((p, s))
                cost += extra
        if wave:
            yield wave

    @torch.no_grad()
    def _generate_wave(self, prompts, wave, max_new_tokens, temperature, top_p, stop_ids, seed, prompt_offset):
        c, dev = self.cfg, self.device
        prompt_ids = sorted({p for p, _ in wave})
        prompt_kv, prompt_len, last_logits = self.prefill([prompts[p] for p in prompt_ids])
        rows = torch.tensor(wave, device=dev)                      # [B, 2]: (prompt, sample)
        group = torch.tensor([prompt_ids.index(p) for p, _ in wave], device=dev)
        logits = last_logits[group]
        B = len(wave)
        own_k = [torch.empty(B, c.num_kv_heads, max_new_tokens, c.head_dim, device=dev, dtype=self.dtype)
                 for _ in range(c.num_layers)]
        own_v = [torch.empty_like(k) for k in own_k]
        out_tok = torch.zeros(B, max_new_tokens, dtype=torch.long, device=dev)
        out_lp, out_ent = torch.zeros(B, max_new_tokens, device=dev), torch.zeros(B, max_new_tokens, device=dev)
        alive = torch.arange(B, device=dev)                          # original row of each active row
        results = {}
        for t in range(max_new_tokens):
            keys = sample_keys(seed, rows[alive, 0] + prompt_offset, rows[alive, 1], torch.full_like(alive, t))
            tok, lp, ent = sample_tokens(logits, keys, temperature, top_p)
            out_tok[alive, t], out_lp[alive, t], out_ent[alive, t] = tok, lp, ent
            stopped = torch.tensor([x in stop_ids for x in tok.tolist()], device=dev, dtype=torch.bool)
            done = stopped | (t == max_new_tokens - 1)
            for r, stop in zip(alive[done].tolist(), stopped[done].tolist()):
                results[tuple(wave[r])] = (out_tok[r, :t + 1].tolist(), out_lp[r, :t + 1].clone(),
                                           out_ent[r, :t + 1].clone(), "stop" if stop else "length")
            if done.all():
                break
            if done.any():  # finished rows leave the batch
                keep = (~done).nonzero()[:, 0]
                alive, tok = alive[keep], tok[keep]
                own_k, own_v = [k[keep] for k in own_k], [v[keep] for v in own_v]
            g = group[alive]  # rows stay sorted by prompt, so a row's slot is its rank inside its run
            starts = torch.searchsorted(g, g, right=False)
            slot = torch.arange(len(g), device=dev) - starts
            logits = self._decode_step(tok, prompt_len[g] + t, prompt_kv, prompt_len, g, slot, own_k, own_v, t)
        return results
