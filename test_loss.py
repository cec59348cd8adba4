"""Tests for loss.py: every function against the formulas of ALGORITHMS.md (sections 0, 2, 4), written
out independently here with plain loops, on fresh random inputs, plus edge cases.

Run: .venv/bin/python -m pytest -q test_loss.py
"""

import math

import pytest
import torch

import config
import loss


def mixed_groups(seed: int, sizes=(1, 2, 5, 8)):
    """Groups of the given sizes with non-contiguous ids, responses shuffled so a group is not contiguous."""
    g = torch.Generator().manual_seed(seed)
    group = torch.cat([torch.full((s,), i * 7 + 3) for i, s in enumerate(sizes)])
    return group[torch.randperm(len(group), generator=g)], g


def members(group: torch.Tensor, i: int) -> list[int]:
    return [j for j in range(len(group)) if group[j] == group[i]]


# ---- base family (ALGORITHMS.md 0) ----


def test_group_stats_and_advantages_match_loops():
    for seed in range(4):
        group, g = mixed_groups(seed)
        r = torch.rand(len(group), generator=g, dtype=torch.float64)
        mean, std, count = loss.group_stats(r, group)
        adv = {k: loss.advantages(r, group, k) for k in config.CHOICES["adv"]}
        centred = []
        for i in range(len(r)):
            vals = [r[j].item() for j in members(group, i)]
            m = sum(vals) / len(vals)
            s = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 1.0
            assert count[i] == len(vals)
            assert mean[i].item() == pytest.approx(m, abs=1e-12) and std[i].item() == pytest.approx(s, abs=1e-12)
            assert adv["grpo"][i].item() == pytest.approx((r[i].item() - m) / (s + 1e-6), abs=1e-9)
            assert adv["drgrpo"][i].item() == pytest.approx(r[i].item() - m, abs=1e-12)
            others = (sum(vals) - r[i].item()) / (len(vals) - 1) if len(vals) > 1 else r[i].item()
            assert adv["rloo"][i].item() == pytest.approx(r[i].item() - others, abs=1e-12)
            centred.append(r[i].item() - m)
        bm = sum(centred) / len(centred)
        bs = math.sqrt(sum((c - bm) ** 2 for c in centred) / len(centred))
        for i, c in enumerate(centred):
            assert adv["reinforce++"][i].item() == pytest.approx((c - bm) / (bs + 1e-6), abs=1e-9)


def test_advantages_are_zero_for_a_group_of_one_and_equal_partial_credit():
    # 0.7 is not exact in binary: a plain float mean would leave a ~1e-8 residue and a std of the same
    # size, which the GRPO division blows up to ~0.05.
    group = torch.tensor([5, 2, 5, 5, 5, 5, 5, 9, 5])
    r = torch.tensor([0.7, 0.3, 0.7, 0.7, 0.7, 0.7, 0.7, 1.0, 0.7])
    for kind in ("grpo", "drgrpo", "rloo"):
        assert loss.advantages(r, group, kind).abs().max() == 0, kind
    assert loss.group_stats(r, group)[1][group == 5].abs().max() == 0
    assert loss.advantages(torch.zeros(0), torch.zeros(0, dtype=torch.long)).shape == (0,)


def test_policy_loss_clip_higher_dual_clip_and_tis_match_loops():
    torch.manual_seed(0)
    n = 400
    logp, old, adv = torch.randn(n) * 0.8, torch.randn(n) * 0.8, torch.randn(n)
    w = torch.rand(n) * 2
    plain, plain_mask = loss.policy_loss(logp, old, adv, 0.2, 0.28)  # train.py's positional call
    got, mask = loss.policy_loss(logp, old, adv, eps_low=0.1, eps_high=0.3, dual_clip=3.0, tis_weight=w)
    n_dual = 0
    for i in range(n):
        rho, a = math.exp(logp[i] - old[i]), adv[i].item()
        ppo = -min(rho * a, min(max(rho, 0.8), 1.28) * a)
        assert plain[i].item() == pytest.approx(ppo, rel=1e-5, abs=1e-6)
        assert plain_mask[i].item() == float(min(max(rho, 0.8), 1.28) * a < rho * a - 1e-9)
        clip_term = min(max(rho, 0.9), 1.3) * a
        objective = min(rho * a, clip_term)
        if a < 0:  # dual clip: -max(min(rho A, clip A), c A)
            objective = max(objective, 3.0 * a)
        dual = a < 0 and 3.0 * a > min(rho * a, clip_term)
        n_dual += dual
        assert got[i].item() == pytest.approx(-objective * w[i].item(), rel=1e-5, abs=1e-6)
        assert mask[i].item() == float(clip_term < rho * a - 1e-9 or dual)
    assert n_dual > 0 and 0 < plain_mask.mean() < 1


