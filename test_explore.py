"""Tests for explore.py: dynamic sampling masks, E3 difficulty ranks, budgets and temperature.

    .venv/bin/python -m pytest -q test_explore.py
"""

import io
import math
import random

import pytest
import torch

import config
import explore


# ---- dynamic sampling ----

def _groups(rng: random.Random, values: list[float]) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Random groups of random sizes, responses shuffled; returns rewards, group ids, {id: rewards}."""
    by_group = {}
    for g in rng.sample(range(100), 12):  # non-contiguous ids
        size = rng.randint(1, 6)
        same = rng.random() < 0.4  # plenty of all-equal groups
        v = rng.choice(values)
        by_group[g] = [v] * size if same else [rng.choice(values) for _ in range(size)]
    pairs = [(g, r) for g, rs in by_group.items() for r in rs]
    rng.shuffle(pairs)
    return (torch.tensor([r for _, r in pairs], dtype=torch.float32),
            torch.tensor([g for g, _ in pairs]), by_group)


@pytest.mark.parametrize("values", [[0.0, 1.0], [0.0, 0.1, 0.3, 0.7, 1.0]])
def test_informative_groups_keeps_exactly_groups_with_spread(values):
    rng = random.Random(0)
    for _ in range(30):
        rewards, group, by_group = _groups(rng, values)
        keep = explore.group_outcomes(rewards, group)[0]
        assert keep.dtype == torch.bool and keep.shape == rewards.shape
        for g, r in zip(group.tolist(), keep.tolist()):
            assert r == (len(set(by_group[g])) > 1)


def test_informative_groups_equal_float_rewards_are_dropped():
    # torch.std of three float64 0.1s is 1.7e-17, not 0; the group is still degenerate
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.1, 0.2], dtype=torch.float64)
    group = torch.tensor([3, 3, 3, 7, 7])
    assert explore.group_outcomes(rewards, group)[0].tolist() == [False, False, False, True, True]


def test_group_outcomes():
    rng = random.Random(1)
    for values in ([0.0, 1.0], [0.0, 0.5, 1.0, 2.0]):
        for _ in range(20):
            rewards, group, by_group = _groups(rng, values)
            _, right, wrong = explore.group_outcomes(rewards, group)
            for g, a, b in zip(group.tolist(), right.tolist(), wrong.tolist()):
                assert a == all(v >= 1.0 for v in by_group[g])
                assert b == all(v < 1.0 for v in by_group[g])
    _, right, wrong = explore.group_outcomes(torch.tensor([0.5, 0.6, 0.2]), torch.tensor([0, 0, 1]), success=0.5)
    assert right.tolist() == [True, True, False] and wrong.tolist() == [False, False, True]


# ---- budgets ----

def _check_budgets(k, G, lo, hi):
    b = explore.allocate_budgets(k, G, lo, hi)
    assert len(b) == len(k) and sum(b) == len(k) * G
    assert all(lo <= x <= hi for x in b)
    for i in range(len(k)):
        for j in range(len(k)):
            if k[i] > k[j]:
                assert b[i] >= b[j], (k, b)  # a harder prompt never gets fewer rollouts
    return b


def test_budgets_conserve_total_and_respect_bounds():
    rng = random.Random(2)
    for _ in range(400):
        lo = rng.randint(1, 8)
        hi = rng.randint(lo, 20)
        G = rng.randint(lo, hi)
        B = rng.randint(1, 12)
        n = rng.randint(B, 50)
        kind = rng.randrange(5)
        if kind == 0:  # ranks as Difficulty makes them: distinct positions / |D|
            k = [p / n for p in rng.sample(range(n), B)]
        elif kind == 1:  # ties
            k = [rng.choice([0.0, 0.25, 0.5, 0.75]) for _ in range(B)]
        elif kind == 2:  # any floats
            k = [rng.random() for _ in range(B)]
        elif kind == 3:
            k = [0.3] * B
        else:
            k = [0.0] * B
        _check_budgets(k, G, lo, hi)


def test_budgets_small_batch_and_special_ranks():
    # B=2 is smaller than the bound range 4..12
    for k in ([0.0, 0.5], [0.5, 0.0], [0.1, 0.9], [0.0, 0.0], [0.4, 0.4], [0.99, 0.98]):
        _check_budgets(k, 8, 4, 12)
    # sum k = 0: every share is 0 and the leftover fills the first prompts to G_max, one after another
    assert explore.allocate_budgets([0.0] * 5, 8, 4, 12) == [12, 12, 8, 4, 4]
    # equal ranks: w = 0.3 / (1.2 + 1e-8) just under 1/4, so 4 + 16 w floors to 7 each; the 4 left go to
    # the first prompt (ties in batch order)
    assert explore.allocate_budgets([0.3] * 4, 8, 4, 12) == [11, 7, 7, 7]
    assert explore.allocate_budgets(torch.tensor([0.0, 0.5]), 8, 8, 8) == [8, 8]  # epoch 1 bounds
    assert explore.allocate_budgets([], 8, 4, 12) == []


def test_budgets_hand_examples():
    """The released code's rule (ALGORITHMS.md 3), worked by hand in float64 with its 1e-8."""
    # k = [1/6, 1/2], G=8, 4..12: extra 8, w = k / (2/3 + 1e-8) = [0.25, 0.75] less ~4e-9, so
    # 4 + 8 w = [5.99999997, 9.9999999] floors to [5, 9]; 2 left go to the harder: [5, 11]. (Exact
    # fractions would give whole shares, [6, 10]: the original's floats decide, not exact arithmetic.)
    assert explore.allocate_budgets([1 / 6, 1 / 2], 8, 4, 12) == [5, 11]
    # k = [.1, .2, .3], G=8, 4..12: extra 12, w = [1/6, 1/3, 1/2] less a little: [5, 7, 9], 21; the 3
    # left all go to the hardest, filled to 12 before the next is served: [5, 7, 12] (not [6, 8, 10])
    assert explore.allocate_budgets([0.1, 0.2, 0.3], 8, 4, 12) == [5, 7, 12]
    # k = [0, .25, .5, .75], G=8, 4..12: extra 16, w = k / 1.5: 4 + 16 w = [4, 6.67, 9.33, 11.99999995]
    # -> [4, 6, 9, 11], 30; 2 left: the hardest takes 1 (to 12), the next the other: [4, 6, 10, 12]
    assert explore.allocate_budgets([0.0, 0.25, 0.5, 0.75], 8, 4, 12) == [4, 6, 10, 12]
    # k = [0, 0, .5], G=8, 6..10: step 2 gives the third 6 + 5.99999999 -> 11, capped at 10 (ours: the
    # original keeps 11); 2 left, the third is full, the first of the tied two takes both: [8, 6, 10]
    assert explore.allocate_budgets([0.0, 0.0, 0.5], 8, 6, 10) == [8, 6, 10]
    # k = [.1, .9], G=8, 4..12: 4 + 8 w = [4.8, 11.2] -> [4, 11]; 1 left, hardest first -> [4, 12]
    assert explore.allocate_budgets([0.1, 0.9], 8, 4, 12) == [4, 12]
    # k = [.4, .6, .8], G=10, 4..16: extra 18, 4 + 18 w = [7.99999996, 9.99999994, 11.9999999] -> [7, 9, 11];
    # 3 left to the hardest: [7, 9, 14]
    assert explore.allocate_budgets([2 / 5, 3 / 5, 4 / 5], 10, 4, 16) == [7, 9, 14]


