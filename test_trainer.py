"""The trainer's packed micro-batches (trainer.py): packed rows against one padded row per unit,
and sequences kept apart inside a row. Run by test_all.py."""

import math

import pytest
import torch

import trainer
from kernels.test_kernels import random_prompts, tiny_model


def mixed_groups(seed: int, rollouts: int = 3):
    """Six prompts of 3 to 17 tokens with `rollouts` responses of 1 to 40 tokens each, long-tailed, shuffled; and
    each response's group."""
    g = torch.Generator().manual_seed(seed)
    seqs, prompt_lens, group = [], [], []
    for k, p in enumerate(random_prompts(256, [5, 17, 9, 3, 12, 6], seed=seed)):
        for _ in range(rollouts):
            n = min(40, int(torch.empty(()).log_normal_(1.5, 1.0, generator=g)) + 1)
            seqs.append(p + torch.randint(3, 256, (n,), generator=g).tolist())
            prompt_lens.append(len(p))
            group.append(k)
    order = torch.randperm(len(seqs), generator=g).tolist()
    return [seqs[i] for i in order], [prompt_lens[i] for i in order], torch.tensor([group[i] for i in order])


def logprobs_and_grads(model, seqs, prompt_lens, share, plans):
    """Logprobs, entropies and the gradient of a loss that weighs every token differently, over the micro-batches."""
    model.zero_grad()
    policy, out = trainer.Policy(model), []
    for rows in plans:
        logp, entropy = trainer.response_logprobs(policy, seqs, prompt_lens, 0.7, torch.float32, share, rows)
        b = sorted(i for row in rows for piece in row for i in piece)
        weight = torch.tensor([(7 * i + t) % 5 - 2.0 for i in b for t in range(len(seqs[i]) - prompt_lens[i])])
        (logp * weight + entropy * 0.3).sum().backward()
        out += zip(b, logp.detach().split([len(seqs[i]) - prompt_lens[i] for i in b]),
                   entropy.detach().split([len(seqs[i]) - prompt_lens[i] for i in b]))
    out.sort(key=lambda x: x[0])
    return torch.cat([x[1] for x in out]), torch.cat([x[2] for x in out]), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_packed_rows_match_padded_rows(kind):
    """Packed micro-batches (several sequences a row, positions restarting at each) give the same logprobs,
    entropies (float32, 1e-5) and gradients as one padded row per sequence, with and without shared prompts,
    and with TB's whole groups."""
    seqs, prompt_lens, _ = mixed_groups(seed=1)
    model = tiny_model(kind, seed=3)
    padded = logprobs_and_grads(model, seqs, prompt_lens, False, trainer.plan(seqs, prompt_lens, 200, False, pack=False))
    for share, whole in ((False, False), (False, True), (True, False)):
        plans = trainer.plan(seqs, prompt_lens, 200, share, whole_groups=whole)
        assert max(len(row) for rows in plans for row in rows) >= 2  # rows do hold several pieces
        logp, entropy, grads = logprobs_and_grads(model, seqs, prompt_lens, share, plans)
        torch.testing.assert_close(logp, padded[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(entropy, padded[1], atol=1e-5, rtol=0)
        for a, b in zip(grads, padded[2]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("share", [False, True])
def test_no_token_attends_across_a_sequence_boundary(share):
    """Change every token of one sequence (prompt and response; with shared prompts, one response): the logprobs
    of every other sequence in its packed row stay bit-identical, its own change."""
    seqs, prompt_lens, _ = mixed_groups(seed=1)
    policy = trainer.Policy(tiny_model("llama", seed=2))
    rows = trainer.plan(seqs, prompt_lens, math.inf, share)[0]
    crowded = max(rows, key=len)
    i = crowded[0][0]  # the first response of the fullest row: the others follow it there
    assert len(crowded) >= 2 and len(seqs[i]) - prompt_lens[i] >= 2
    changed = [list(s) for s in seqs]
    start = prompt_lens[i] if share else 0
    changed[i][start:-1] = [(t + 1) % 256 for t in changed[i][start:-1]]
    with torch.no_grad():
        before, after = (trainer.response_logprobs(policy, s, prompt_lens, 1.0, torch.float32, share, rows)[0]
                         for s in (seqs, changed))
    starts = [0, *torch.tensor([len(s) - p for s, p in zip(seqs, prompt_lens)]).cumsum(0).tolist()]
    moved = [not torch.equal(before[a:b], after[a:b]) for a, b in zip(starts, starts[1:])]
    assert moved == [j == i for j in range(len(seqs))]
