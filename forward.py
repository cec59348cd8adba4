"""The sampler's forward pass: a Llama / Qwen2 / Qwen3-shaped decoder over HF's weights grouped by layer, the shapes
as data, attention the caller's (prefill and decode attend differently over the paged KV pool).

    logits = forward(ModelConfig.from_hf(hf_config), sampler.forward_weights(), tokens, positions, attend, pools)
"""

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
    tied: bool = False  # the LM head is the embedding: the weights hold it once

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
            rms_norm_eps=cfg.rms_norm_eps, rope_theta=rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)),
            tied=bool(getattr(cfg, "tie_word_embeddings", False)))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., T, heads, head_dim]; cos, sin [..., T, head_dim] (HF's rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), -1)
    return x * cos.unsqueeze(-2) + rotated * sin.unsqueeze(-2)


# F.linear with a weight prepacked for oneDNN (Sampler.forward_weights on a CPU): an op of its own, so a compiled
# layer calls it between the code the compiler fuses, defined bare (a custom_op's autograd wrapper costs 7 us a call)
_lib = torch.library.Library("fanout", "DEF")
_lib.define("packed_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
_lib.impl("packed_linear", lambda x, w, b: torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], ""),
          "CompositeExplicitAutograd")
torch.library.register_fake("fanout::packed_linear", lambda x, w, b: x.new_empty(*x.shape[:-1], w.shape[0]))


def linear(w: dict, x: torch.Tensor, name: str) -> torch.Tensor:
    if name + ".packed" in w:
        return torch.ops.fanout.packed_linear(x, w[name + ".packed"], w.get(name + ".bias"))
    return F.linear(x, w[name + ".weight"], w.get(name + ".bias"))


def decoder_layer(c: ModelConfig, w: dict, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend,
                  *context) -> torch.Tensor:
    """One layer over its weights `w` (HF's names within the layer); attend(q, k, v, *context) -> o."""
    h = rms_norm(x, w["input_layernorm.weight"], c.rms_norm_eps)
    q, k, v = (linear(w, h, f"self_attn.{p}_proj").unflatten(-1, (-1, c.head_dim)) for p in "qkv")
    if "self_attn.q_norm.weight" in w:  # Qwen3
        q = rms_norm(q, w["self_attn.q_norm.weight"], c.rms_norm_eps)
        k = rms_norm(k, w["self_attn.k_norm.weight"], c.rms_norm_eps)
    x = x + linear(w, attend(rope(q, cos, sin), rope(k, cos, sin), v, *context).flatten(-2), "self_attn.o_proj")
    h = rms_norm(x, w["post_attention_layernorm.weight"], c.rms_norm_eps)
    return x + linear(w, F.silu(linear(w, h, "mlp.gate_proj")) * linear(w, h, "mlp.up_proj"), "mlp.down_proj")


def forward(c: ModelConfig, w: dict, tokens: torch.Tensor, positions: torch.Tensor, attend, pools, context=(),
            keep=None, layer=decoder_layer) -> torch.Tensor:
    """Logits, in the weights' dtype, of `tokens` at `positions` (of x[keep] alone, if given) over forward_weights `w`;
    layer i attends by attend(q, k, v, k_pool[i], v_pool[i], *context) -> o, pools = (k_pool, v_pool)."""
    x = w["model.embed_tokens.weight"][tokens]
    half = c.head_dim // 2
    inv_freq = 1.0 / c.rope_theta ** (torch.arange(half, device=x.device).float() / half)
    angles = positions.float()[..., None] * inv_freq.repeat(2)  # one frequency list for each half (rotate-half)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    for lw, k_pool, v_pool in zip(w["layers"], *pools):
        x = layer(c, lw, x, cos, sin, attend, k_pool, v_pool, *context)
    x = rms_norm(x if keep is None else x[keep], w["model.norm.weight"], c.rms_norm_eps)
    return linear(w, x, "lm_head")