def test_budget_bounds_schedule():
    got = [explore.budget_bounds(e, 8, 4, 12) for e in range(5)]
    assert got == [(8, 8), (6, 10), (4, 12), (4, 12), (4, 12)]
    got = [explore.budget_bounds(e, 8, 5, 9) for e in range(3)]
    assert got == [(8, 8), (6, 9), (5, 9)]


# ---- difficulty ----

def test_difficulty_ranks_hand_example():
    reward_sum = torch.tensor([2.0, 1.0, 0.0, 0.0, 0.5], dtype=torch.float64)
    count = torch.tensor([2, 2, 0, 3, 1])
    # means: p0 1.0, p1 0.5, p2 never sampled -> 0, p3 0.0, p4 0.5.
    # descending, ties by prompt index: p0, p1, p4, p2, p3 -> positions 0, 1, 2, 3, 4 over |D| = 5
    assert explore.difficulty_ranks(reward_sum, count).tolist() == pytest.approx([0.0, 0.2, 0.6, 0.8, 0.4])
    reward_sum[3], count[3] = 4.0, 7  # p3 now 4/7: easier than p1, p4
    assert explore.difficulty_ranks(reward_sum, count).tolist() == pytest.approx([0.0, 0.4, 0.8, 0.2, 0.6])


def test_explore_ranks_at_each_epochs_end_and_round_trips():
    """Ranks from all epochs' rewards so far, refreshed when an epoch ends (epoch 1 uses none: all 0); a resumed
    state goes on identically; a state for another task size is one sentence naming the fix."""
    cfg = config.Config(prompts_per_step=3, rollouts_per_prompt=2)
    state = explore.Explore(cfg, 5, 100)
    picked, budgets = state.next_prompts()
    assert len(picked) == 3 and budgets == [2, 2, 2]
    state.record(picked, [[1.0, 1.0], [0.0, 0.5], [0.0, 0.0]])
    assert state.epoch_ranks.tolist() == [0.0] * 5 and state.count.sum() == 6  # epoch 1: no ranks yet
    state.record(state.next_prompts()[0], [[1.0, 0.0], [0.5, 0.5], [1.0, 1.0]])  # into epoch 2: ranks
    assert state.position == 6 and state.count.sum() == 12
    want = explore.difficulty_ranks(state.reward_sum, state.count)
    assert torch.equal(state.epoch_ranks, want) and want.max() > 0
    buf = io.BytesIO()
    torch.save(state.state_dict(), buf)
    buf.seek(0)
    resumed = explore.Explore(cfg, 5, 100)
    resumed.load_state_dict(torch.load(buf))
    for s in (state, resumed):  # and they go on identically
        s.record(s.next_prompts()[0], [[0.9, 0.1]] * 3)
    assert resumed.next_prompts() == state.next_prompts() and torch.equal(resumed.reward_sum, state.reward_sum)


