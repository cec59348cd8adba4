"""What to sample next (DESIGN.md data flow, steps 1 and 5): which prompts, how many rollouts each, at what
temperature, which groups carry a learning signal; and TBA's replay buffer. The prompts are a pure function of
(data position, seed), so a resumed run picks the same ones; what depends on rewards has state_dict().
"""

import copy
import math
import random
from typing import Sequence

import numpy as np
import torch

import loss
from config import Config


def pick_prompts(n_items: int, position: int, count: int, seed: int) -> list[int]:
    """The `count` prompts from `position` (prompts drawn before) in the endless sequence of seeded epochs."""
    orders = {}
    for epoch in range(position // n_items, (position + count - 1) // n_items + 1):
        orders[epoch] = list(range(n_items))
        random.Random(seed * 1_000_003 + epoch).shuffle(orders[epoch])
    return [orders[k // n_items][k % n_items] for k in range(position, position + count)]


def group_outcomes(rewards: torch.Tensor, group: torch.Tensor,
                   success: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(informative, all_right, all_wrong), bool [R] per response's group: rewards not all equal (what dynamic
    sampling keeps, ALGORITHMS.md 0; min != max is exact, where a float std of equal 0.1s is not 0), all >=
    `success` (EchoRL's groups, ALGORITHMS.md 4), none (with partial credit, maybe still informative)."""
    lo, hi = loss.group_min_max(rewards, group)
    return lo != hi, lo >= success, hi < success


# ---- E3: difficulty ranks, rollout budgets, temperature (ALGORITHMS.md 3) ----

class Explore:
    """A synchronous run's sampling state (saved in checkpoints): the data position, each prompt's reward sum and
    rollout count, the ranks k_i of the epoch (refreshed at its end; none in epoch 1) and E3's temperature
    controller (ALGORITHMS.md 3). Every rank records the whole global batch, so all agree on budgets."""

    def __init__(self, cfg: Config, n_items: int, vocab_size: int):
        self.cfg, self.n_items, self.position = cfg, n_items, 0
        self.reward_sum, self.count, self.epoch_ranks = (torch.zeros(n_items, dtype=dtype) for dtype in
                                                         (torch.float64, torch.long, torch.float64))
        self.controller = TemperatureController(cfg.temperature, vocab_size, cfg.steps, cfg.tau_min, cfg.tau_max,
                                                cfg.tau_anneal_eta) if cfg.temperature_control else None

    def next_prompts(self) -> tuple[list[int], list[int]]:
        """The next prompts_per_step training prompts and their rollout budgets (E3; bounds unset: G..G, G each)."""
        cfg, G = self.cfg, self.cfg.rollouts_per_prompt
        picked = pick_prompts(self.n_items, self.position, cfg.prompts_per_step, cfg.seed)
        lo, hi = budget_bounds(self.position // self.n_items, G, cfg.budget_min or G, cfg.budget_max or G)
        return picked, allocate_budgets(self.epoch_ranks[picked], G, lo, hi)

    def record(self, picked: list[int], rewards: list[list[float]]) -> None:
        """The rewards of each picked prompt's responses; at an epoch's end, the ranks for the next."""
        epoch = self.position // self.n_items
        for item, r in zip(picked, rewards):
            self.reward_sum.index_add_(0, torch.tensor([item] * len(r)), torch.tensor(r, dtype=torch.float64))
            self.count[item] += len(r)
        self.position += len(picked)
        if self.position // self.n_items > epoch:
            self.epoch_ranks = difficulty_ranks(self.reward_sum, self.count)

    SAVED = ("position", "reward_sum", "count", "epoch_ranks")  # and the controller's own

    def state_dict(self) -> dict:
        return {**{name: copy.deepcopy(getattr(self, name)) for name in self.SAVED},
                "controller": self.controller.state_dict() if self.controller is not None else None}

    def load_state_dict(self, state: dict) -> None:
        vars(self).update({name: copy.deepcopy(state[name]) for name in self.SAVED})
        if self.controller is not None and state["controller"] is not None:
            self.controller.load_state_dict(state["controller"])


def difficulty_ranks(reward_sum: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """k_i = position / |D| by mean reward, descending (stable); a never-sampled prompt counts as 0."""
    mean = reward_sum / count.clamp(min=1)
    position = torch.sort(mean, descending=True, stable=True).indices.argsort()  # the order's inverse permutation
    return position.to(mean.dtype) / len(mean)


def budget_bounds(epoch: int, G: int, n_low: int, n_high: int) -> tuple[int, int]:
    """(G_min, G_max) for `epoch` (0 = the first): G..G, then 2 wider each side per epoch up to n_low..n_high."""
    return max(n_low, G - 2 * epoch), min(n_high, G + 2 * epoch)


def allocate_budgets(ranks: Sequence[float] | torch.Tensor, G: int, G_min: int, G_max: int) -> list[int]:
    """E3's rollouts per prompt by difficulty ranks, as the released get_rollout_n_per_prompt but for a cap."""
    k = np.asarray([float(x) for x in ranks], dtype=np.float64)
    # step 2 in numpy's float64, as the original: its 1e-8, pairwise sum and floor decide who gets a whole rollout
    w = k / (k.sum() + 1e-8)  # ranks are >= 0: w = 0 when sum k = 0
    budgets = np.floor(np.full(len(k), float(G_min)) + float(len(k) * (G - G_min)) * w).astype(np.int64)
    budgets = np.minimum(budgets, G_max).tolist()  # the cap is ours: the original can exceed G_max here
    # step 3: the leftover to the hardest first (ties: batch order), each up to G_max; B*G <= B*G_max, so one pass
    left = len(k) * G - sum(budgets)
    for i in sorted(range(len(k)), key=lambda i: -w[i]):
        take = min(left, G_max - budgets[i])
        budgets[i] += take
        left -= take
    return budgets


class TemperatureController:
    """E3's entropy-holding temperature (ALGORITHMS.md 3), fed H_t every step; H0: the first batch's."""

    def __init__(self, tau0: float, vocab_size: int, total_steps: int, tau_min: float = 0.5,
                 tau_max: float = 2.0, eta: float = 0.9, anneal_last: float = 0.4):
        self.tau, self.h0 = tau0, None
        self.tau_min, self.tau_max, self.eta = tau_min, tau_max, eta
        # annealing starts at t_a = T - int(0.4 T), a whole step, as the released scheduler computes it
        self.total_steps, self.anneal_start = total_steps, total_steps - int(anneal_last * total_steps)
        self.scale = math.log(vocab_size) + math.log(math.log(vocab_size))

    def target(self, step: int) -> float:
        """H0 until t_a = T - int(anneal_last * T), then a cosine down to eta * H0 at step T."""
        if self.h0 is None:
            raise RuntimeError("no entropy recorded yet: call update() with the first batch's entropy")
        t_a, T = self.anneal_start, self.total_steps
        if step < t_a or T <= t_a:
            return self.h0
        progress = min((step - t_a) / (T - t_a), 1.0)
        return self.h0 * (self.eta + (1 - self.eta) * (1 + math.cos(math.pi * progress)) / 2)

    def update(self, entropy: float, step: int) -> float:
        """Record the batch's mean token entropy (of softmax(z / tau)) and return the new tau."""
        if not (math.isfinite(entropy) and entropy >= 0):
            raise ValueError(f"mean token entropy {entropy} is not a finite number >= 0")
        if self.h0 is None:
            self.h0 = entropy
        tiny = 1e-12  # an entropy of 0 (every token certain) pushes tau to a bound instead of failing
        alpha = max(self.target(step), tiny) / max(entropy, tiny)
        tau = self.tau * (1 + self.tau * math.log(alpha) / self.scale)
        self.tau = min(max(tau, self.tau_min), self.tau_max)  # the original has no clamp
        return self.tau

    def state_dict(self) -> dict:
        return {"tau": self.tau, "h0": self.h0}

    def load_state_dict(self, state: dict) -> None:
        self.tau, self.h0 = float(state["tau"]), state["h0"]


# ---- TBA's replay buffer (ALGORITHMS.md 2) ----

class ReplayBuffer:
    """Responses per prompt as the searchers hand them over: at most `capacity` a prompt, exact duplicates removed
    (the newest kept), the oldest weights evicted first, and those over `max_staleness` steps old dropped. A
    response: prompt, tokens, mask (per token: the model wrote it, not a tool), logp (per token), reward, ref
    and sampler (sequence logprobs), version (the step of its weights), round. Every trainer rank holds the same
    buffer and draws the same batch from the same seed."""

    def __init__(self, capacity: int, max_staleness: int):
        self.capacity, self.max_staleness = capacity, max_staleness
        self.items: dict[int, list[dict]] = {}  # prompt -> responses, oldest version first
        self.fresh: list[int] = []              # prompts refreshed at the last sync
        self.fresh_left: list[int] = []         # prompts not drawn since the pools were last refilled, as TBA
        self.any_left: list[int] = []           # draws them: without replacement until a pool runs dry
        self.removed = {"duplicates": 0, "evicted_capacity": 0, "evicted_age": 0}

    def add(self, responses: list[dict]) -> None:
        """One sync's round: its prompts become the fresh ones."""
        newest: dict[int, dict] = {}  # prompt -> {tokens: response}: within a round the first of identical ones stays
        for r in responses:
            newest.setdefault(r["prompt"], {}).setdefault(r["tokens"], r)
        self.removed["duplicates"] += len(responses) - sum(map(len, newest.values()))  # repeats within the round
        for prompt, new in newest.items():
            old = [r for r in self.items.get(prompt, []) if r["tokens"] not in new]
            kept = sorted(old + list(new.values()), key=lambda r: r["version"])  # stable: arrival order
            self.removed["duplicates"] += len(self.items.get(prompt, [])) - len(old)  # replaced by a newer copy
            self.removed["evicted_capacity"] += max(len(kept) - self.capacity, 0)
            self.items[prompt] = kept[-self.capacity:]
        self.fresh = sorted(newest)
        self.fresh_left = list(self.fresh)

    def drop_stale(self, step: int) -> None:
        if self.max_staleness <= 0:  # 0: no age limit
            return
        before = self.size()
        kept = {p: [r for r in held if step - r["version"] <= self.max_staleness] for p, held in self.items.items()}
        self.items = {p: held for p, held in kept.items() if held}
        self.removed["evicted_age"] += before - self.size()
        self.fresh = [p for p in self.fresh if p in self.items]

    def draw(self, prompts: int, k: int, fresh_prob: float, inv_temp: float, generator: torch.Generator,
             ) -> list[tuple[int, bool, list[dict]]]:
        """`prompts` slots of (prompt, fresh, k responses): the last sync's new ones (uniformly) with probability
        fresh_prob, else any prompt's, drawn with p ~ exp(inv_temp * reward)."""
        if not self.items:
            raise RuntimeError("the replay buffer is empty: every response is older than --max-staleness")
        slots = []
        for _ in range(prompts):
            fresh = torch.rand((), generator=generator).item() < fresh_prob and bool(self.fresh)
            pool = self.fresh_left if fresh else self.any_left
            pool[:] = [p for p in pool if p in self.items] or (list(self.fresh) if fresh else sorted(self.items))
            prompt = pool.pop(int(torch.randint(len(pool), (), generator=generator)))
            held = self.items[prompt]
            if fresh:
                last = max(r["round"] for r in held)
                held = [r for r in held if r["round"] == last]
            weights = torch.tensor([r["reward"] for r in held], dtype=torch.float64).mul(inv_temp * (not fresh))
            picked = torch.multinomial(weights.softmax(0), k, replacement=len(held) < k, generator=generator)
            slots.append((prompt, fresh, [held[i] for i in picked.tolist()]))
        return slots

    def size(self) -> int:
        return sum(len(v) for v in self.items.values())

    def state_dict(self) -> dict:
        return {name: copy.deepcopy(getattr(self, name))
                for name in ("items", "fresh", "fresh_left", "any_left", "removed")}

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(copy.deepcopy(state))