def test_policy_loss_tis_weight_is_detached_and_dual_clip_zero_is_off():
    torch.manual_seed(1)
    logp = torch.randn(50, requires_grad=True)
    old, adv = torch.randn(50) * 3, torch.randn(50)
    w = torch.rand(50, requires_grad=True)
    per_token, _ = loss.policy_loss(logp, old, adv, tis_weight=w)
    per_token.sum().backward()
    assert w.grad is None and logp.grad.abs().sum() > 0
    a, _ = loss.policy_loss(logp, old, adv, dual_clip=0.0)
    b, _ = loss.policy_loss(logp, old, adv)
    assert torch.equal(a, b)


def test_tis_weight_and_entropy_bonus():
    torch.manual_seed(2)
    trainer, sampler = torch.randn(100, requires_grad=True), torch.randn(100)
    w = loss.tis_weight(trainer, sampler, cap=2.0)
    assert not w.requires_grad
    for i in range(100):
        assert w[i].item() == pytest.approx(min(math.exp(trainer[i].item() - sampler[i].item()), 2.0), rel=1e-6)
    assert (w == 2.0).any() and (w < 2.0).any()


def test_kl_estimators_match_formulas():
    torch.manual_seed(3)
    logp, ref = torch.randn(60), torch.randn(60)
    for kind in config.CHOICES["kl_kind"]:
        got = loss.kl(logp, ref, kind)
        for i in range(60):
            d = logp[i].item() - ref[i].item()
            want = {"k1": d, "k2": d * d / 2, "k3": math.exp(-d) - 1 + d}[kind]
            assert got[i].item() == pytest.approx(want, rel=1e-5, abs=1e-6)