# ---- temperature ----

def _scale(v: int) -> float:
    return math.log(v) + math.log(math.log(v))


def test_temperature_follows_entropy():
    c = explore.TemperatureController(1.0, vocab_size=1000, total_steps=100)
    assert c.update(2.0, 0) == 1.0  # the first batch sets H0 = 2.0: alpha = 1, tau holds
    assert c.h0 == 2.0
    tau = c.update(1.0, 1)  # below target: hotter
    assert tau > 1.0 and tau == pytest.approx(1.0 * (1 + 1.0 * math.log(2.0) / _scale(1000)))
    prev = tau
    tau = c.update(4.0, 2)  # above target: cooler
    assert tau < prev and tau == pytest.approx(prev * (1 + prev * math.log(0.5) / _scale(1000)))
    assert c.update(2.0, 3) == tau  # exactly at target: holds still


def test_temperature_clamps():
    c = explore.TemperatureController(1.0, vocab_size=50, total_steps=10, tau_min=0.7, tau_max=1.3)
    c.update(5.0, 0)
    assert c.update(1e-9, 1) == 1.3
    assert c.update(0.0, 2) == 1.3  # a zero entropy hits the bound instead of failing
    assert c.update(5e6, 3) == 0.7
    with pytest.raises(ValueError):
        c.update(float("nan"), 4)


def test_temperature_annealed_target():
    c = explore.TemperatureController(1.0, vocab_size=1000, total_steps=100)
    c.update(2.0, 0)
    # t_a = 60; H0 = 2, eta = 0.9: progress 0 -> 2, 0.25 -> 2*(0.9 + 0.1*(1+cos(pi/4))/2) = 1.970711,
    # 0.5 -> 2*(0.9 + 0.05) = 1.9, 1 -> 1.8
    assert c.target(0) == 2.0 and c.target(59) == 2.0 and c.target(60) == pytest.approx(2.0)
    assert c.target(70) == pytest.approx(1.9707107, abs=1e-6)
    assert c.target(80) == pytest.approx(1.9)
    assert c.target(100) == pytest.approx(1.8)
    assert c.update(2.0, 80) < 1.0  # entropy at H0 is above the annealed target: cooler


def test_annealing_starts_at_a_whole_step():
    """t_a = T - int(0.4 T), as the released scheduler: with T = 24 that is step 15, not 14.4."""
    c = explore.TemperatureController(1.0, vocab_size=1000, total_steps=24)
    c.update(2.0, 0)
    assert c.anneal_start == 15 and c.target(14) == c.target(15) == 2.0  # 0.6 T would anneal step 15 already
    progress = (16 - 15) / (24 - 15)
    assert c.target(16) == pytest.approx(2.0 * (0.9 + 0.1 * (1 + math.cos(math.pi * progress)) / 2))
    assert explore.TemperatureController(1.0, 1000, total_steps=10).anneal_start == 6  # int(4.000000000000001)


def test_temperature_state_dict_round_trip():
    c = explore.TemperatureController(1.2, vocab_size=1000, total_steps=100)
    for step, h in enumerate([1.5, 1.1, 1.7]):
        c.update(h, step)
    buf = io.BytesIO()
    torch.save(c.state_dict(), buf)
    buf.seek(0)
    d = explore.TemperatureController(1.2, vocab_size=1000, total_steps=100)
    d.load_state_dict(torch.load(buf))
    assert (d.tau, d.h0) == (c.tau, c.h0) and d.update(1.3, 3) == c.update(1.3, 3)


# ---- TBA's replay buffer (ALGORITHMS.md 2) ----

