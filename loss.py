"""fanout's objectives, pure tensor functions named as in ALGORITHMS.md 0 (base family), 2 (TB) and 4 (EchoRL).
Per-response tensors are [R] (`group`: each one's prompt id); per-token ones [N] over a micro-batch's response
tokens, `seq_ids` naming each token's sequence. A division by a global count (over all micro-batches and ranks)
makes the micro-batches' values sum to the global one. Options are checked once, in config.py.
"""

import torch


# ---- base family (ALGORITHMS.md 0) ----

def group_min_max(values: torch.Tensor, group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per response: the smallest and the largest value in its group (exact, unlike a float std)."""
    _, inv, counts = group.unique(return_inverse=True, return_counts=True)
    return tuple(values.new_zeros(len(counts)).scatter_reduce(0, inv, values, op, include_self=False)[inv]
                 for op in ("amin", "amax"))


def group_stats(rewards: torch.Tensor, group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-response group mean, unbiased group std (1 for groups of one) and group size."""
    _, inv, counts = group.unique(return_inverse=True, return_counts=True)
    mean = (rewards.new_zeros(len(counts)).index_add(0, inv, rewards) / counts)[inv]
    # A float sum is inexact: equal rewards of 0.7 would get mean 0.7 +- 1 ulp, a std of ~1e-8 and GRPO
    # advantages of ~0.05 instead of 0. Use the exact value when a group's rewards are all equal.
    lo, hi = group_min_max(rewards, group)
    mean = torch.where(hi == lo, hi, mean)
    sq = rewards.new_zeros(len(counts)).index_add(0, inv, (rewards - mean) ** 2)
    std = torch.where(counts > 1, (sq / (counts - 1).clamp(min=1)).sqrt(), torch.ones_like(sq))
    return mean, std[inv], counts[inv]


def advantages(rewards: torch.Tensor, group: torch.Tensor, kind: str = "grpo", batch_stats=None) -> torch.Tensor:
    """A_i per response (ALGORITHMS.md 0): grpo (r - mean_g) / (std_g + 1e-6); drgrpo r - mean_g; rloo r - mean
    of the other G-1; reinforce++ r - mean_g z-scored over the batch, `batch_stats` its (mean, std) over all
    ranks (None: this batch). A group of one or of equal rewards gets 0 (but reinforce++'s batch shift)."""
    mean, std, count = group_stats(rewards, group)
    centred = rewards - mean
    if kind == "grpo":
        return centred / (std + 1e-6)
    if kind == "drgrpo":
        return centred
    if kind == "rloo":  # r - (sum - r)/(G-1) = G/(G-1) (r - mean); a group of one has no baseline: 0
        return torch.where(count > 1, centred * count / (count - 1).clamp(min=1), torch.zeros_like(centred))
    assert kind == "reinforce++", kind
    m, s = batch_stats if batch_stats is not None else (centred.mean(), centred.std(unbiased=False))
    return (centred - m) / (s + 1e-6)


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, eps_low: float = 0.2,
                eps_high: float = 0.28, dual_clip: float = 0.0,
                tis_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO-clip loss with decoupled bounds (clip-higher), and a float mask of the tokens either clip cut:
    l_t = -min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A), rho_t = pi / pi_old. dual_clip c > 1 (0: off):
    for A < 0, l_t <= c |A|, so a huge ratio on a bad token cannot blow up the loss. tis_weight: multiplied in."""
    ratio = (logp - old_logp).exp()
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    mask = clipped < unclipped
    if dual_clip > 0:
        cap = -dual_clip * adv
        capped = (adv < 0) & (loss > cap)
        loss, mask = torch.where(capped, cap, loss), mask | capped
    if tis_weight is not None:
        loss = loss * tis_weight.detach()
    return loss, mask.float()


def tis_weight(trainer_old_logp: torch.Tensor, sampler_logp: torch.Tensor, cap: float = 2.0) -> torch.Tensor:
    """Truncated importance weight min(pi_old_trainer / pi_sampler, C) per token (ALGORITHMS.md 0), detached."""
    return (trainer_old_logp - sampler_logp).exp().clamp(max=cap).detach()


def kl(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimators on d = log pi - log pi_ref: k1 = d, k2 = d^2 / 2, k3 = e^-d - 1 + d."""
    d = logp - ref_logp
    return {"k1": lambda: d, "k2": lambda: d ** 2 / 2, "k3": lambda: torch.exp(-d) - 1 + d}[kind]()


def seq_token_means(token_values: torch.Tensor, seq_ids: torch.Tensor) -> torch.Tensor:
    """[S]: the token mean of each sequence that has tokens here (any ids, any order)."""
    _, inv, counts = seq_ids.unique(return_inverse=True, return_counts=True)
    return token_values.new_zeros(len(counts)).index_add(0, inv, token_values) / counts


