"""What to sample next (DESIGN.md data flow, step 1): which prompts a step trains on.

Each epoch visits every training prompt once in a fresh seeded order. Everything here is a
pure function of (step, seed), so a resumed run picks the same prompts as an unbroken one.
"""

import random


def epoch_order(n_items: int, epoch: int, seed: int) -> list[int]:
    order = list(range(n_items))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def pick_prompts(n_items: int, step: int, per_step: int, seed: int) -> list[int]:
    """Indices of the `per_step` prompts of step `step`; a step may straddle two epochs."""
    orders = {}
    picked = []
    for k in range(step * per_step, (step + 1) * per_step):
        epoch, position = divmod(k, n_items)
        if epoch not in orders:
            orders[epoch] = epoch_order(n_items, epoch, seed)
        picked.append(orders[epoch][position])
    return picked
