"""LoRA (Hu et al., 2021): beside each chosen linear layer's frozen weight W, a trained low-rank update, so the
layer computes x W^T + (alpha / r) x A^T B^T. B starts at zero: step 0 is the base model. The sampler and the
export get W + (alpha / r) B A under W's own name (`merged`); outputs.export_hf writes the adapters as PEFT does.

    add_adapters(lm, cfg)      # lm frozen; its decoder layers' --lora-targets adapted, adapters trainable
"""

import math

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from config import Config


class LoRALinear(torch.nn.Linear):
    """A base linear layer's weight and bias, under their own names, and an adapter named as PEFT names it:
    lora_A.weight [r, in] (PEFT's Kaiming init) and lora_B.weight [out, r] (zeros)."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float, dropout: float, generator):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.lora_A = torch.nn.Linear(self.in_features, rank, bias=False, device=base.weight.device)
        self.lora_B = torch.nn.Linear(rank, self.out_features, bias=False, device=base.weight.device)
        torch.nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5), generator=generator)
        torch.nn.init.zeros_(self.lora_B.weight)
        self.scale, self.dropout, self.enabled = alpha / rank, dropout, True

    def forward(self, x):
        out = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return out
        # dropout in the update passes only (those with gradients), as PEFT's in training mode
        return out + self.lora_B(self.lora_A(F.dropout(x, self.dropout, torch.is_grad_enabled()))) * self.scale


def add_adapters(lm, cfg: Config) -> None:
    """Freeze lm and adapt each linear layer of its decoder layers named by --lora-targets; ValueError (one sentence,
    lm untouched) for a target that matches nothing or a layer other than a linear one, or a rank above its sizes."""
    layers = lm.model.layers
    chosen = [(name, m) for name, m in layers.named_modules() if name.rpartition(".")[2] in cfg.lora_targets]
    linear = sorted({n.rpartition(".")[2] for n, m in layers.named_modules() if type(m) is torch.nn.Linear})
    for target in cfg.lora_targets or ["(none)"]:  # none given: nothing would train
        if not any(name.endswith("." + target) for name, _ in chosen):
            raise ValueError(f"--lora-targets {target} matches no layer in this model's decoder layers; name some of "
                             f"its linear layers: {' '.join(linear)}")
    for name, m in chosen:
        target = name.rpartition(".")[2]
        if type(m) is not torch.nn.Linear:
            raise ValueError(f"--lora-targets {target}: this model's {target} is a {type(m).__name__}, not a "
                             "torch.nn.Linear, so LoRA cannot adapt it; drop it from --lora-targets")
        if cfg.lora_rank > min(m.in_features, m.out_features):
            raise ValueError(f"--lora-rank {cfg.lora_rank} is above {target}'s dimensions ({m.in_features} in, "
                             f"{m.out_features} out); use at most {min(m.in_features, m.out_features)}")
    lm.requires_grad_(False)
    generator = torch.Generator().manual_seed(cfg.seed)
    for name, m in chosen:
        layers.set_submodule(name, LoRALinear(m, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, generator))


def adapter_names(lm) -> list[str]:
    """The adapters' tensor names, in a fixed order (none without LoRA)."""
    return sorted(name for name in lm.state_dict() if ".lora_" in name)


def merged(lm, names, received: dict | None = None):
    """(name, whole tensor) for each of `names`, gathered from FSDP2's shards one at a time: an adapted layer's
    weight as W + (alpha / r) B A, with `received` adapter tensors (a searcher's) in place of the model's own."""
    state = {**lm.state_dict(), **(received or {})}
    whole = lambda name: state[name].full_tensor() if isinstance(state[name], DTensor) else state[name]
    adapted = {f"{n}.weight": (n, m.scale) for n, m in lm.named_modules() if isinstance(m, LoRALinear)}
    for name in names:
        w = whole(name)
        if name in adapted:
            prefix, scale = adapted[name]
            B, A = (whole(f"{prefix}.lora_{x}.weight").float() for x in "BA")
            w = w.float() + scale * (B @ A).to(w.device)  # a searcher's adapters arrive on the CPU
        yield name, w