def random_microbatches(seed: int):
    """Sequences of random lengths (some empty) split into micro-batches; per-token losses and local seq ids."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 9, (13,), generator=g).tolist()
    seqs = [torch.randn(n, generator=g, dtype=torch.float64) for n in lengths]
    cuts = sorted(torch.randperm(12, generator=g)[:3].add(1).tolist())
    parts = [seqs[a:b] for a, b in zip([0] + cuts, cuts + [len(seqs)])] + [[]]  # and an empty micro-batch
    micro = [(torch.cat(p + [torch.zeros(0, dtype=torch.float64)]),
              torch.cat([torch.full((len(s),), k) for k, s in enumerate(p)] + [torch.zeros(0, dtype=torch.long)]))
             for p in parts]
    return seqs, micro


def test_aggregate_sums_over_microbatches_to_the_global_value():
    for seed in range(5):
        seqs, micro = random_microbatches(seed)
        n_tok, n_seq = sum(len(s) for s in seqs), len(seqs)
        flat = [x for s in seqs for x in s.tolist()]
        want = {
            "token-mean": sum(flat) / n_tok,
            "seq-mean-token-mean": sum(sum(s.tolist()) / len(s) for s in seqs if len(s)) / n_seq,
            "seq-mean-token-sum-norm": sum(sum(s.tolist()) / 16 for s in seqs) / n_seq,
        }
        for mode in config.CHOICES["aggregate"]:
            got = sum(loss.aggregate(t, ids, mode, n_tok, n_seq, norm_len=16).item() for t, ids in micro)
            assert got == pytest.approx(want[mode], rel=1e-10), mode


# ---- trajectory balance (ALGORITHMS.md 2) ----


def tb_inputs(seed: int):
    group, g = mixed_groups(seed, sizes=(3, 1, 4, 2))
    n = len(group)
    seq_logp = -torch.rand(n, generator=g, dtype=torch.float64) * 20
    seq_ref = -torch.rand(n, generator=g, dtype=torch.float64) * 20
    return seq_logp, seq_ref, torch.rand(n, generator=g, dtype=torch.float64).round(), group


def test_tb_log_z_and_loss_match_loops():
    for seed in range(3):
        seq_logp, seq_ref, r, group = tb_inputs(seed)
        beta = 0.05
        s = [seq_logp[i].item() - seq_ref[i].item() - r[i].item() / beta for i in range(len(r))]
        log_z = loss.tb_log_z(seq_logp, seq_ref, r, group, beta)
        per = loss.tb_loss(seq_logp, seq_ref, r, group, beta)
        for i in range(len(r)):
            z = -sum(s[j] for j in members(group, i)) / len(members(group, i))
            assert log_z[i].item() == pytest.approx(z, rel=1e-12)
            assert per[i].item() == pytest.approx((z + s[i]) ** 2, rel=1e-9, abs=1e-9)
            if len(members(group, i)) == 1:  # a group of one balances itself exactly
                assert per[i].item() == pytest.approx(0, abs=1e-9)


def test_tb_split_group_with_precomputed_log_z_equals_whole_batch():
    seq_logp, seq_ref, r, group = tb_inputs(7)
    whole = loss.tb_loss(seq_logp, seq_ref, r, group, 0.02)
    log_z = loss.tb_log_z(seq_logp, seq_ref, r, group, 0.02)
    a, b = torch.arange(0, 5), torch.arange(5, len(r))  # the shuffled groups straddle the cut
    assert set(group[a].tolist()) & set(group[b].tolist())
    parts = [loss.tb_loss(seq_logp[k], seq_ref[k], r[k], group[k], 0.02, log_z=log_z[k]) for k in (a, b)]
    torch.testing.assert_close(torch.cat(parts), whole)
    naive = torch.cat([loss.tb_loss(seq_logp[k], seq_ref[k], r[k], group[k], 0.02) for k in (a, b)])
    assert not torch.allclose(naive, whole)  # without the shared log Z the split batch is wrong
    # log Z is a constant of the loss (VarGrad): no gradient flows into it, computed or handed in
    seq_logp.requires_grad_()
    assert not loss.tb_log_z(seq_logp, seq_ref, r, group, 0.02).requires_grad
    given = log_z.clone().requires_grad_()
    loss.tb_loss(seq_logp, seq_ref, r, group, 0.02, log_z=given).sum().backward()
    assert given.grad is None and seq_logp.grad.abs().sum() > 0


def test_on_policy_tb_gradient_is_reinforce_with_kl_advantage_times_2_over_beta():
    torch.manual_seed(4)
    n_groups, per_group, max_len, vocab, beta = 3, 4, 5, 7, 0.1
    logits = torch.randn(n_groups, max_len, vocab, dtype=torch.float64, requires_grad=True)
    ref_logits = torch.randn(n_groups, max_len, vocab, dtype=torch.float64)
    group = torch.arange(n_groups).repeat_interleave(per_group)[torch.randperm(n_groups * per_group)]
    lengths = torch.randint(1, max_len + 1, (len(group),)).tolist()
    rewards = torch.rand(len(group), dtype=torch.float64).round()
    seq_logp, seq_ref = [], []
    for i, g in enumerate(group.tolist()):
        lp, ref = logits[g].log_softmax(-1), ref_logits[g].log_softmax(-1)
        y = torch.multinomial(lp.detach().exp(), 1).squeeze(1)[:lengths[i]]  # sampled from pi: on-policy
        seq_logp.append(lp[torch.arange(lengths[i]), y].sum())
        seq_ref.append(ref[torch.arange(lengths[i]), y].sum())
    seq_logp, seq_ref = torch.stack(seq_logp), torch.stack(seq_ref)

    tb_grad, = torch.autograd.grad(loss.tb_loss(seq_logp, seq_ref, rewards, group, beta).mean(), logits,
                                   retain_graph=True)
    kl = (seq_logp - seq_ref).detach()
    adv = torch.zeros_like(rewards)
    for i in range(len(group)):
        m = members(group, i)
        adv[i] = (rewards[i] - rewards[m].mean()) - beta * (kl[i] - kl[m].mean())
    rf_grad, = torch.autograd.grad(-(adv * seq_logp).mean(), logits)
    assert rf_grad.abs().max() > 1e-3
    torch.testing.assert_close(tb_grad, 2 / beta * rf_grad)


def test_tb_beta_schedule():
    assert loss.tb_beta(0, 0.014, 0.004, 500) == pytest.approx(0.014)
    assert loss.tb_beta(250, 0.014, 0.004, 500) == pytest.approx(0.009)
    assert loss.tb_beta(100, 0.014, 0.004, 500) == pytest.approx(0.014 - 0.01 * 100 / 500)
    assert loss.tb_beta(500, 0.014, 0.004, 500) == pytest.approx(0.004)
    assert loss.tb_beta(10_000, 0.014, 0.004, 500) == pytest.approx(0.004)
    assert loss.tb_beta(0, 0.014, 0.004, 0) == pytest.approx(0.004)  # no schedule: constant


# ---- EchoRL (ALGORITHMS.md 4) ----

NL, SP = 10, 11  # "\n" and " " in the hand-made vocabulary; other ids are words
NEWLINE, BLANK = {NL}, {NL, SP}


def every(tokens):  # masks with every token the model's
    return [[True] * len(t) for t in tokens]


def test_echo_clip_picks_the_highest_entropy_step_and_returns_its_prefix():
    tokens = [
        [1, 2, NL, 3, 4, 5, NL, 6, 7],  # steps: [1 2 \n] 0.3, [3 4 5 \n] 0.5, [6 7] (last, no \n) 0.85
        [1, NL, SP, SP, NL, 8, 9, NL],  # [1 \n] 0.2, [" " " " \n] blank (0.99 ignored), [8 9 \n] 0.6
        [5, 6, NL, 7, NL],              # [5 6 \n] 0.7, [7 \n] 0.6 ; group 1
        [9, NL, 1, 2],                  # [9 \n] 0.9, [1 2] 0.95 ; group 1, failed: never a candidate
    ]
    ent = [
        [0.3, 0.3, 0.3, 0.5, 0.5, 0.5, 0.5, 0.8, 0.9],
        torch.tensor([0.2, 0.2, 0.99, 0.99, 0.99, 0.6, 0.6, 0.6]),
        [0.7, 0.7, 0.7, 0.6, 0.6],
        [0.9, 0.9, 0.95, 0.95],
    ]
    rewards, group = torch.tensor([1.0, 1.0, 1.0, 0.0]), torch.tensor([0, 0, 1, 1])
    assert loss.echo_clip(tokens, ent, every(tokens), rewards, group, NEWLINE, BLANK) == {0: 9}
    # "any": group 1 is clipped from its successful response only (the failed one's higher steps are ignored)
    assert loss.echo_clip(tokens, ent, every(tokens), rewards, group, NEWLINE, BLANK, mode="any") == {0: 9, 2: 3}
    # lower the last step of response 0: response 1's [8 9 \n] (0.6) beats [3 4 5 \n] (0.5); blank skipped
    ent[0][7:] = [0.1, 0.1]
    assert loss.echo_clip(tokens, ent, every(tokens), rewards, group, NEWLINE, BLANK) == {1: 8}


def test_echo_clip_skips_one_token_and_blank_steps_and_breaks_ties_first():
    tokens = [[NL, 1, NL, SP, NL, SP, SP], [4, NL, 2, 3, NL]]  # resp 0: [\n] short, [1 \n], [" " \n] blank, [" " " "]
    ent = [[9.0, 1.0, 1.0, 5.0, 5.0, 7.0, 7.0], [1.0, 1.0, 1.0, 1.0, 1.0]]  # every valid step scores 1.0
    rewards, group = torch.tensor([1.0, 1.0]), torch.tensor([4, 4])
    assert loss.echo_clip(tokens, ent, every(tokens), rewards, group, NEWLINE, BLANK) == {0: 3}  # tie: first valid step
    only_invalid = [[NL, SP, NL], [7]]  # steps: [\n] (1 token), [" " \n] (blank); [7] (1 token)
    assert loss.echo_clip(only_invalid, [[1.0] * 3, [2.0]], every(only_invalid), rewards, group, NEWLINE, BLANK) == {}
    assert loss.echo_clip([[], [1, 2]], [[], [0.5, 0.5]], [[], [True, True]], rewards, group, NEWLINE, BLANK) == {1: 2}


def test_echo_clip_scores_a_step_by_the_models_own_tokens():
    """A tool's output tokens were not sampled (the sampler records entropy 0 there): a step's entropy is the mean
    over the model's tokens in it, and a step of tool tokens is never a candidate, however it scores."""
    T = 7  # a tool's output token
    tokens = [[1, 2, NL, 3, T, T, NL, T, T, NL, 4, 5, 6]]
    model = [True, True, True, True, False, False, True, False, False, False, True, True, True]
    ent = [[0.6, 0.6, 0.6, 0.9, 0.0, 0.0, 0.9, 0.0, 0.0, 0.0, 0.1, 0.1, 0.1]]
    rewards, group = torch.tensor([1.0]), torch.tensor([0])
    assert loss.echo_clip(tokens, ent, [torch.tensor(model)], rewards, group, NEWLINE, BLANK) == {0: 7}
    assert loss.echo_clip(tokens, ent, every(tokens), rewards, group, NEWLINE, BLANK) == {0: 3}  # all: 0.45 < 0.6
    ent[0][7:10] = [5.0] * 3  # a tool-only step: skipped whatever its entropies
    assert loss.echo_clip(tokens, ent, [torch.tensor(model)], rewards, group, NEWLINE, BLANK) == {0: 7}


