"""fanout's objectives: pure tensor functions, named as in ALGORITHMS.md section 0.

Shapes: per-response tensors are [R] (R responses, `group` holds each one's prompt id);
per-token tensors are [N] over the concatenated response tokens of a micro-batch.
"""

import torch

ADVANTAGE_KINDS = ("grpo", "drgrpo", "rloo", "reinforce++")
KL_KINDS = ("k1", "k2", "k3")


def group_stats(rewards: torch.Tensor, group: torch.Tensor):
    """Per-response group mean, unbiased group std (1 for groups of one) and group size."""
    _, inv, counts = group.unique(return_inverse=True, return_counts=True)
    total = torch.zeros(len(counts), dtype=rewards.dtype, device=rewards.device).index_add_(0, inv, rewards)
    mean = total / counts
    sq = torch.zeros_like(total).index_add_(0, inv, (rewards - mean[inv]) ** 2)
    std = torch.where(counts > 1, (sq / (counts - 1).clamp(min=1)).sqrt(), torch.ones_like(sq))
    return mean[inv], std[inv], counts[inv]


def advantages(rewards: torch.Tensor, group: torch.Tensor, kind: str = "grpo", batch_stats=None,
               eps: float = 1e-6) -> torch.Tensor:
    """A_i for each response (ALGORITHMS.md 0).

    grpo: (r - mean_g) / (std_g + eps); drgrpo: r - mean_g; rloo: r - mean of the other G-1;
    reinforce++: r - mean_g, then z-scored over the whole batch. `batch_stats` = (mean, std) of
    those centred advantages over all ranks (train.py all-reduces them); None = this batch."""
    mean, std, count = group_stats(rewards, group)
    centred = rewards - mean
    if kind == "grpo":
        return centred / (std + eps)
    if kind == "drgrpo":
        return centred
    if kind == "rloo":  # r - (sum - r)/(G-1) = G/(G-1) (r - mean); a group of one has no baseline: 0
        return torch.where(count > 1, centred * count / (count - 1).clamp(min=1), torch.zeros_like(centred))
    if kind == "reinforce++":
        m, s = batch_stats if batch_stats is not None else (centred.mean(), centred.std(unbiased=False))
        return (centred - m) / (s + eps)
    raise ValueError(f"unknown advantage kind '{kind}'; use one of {', '.join(ADVANTAGE_KINDS)}")


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, eps_low: float = 0.2,
                eps_high: float = 0.28):
    """Per-token PPO-clip loss with decoupled bounds ("clip-higher"), and which tokens were clipped.

    l_t = -min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A), rho_t = pi / pi_old."""
    ratio = (logp - old_logp).exp()
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high) * adv
    return -torch.minimum(unclipped, clipped), (clipped < unclipped).float()


def kl(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimators on d = log pi - log pi_ref."""
    d = logp - ref_logp
    if kind == "k1":
        return d
    if kind == "k2":
        return d ** 2 / 2
    if kind == "k3":  # low variance, non-negative
        return torch.exp(-d) - 1 + d
    raise ValueError(f"unknown KL kind '{kind}'; use one of {', '.join(KL_KINDS)}")


def token_mean(token_loss: torch.Tensor, global_tokens: int) -> torch.Tensor:
    """Sum over this micro-batch's tokens over the token count of the whole global batch (all
    micro-batches, all ranks): summing the micro-batch losses gives the global token mean."""
    return token_loss.sum() / max(global_tokens, 1)