def _response(prompt: int, tokens, version: int, round_: int, reward: float = 0.0) -> dict:
    tokens = tuple(tokens)
    return {"prompt": prompt, "tokens": tokens, "version": version, "round": round_, "reward": reward,
            "ref": 0.0, "sampler": 0.0, "entropy": 0.0, "logp": torch.zeros(len(tokens))}


def test_replay_buffer_capacity_duplicates_and_eviction():
    buffer = explore.ReplayBuffer(capacity=4, max_staleness=3)
    buffer.add([_response(0, [1], 0, 0), _response(0, [2], 0, 0), _response(0, [1], 0, 0), _response(1, [5], 0, 0)])
    assert [r["tokens"] for r in buffer.items[0]] == [(1,), (2,)] and buffer.removed["duplicates"] == 1
    # a newer copy of (2,) replaces the old one; capacity 4 then evicts the oldest version first
    buffer.add([_response(0, [2], 2, 1), _response(0, [3], 2, 1), _response(0, [4], 2, 1), _response(0, [6], 2, 1)])
    assert [(r["tokens"], r["version"]) for r in buffer.items[0]] == [((2,), 2), ((3,), 2), ((4,), 2), ((6,), 2)]
    assert buffer.removed == {"duplicates": 2, "evicted_capacity": 1, "evicted_age": 0}
    assert buffer.fresh == [0] and sorted(buffer.items) == [0, 1]
    buffer.drop_stale(3)  # version 0 is 3 steps old: kept; at step 4 it goes, and prompt 1 with it
    assert sorted(buffer.items) == [0, 1]
    buffer.drop_stale(4)
    assert sorted(buffer.items) == [0] and buffer.removed["evicted_age"] == 1 and buffer.size() == 4
    never = explore.ReplayBuffer(capacity=4, max_staleness=0)  # 0: no age limit
    never.add([_response(0, [1], 0, 0)])
    never.drop_stale(1000)
    assert never.size() == 1


def test_replay_buffer_draws():
    rng = random.Random(0)
    buffer = explore.ReplayBuffer(capacity=100, max_staleness=5)
    for round_ in range(4):
        buffer.add([_response(p, [rng.randrange(50) for _ in range(3)], 2 * round_, round_, rng.random())
                    for p in range(round_ * 3, round_ * 3 + 6) for _ in range(5)])
        buffer.drop_stale(2 * round_ + 1)
    fresh_prompts = set(buffer.fresh)
    # m = 1: only prompts of the last sync, only their responses of that sync
    slots = buffer.draw(6, 4, 1.0, 0.0, torch.Generator().manual_seed(1))
    assert all(fresh and prompt in fresh_prompts and all(r["round"] == 3 for r in rs) for prompt, fresh, rs in slots)
    assert len({prompt for prompt, _, _ in slots}) == 6  # without replacement while the pool lasts
    # a large inverse temperature: each replay slot takes its prompt's best response
    for prompt, fresh, rs in buffer.draw(8, 1, 0.0, 1e4, torch.Generator().manual_seed(2)):
        assert not fresh and rs[0]["reward"] == max(x["reward"] for x in buffer.items[prompt])
    # fresh slots draw their newest responses uniformly, whatever the inverse temperature (the spec's "otherwise")
    top = 0
    for seed in range(60):
        (prompt, fresh, rs), = buffer.draw(1, 1, 1.0, 1e4, torch.Generator().manual_seed(seed))
        top += fresh and rs[0]["reward"] == max(r["reward"] for r in buffer.items[prompt] if r["round"] == 3)
    assert 0 < top < 40  # about 12 of 60 (one of 5); reward-weighted, all 60
    # every response drawn is within --max-staleness of the step; two ranks (buffers in the same state, as a
    # checkpointed one is too) with the same seed draw the same batch
    for seed in range(5):
        twin = explore.ReplayBuffer(capacity=100, max_staleness=5)
        twin.load_state_dict(buffer.state_dict())
        a, b = (x.draw(5, 4, 0.5, 0.0, torch.Generator().manual_seed(seed)) for x in (buffer, twin))
        assert all(7 - r["version"] <= 5 for _, _, rs in a for r in rs)
        assert [(p, f, [r["tokens"] for r in rs]) for p, f, rs in a] == [(p, f, [r["tokens"] for r in rs]) for p, f, rs in b]
    # fewer responses than K: with replacement
    small = explore.ReplayBuffer(capacity=10, max_staleness=0)
    small.add([_response(0, [1], 0, 0), _response(0, [2], 0, 0)])
    (prompt, fresh, rs), = small.draw(1, 5, 1.0, 0.0, torch.Generator().manual_seed(0))
    assert len(rs) == 5 and {r["tokens"] for r in rs} <= {(1,), (2,)}