def brute_force_echo_clip(tokens, ent, rewards, group, success, mode, masks):
    """Independent reference: list every (score, response, end) candidate per group, then take the max."""
    out = {}
    for g in sorted(set(group.tolist())):
        idx = [i for i in range(len(tokens)) if group[i] == g]
        wins = [i for i in idx if rewards[i] >= success]
        if not wins or (mode == "all" and len(wins) < len(idx)):
            continue
        candidates = []
        for i in wins:
            bounds = [t + 1 for t, x in enumerate(tokens[i]) if x in NEWLINE]
            if tokens[i] and (not bounds or bounds[-1] != len(tokens[i])):
                bounds.append(len(tokens[i]))
            for a, b in zip([0] + bounds, bounds):
                own = [(x, e) for x, e, m in zip(tokens[i][a:b], ent[i][a:b], masks[i][a:b]) if m]
                if len(own) >= 2 and any(x not in BLANK for x, _ in own):
                    candidates.append((sum(e for _, e in own) / len(own), -i, -b))  # max score, lowest i, end
        if candidates:
            _, i, b = max(candidates)
            out[-i] = -b
    return out


def test_echo_clip_matches_brute_force_on_random_groups():
    g = torch.Generator().manual_seed(5)
    for mode in config.CHOICES["echo_mode"]:
        for _ in range(20):
            group, _ = mixed_groups(int(torch.randint(0, 1000, (1,), generator=g)), sizes=(1, 3, 4))
            rewards = (torch.rand(len(group), generator=g) < 0.8).float()
            vocab = torch.tensor([1, 2, 3, NL, NL, SP])
            tokens = [vocab[torch.randint(0, 6, (int(torch.randint(0, 12, (1,), generator=g)),), generator=g)]
                      .tolist() for _ in group]
            ent = [torch.rand(len(t), generator=g).tolist() for t in tokens]
            masks = [torch.rand(len(t), generator=g) < 0.7 for t in tokens]  # False: a tool's token
            want = brute_force_echo_clip(tokens, ent, rewards, group, 1.0, mode, every(tokens))
            assert loss.echo_clip(tokens, ent, every(tokens), rewards, group, NEWLINE, BLANK, mode=mode) == want
            want = brute_force_echo_clip(tokens, ent, rewards, group, 1.0, mode, masks)
            assert loss.echo_clip(tokens, ent, masks, rewards, group, NEWLINE, BLANK, mode=mode) == want