def aggregate(token_loss: torch.Tensor, seq_ids: torch.Tensor, mode: str, global_tokens: int, global_seqs: int,
              norm_len: int | None = None) -> torch.Tensor:
    """This micro-batch's share of the global loss (ALGORITHMS.md 0): token-mean, sum / global tokens;
    seq-mean-token-mean, each sequence's token mean (a sequence lies in one micro-batch) / global sequences;
    seq-mean-token-sum-norm (Dr.GRPO), token sums / norm_len (a constant: long answers keep their weight)."""
    if mode == "token-mean":
        return token_loss.sum() / max(global_tokens, 1)
    if mode == "seq-mean-token-mean":
        return seq_token_means(token_loss, seq_ids).sum() / max(global_seqs, 1)
    assert mode == "seq-mean-token-sum-norm", mode
    return token_loss.sum() / norm_len / max(global_seqs, 1)


# ---- trajectory balance (ALGORITHMS.md 2) ----

def _tb_s(seq_logp: torch.Tensor, seq_ref_logp: torch.Tensor, rewards: torch.Tensor, beta: float) -> torch.Tensor:
    """s = log pi(y|x) - log pi_ref(y|x) - r / beta, on sequence log-probs (sums over response tokens)."""
    return seq_logp - seq_ref_logp - rewards / beta


def tb_log_z(seq_logp: torch.Tensor, seq_ref_logp: torch.Tensor, rewards: torch.Tensor, group: torch.Tensor,
             beta: float) -> torch.Tensor:
    """[R]: the VarGrad log Z of each response's group, -mean_g s, detached (over whole groups)."""
    return -group_stats(_tb_s(seq_logp, seq_ref_logp, rewards, beta).detach(), group)[0]


def tb_loss(seq_logp: torch.Tensor, seq_ref_logp: torch.Tensor, rewards: torch.Tensor, group: torch.Tensor,
            beta: float, log_z: torch.Tensor | None = None) -> torch.Tensor:
    """[R]: (log Z + s)^2 per response, to be summed and divided by the global response count. On-policy its
    gradient is 2/beta x REINFORCE's with advantage (r - mean_g r) - beta (KL - mean_g KL); off-policy, no ratio."""
    if log_z is None:
        log_z = tb_log_z(seq_logp, seq_ref_logp, rewards, group, beta)
    return (log_z.detach() + _tb_s(seq_logp, seq_ref_logp, rewards, beta)) ** 2


def tb_beta(step: int, beta_start: float, beta_end: float, beta_steps: int) -> float:
    """beta, linear from beta_start to beta_end over beta_steps steps, then constant."""
    return beta_end if step >= beta_steps else beta_start + (beta_end - beta_start) * step / beta_steps


# ---- EchoRL (ALGORITHMS.md 4) ----

def step_token_ids(tokenizer) -> tuple[set[int], set[int]]:
    """(ids whose text ends in a newline, ids whose text is blank), decoded (byte-level BPE stores a newline as Ċ)."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return {i for i, t in enumerate(texts) if t.endswith("\n")}, {i for i, t in enumerate(texts) if not t.strip()}


def _steps(tokens: list[int], entropies: list[float], own: list[bool], newline_ids: set[int], blank_ids: set[int]):
    """(end, mean entropy of its `own` tokens) of each step (to a newline or the end) with 2 or more, not all blank."""
    start = 0
    for t, tok in enumerate(tokens):
        if tok in newline_ids or t == len(tokens) - 1:
            step = [x for x in range(start, t + 1) if own[x]]
            if len(step) >= 2 and not all(tokens[x] in blank_ids for x in step):
                yield t + 1, sum(entropies[x] for x in step) / len(step)
            start = t + 1


def echo_clip(tokens: list[list[int]], entropies, masks, rewards: torch.Tensor, group: torch.Tensor,
              newline_ids: set[int], blank_ids: set[int], success: float = 1.0, mode: str = "all") -> dict[int, int]:
    """{response index: clip length}, one EchoClip per selected group ("all": every response succeeded; "any"): the
    step of highest mean sampler entropy (over the model's tokens: masks) of its successes, the clip its prefix."""
    ok, groups = (rewards >= success).tolist(), group.tolist()
    failed = {g for g, o in zip(groups, ok) if not o}
    best = {}  # group id -> (step entropy, response index, clip length)
    for i, (g, o) in enumerate(zip(groups, ok)):
        if not o or (mode == "all" and g in failed):
            continue
        ent = torch.as_tensor(entropies[i]).tolist()
        if len(ent) != len(tokens[i]):
            raise ValueError(f"response {i} has {len(tokens[i])} tokens but {len(ent)} sampler entropies")
        for end, score in _steps(tokens[i], ent, torch.as_tensor(masks[i]).tolist(), newline_ids, blank_ids):
            if g not in best or score > best[g][0]:
                best[g] = (score, i, end)
    return {i: end for _, i, end in best.values()}


def echo_loss(logp: torch.Tensor, clip_mask: torch.Tensor, seq_ids: torch.Tensor, n_clips: int) -> torch.Tensor:
    """This micro-batch's share of the mean over all clips of each clip's token-mean NLL."""
    return seq_token_means(-logp[clip_mask], seq_ids[clip_mask]).sum() / max(n_clips, 1)