def test_step_token_ids_finds_newline_tokens_in_a_toy_tokenizer():
    class Toy:  # decodes ids to fixed strings, as a byte-level BPE decode would
        texts = ["a", "\n", " ", "b\n", "\n  ", "\t\n", ""]

        def __len__(self):
            return len(self.texts)

        def batch_decode(self, ids):
            return [self.texts[i[0]] for i in ids]

    newline, blank = loss.step_token_ids(Toy())
    assert newline == {1, 3, 5} and blank == {1, 2, 4, 5, 6}


def test_step_token_ids_on_the_real_tokenizer():
    from transformers import AutoTokenizer

    import trainer  # the embedded model's folder (converted from its GGUF on first use)
    tok = AutoTokenizer.from_pretrained(trainer.resolve_model(config.EMBEDDED_MODEL, "~/.cache/fanout"))
    newline, blank = loss.step_token_ids(tok)
    nl, = tok.encode("\n")
    letter, = tok.encode("a")
    assert nl in newline and nl in blank
    assert letter not in newline and letter not in blank
    assert all(tok.decode([i]).endswith("\n") for i in newline)


def test_echo_loss_sums_over_microbatches_to_the_mean_clip_nll():
    g = torch.Generator().manual_seed(6)
    lengths, clips = [5, 3, 7, 4, 6], [2, 0, 7, 0, 1]  # sequences 1 and 3 carry no clip
    logp = [-torch.rand(n, generator=g, dtype=torch.float64) * 3 for n in lengths]
    want = sum(-sum(logp[k][:c].tolist()) / c for k, c in enumerate(clips) if c) / 3
    total = 0.0
    for part in ([0, 1], [2], [3, 4]):  # micro-batches of whole sequences
        lp = torch.cat([logp[k] for k in part])
        mask = torch.cat([torch.arange(lengths[k]) < clips[k] for k in part])
        ids = torch.cat([torch.full((lengths[k],), j) for j, k in enumerate(part)])
        total += loss.echo_loss(lp, mask, ids, n_clips=3).item()
    assert total == pytest.approx(want, rel=1e-12)
    x = torch.zeros(4, requires_grad=True)  # no clip tokens: zero loss that still backpropagates
    out = loss.echo_loss(x, torch.zeros(4, dtype=torch.bool), torch.zeros(4, dtype=torch.long), 0)
    out.backward()
    assert out.item() == 0 and torch.equal(x.grad, torch.zeros(4))
