"""The trainer's packed micro-batches and its passes (trainer.py): packed rows against one padded row per unit,
sequences kept apart inside a row, the passes a step runs for each configuration; ./run.sh gpu-check's dry run.
Run by test_all.py."""

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers

import bench
import collect
import config
import explore
import loss
import gpu_check
import outputs
import trainer
import reward
from kernels.test_kernels import DEVICE, random_prompts, tiny_config, tiny_model


ROOT = Path(__file__).parent


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
    padded = logprobs_and_grads(model, seqs, prompt_lens, False,
                                trainer.plan(seqs, prompt_lens, 200, False, pack=False))
    for share, whole, cap in ((False, False, math.inf), (False, True, math.inf), (True, False, math.inf),
                              (True, False, 40)):
        plans = trainer.plan(seqs, prompt_lens, 200, share, whole_groups=whole, row_tokens=cap)
        assert max(len(row) for rows in plans for row in rows) >= 2  # rows do hold several pieces
        logp, entropy, grads = logprobs_and_grads(model, seqs, prompt_lens, share, plans)
        torch.testing.assert_close(logp, padded[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(entropy, padded[1], atol=1e-5, rtol=0)
        for a, b in zip(grads, padded[2]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_shared_prompt_rows_end_at_row_tokens_unless_groups_stay_whole():
    """row_tokens bounds a shared prompt's row (a longer single response stands alone); TB's whole groups ignore it."""
    seqs, prompt_lens, group = mixed_groups(seed=1, rollouts=6)
    width = lambda plans: max(len(trainer.lay_out(seqs, prompt_lens, rows, True)[0][0]) for rows in plans)
    longest = max(len(s) - 1 for s in seqs)
    assert width(trainer.plan(seqs, prompt_lens, 400, True)) > 60
    assert width(trainer.plan(seqs, prompt_lens, 400, True, row_tokens=60)) <= max(60, longest)
    for rows in trainer.plan(seqs, prompt_lens, 400, True, whole_groups=True, row_tokens=60):
        ids = {i for row in rows for piece in row for i in piece}
        assert all(set((group == group[i]).nonzero().flatten().tolist()) <= ids for i in ids)  # groups whole


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


def count_passes(policy) -> list:
    calls = []
    policy.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def one_step(cfg, policy, seqs, prompt_lens, group, sampler_logp, ref=None, beta=0.0, flat=()):
    """One train_on_batch, plain SGD with rate 1 (the weights move by the gradient); reward 1 for the first response
    of each group, so every response has an advantage, except in the groups `flat` (reward 0 for all)."""
    rewards = torch.tensor([float(g not in group[:i].tolist() and g not in flat) for i, g in enumerate(group.tolist())])
    batch = trainer.Batch(seqs, prompt_lens, group, rewards, sampler_logp, [torch.zeros_like(x) for x in sampler_logp],
                          torch.ones(len(seqs), dtype=torch.bool), {})
    return trainer.train_on_batch(cfg, policy, ref, torch.optim.SGD(policy.parameters(), lr=1.0), batch, 1.0,
                                  torch.float32, beta)


def test_tis_takes_pi_old_from_the_update_pass():
    """PPO with TIS, one update on fresh samples: pi_old is the weights of the update itself, so the step runs one
    pass a micro-batch (it ran two: a no-grad pass for pi_old first) and TIS weighs each token by exactly
    pi_trainer / pi_sampler; --kl-in-reward still needs pi_old before the update."""
    seqs, prompt_lens, group = mixed_groups(seed=7)
    policy = trainer.Policy(tiny_model("llama", seed=4))
    with torch.no_grad():
        logp = trainer.response_logprobs(policy, seqs, prompt_lens, 1.0, torch.float32)[0]
    sampler_logp = [x - 0.25 for x in logp.split([len(s) - p for s, p in zip(seqs, prompt_lens)])]  # weight e^0.25
    budget = 120
    n_micro = len(trainer.plan(seqs, prompt_lens, budget, True))
    assert n_micro >= 2
    calls = count_passes(policy)
    cfg = config.Config(tis_cap=2.0, max_tokens_per_microbatch=budget)
    stats = one_step(cfg, policy, seqs, prompt_lens, group, sampler_logp)
    assert len(calls) == n_micro and stats["clip_frac"] == 0
    assert math.isclose(stats["tis_weight"], math.exp(0.25), rel_tol=1e-5)
    # groups without advantage run no pass; the logged weight is the mean over the tokens that did (it read 0 for them)
    stats = one_step(config.Config(tis_cap=2.0, max_tokens_per_microbatch=budget), trainer.Policy(tiny_model(
        "llama", seed=4)), seqs, prompt_lens, group, sampler_logp, flat=(0, 1, 2))
    assert math.isclose(stats["tis_weight"], math.exp(0.25), rel_tol=1e-5)
    calls.clear()
    cfg = config.Config(tis_cap=2.0, kl_coef=0.1, kl_in_reward=True, updates_per_step=2,
                       max_tokens_per_microbatch=budget)
    ref = trainer.Policy(tiny_model("llama", seed=4))
    one_step(cfg, policy, seqs, prompt_lens, group, sampler_logp, ref)
    assert len(calls) == n_micro * 3  # pi_old before the updates, then one pass for each of the two updates


def test_kl_in_reward_takes_the_responses_kl_off_their_rewards(monkeypatch):
    """--kl-in-reward (ALGORITHMS.md 0): the advantages are computed from r - kl_coef x sum_t KL_t, the KL of
    each response under the weights before the update against the reference, summed over its tokens."""
    seqs, prompt_lens, group = mixed_groups(seed=11)
    policy, ref = trainer.Policy(tiny_model("llama", seed=5)), trainer.Policy(tiny_model("llama", seed=6))
    with torch.no_grad():
        logp, ref_logp = (trainer.response_logprobs(p, seqs, prompt_lens, 1.0, torch.float32)[0] for p in (policy, ref))
    kl_sums = torch.stack([x.sum() for x in loss.kl(logp, ref_logp, "k3").split([len(s) - p for s, p in
                                                                                   zip(seqs, prompt_lens)])])
    seen, advantages = [], trainer.global_advantages
    monkeypatch.setattr(trainer, "global_advantages", lambda cfg, rewards, *a: seen.append(rewards) or
                        advantages(cfg, rewards, *a))
    zeros = [torch.zeros(len(s) - p) for s, p in zip(seqs, prompt_lens)]
    one_step(config.Config(kl_coef=0.5, kl_in_reward=True, kl_kind="k3"), policy, seqs, prompt_lens, group, zeros, ref)
    assert (kl_sums > 0).all()
    torch.testing.assert_close(seen[-1], seen[0] - 0.5 * kl_sums, atol=1e-4, rtol=1e-4)


def test_tb_takes_log_z_from_the_update_pass_when_groups_are_whole():
    """TB with each group whole in a micro-batch: log Z from the update pass (one pass fewer); the same loss,
    log Z spread and weights as with groups split over micro-batches, where a no-grad pass computes log Z."""
    seqs, prompt_lens, group = mixed_groups(seed=9, rollouts=3)
    zeros = [torch.zeros(len(s) - p) for s, p in zip(seqs, prompt_lens)]
    results = []
    for budget in (4096, 40):  # 40 tokens: groups split
        policy, ref = trainer.Policy(tiny_model("qwen2", seed=8)), trainer.Policy(tiny_model("qwen2", seed=9))
        calls = count_passes(policy)
        cfg = config.Config(loss="tb", max_tokens_per_microbatch=budget)
        stats = one_step(cfg, policy, seqs, prompt_lens, group, zeros, ref, beta=0.05)
        plans = trainer.plan(seqs, prompt_lens, budget, True, whole_groups=True)
        assert len(calls) == len(plans) * (1 if budget > 1000 else 2)
        results.append((stats, [p.detach().clone() for p in policy.parameters()]))
    (whole, weights), (split, weights_split) = results
    for key in ("loss", "kl", "grad_norm"):
        assert math.isclose(whole[key], split[key], rel_tol=1e-5), (key, whole[key], split[key])
    # log Z is about r / beta = 20 here, float32 to 2e-6; its spread (0.47) comes from E[z^2] - E[z]^2
    assert math.isclose(whole["log_z_std"], split["log_z_std"], abs_tol=1e-4)
    for a, b in zip(weights, weights_split):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_gpu_check_dry_run_prints_every_stage_and_builds_the_model_folder(tmp_path):
    """./run.sh gpu-check --dry-run on a CPU: each stage's command, a summary, and the model folder a GPU session
    carries (a Qwen2.5-1.5B-shaped config, SmolLM2's tokenizer); the GPU stage that adds random weights, here for a
    tiny shape on the CPU, writes a folder transformers loads."""
    run = subprocess.run(["./run.sh", "gpu-check", "--dry-run", "--dir", str(tmp_path)], cwd=ROOT, text=True,
                         capture_output=True, env={**os.environ, "PYTHON": sys.executable}, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    stages = [line.split(" (")[0].removeprefix("[dry-run] ") for line in run.stdout.splitlines()
              if line.startswith("[dry-run]")]
    assert stages == ["kernels", "gpu paths", "model", "train", "train lora", "train async", "bench trainer",
                      "bench sampler"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["dry_run"] and sum(s["seconds_cap"] for s in summary["stages"]) <= 8 * 60
    runs = {s["stage"]: s["command"] for s in summary["stages"] if s["stage"].startswith("train")}
    for command in runs.values():
        assert command[1:6] == ["-m", "torch.distributed.run", "--nproc_per_node", "1", "train.py"]
    sync, tba, lora = (config.parse_config(runs[name][6:]) for name in ("train", "train async", "train lora"))
    assert (sync.model, sync.steps, sync.save_every, sync.searchers) == (str(tmp_path / "model"), 2, 2, 0)
    assert (tba.searchers, tba.loss, tba.steps) == (1, "ppo", 1) and lora.lora_rank > 0 and lora.kl_coef > 0
    assert sync.tis_cap == lora.tis_cap == 2 and tba.tis_cap == 0  # async PPO's pi_old is the sampler's: no TIS
    assert sync.entropy_coef > 0 and tba.entropy_coef > 0  # every token runs
    hf_config = transformers.AutoConfig.from_pretrained(tmp_path / "model")
    assert (hf_config.num_hidden_layers, hf_config.hidden_size, hf_config.vocab_size) == (28, 1536, 151936)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "model")
    assert tokenizer.eos_token_id is not None and len(tokenizer) <= hf_config.vocab_size
    assert tokenizer.apply_chat_template([{"role": "user", "content": "1 + 1 ="}], add_generation_prompt=True)
    gpu_check.random_model(tmp_path / "tiny", "cpu", tiny_config("qwen2"))
    lm = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "tiny", dtype=torch.bfloat16)
    weights = bench.random_weights(tiny_config("qwen2"), "cpu")
    assert all(torch.equal(p, weights[name]) for name, p in lm.state_dict().items() if name in weights)


# ---- logprobs, shared rows, checkpoints, schedules ----


def test_pick_prompts_visits_every_prompt_once_per_epoch():
    n, per_step = 10, 4
    picked = [i for step in range(5) for i in explore.pick_prompts(n, step * per_step, per_step, seed=3)]
    assert sorted(picked[:10]) == sorted(picked[10:20]) == list(range(10))
    assert picked[:10] != picked[10:20]  # a fresh order each epoch
    assert explore.pick_prompts(n, 8, per_step, seed=3) == picked[8:12]  # a pure function of the position
    assert explore.pick_prompts(n, 9, 7, seed=3) == picked[9:16]
    assert explore.pick_prompts(n, 8, per_step, seed=4) != picked[8:12]


def test_pass_at_k_matches_enumeration():
    import itertools
    for n, c, k in [(4, 0, 1), (4, 1, 1), (5, 2, 3), (6, 6, 2), (8, 3, 8)]:
        outcomes = [1] * c + [0] * (n - c)
        subsets = list(itertools.combinations(outcomes, k))
        assert abs(collect.pass_at_k(n, c, k) - sum(any(s) for s in subsets) / len(subsets)) < 1e-12


def test_microbatches_respect_the_token_budget():
    lengths = [5, 90, 33, 33, 70, 12, 64, 1, 100]
    for pack in (False, True):
        batches = trainer.microbatches(lengths, budget=128, pack=pack)
        assert sorted(i for b in batches for row in b for i in row) == list(range(len(lengths)))
        for b in batches:  # rows as wide as the micro-batch's longest, rows x width within the budget
            width = max(lengths[i] for row in b for i in row)
            assert all(sum(lengths[i] for i in row) <= width for row in b)
            assert len(b) == 1 or width * len(b) <= 128
            assert pack or all(len(row) == 1 for row in b)
    assert [[3, 5, 0, 7]] in [b[1:] for b in trainer.microbatches(lengths, budget=128)]  # 33 + 12 + 5 + 1 <= 64


def test_response_logprobs_match_full_forward():
    model = tiny_model("llama", seed=6)
    seqs = random_prompts(256, [9, 14, 6], seed=8)
    prompt_lens = [4, 10, 2]
    got, entropy = trainer.response_logprobs(trainer.Policy(model), seqs, prompt_lens, temperature=0.5,
                                           autocast_dtype=torch.float32)
    want, want_entropy = [], []
    for s, p in zip(seqs, prompt_lens):
        with torch.no_grad():
            logp = (model(torch.tensor([s])).logits[0, p - 1:-1] / 0.5).log_softmax(-1)
        want.append(logp.gather(-1, torch.tensor(s[p:])[:, None])[:, 0])
        want_entropy.append(-(logp.exp() * logp).sum(-1))
    torch.testing.assert_close(got.detach(), torch.cat(want), atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy.detach(), torch.cat(want_entropy), atol=1e-5, rtol=0)


def grouped_sequences(seed: int):
    """Three prompts with three responses of 1 to 7 tokens each, shuffled."""
    g = torch.Generator().manual_seed(seed)
    seqs, prompt_lens = [], []
    for i, p in enumerate(random_prompts(256, [9, 14, 6], seed=seed)):
        for k in range(3):
            seqs.append(p + torch.randint(3, 256, (1 + (5 * k + i) % 7,), generator=g).tolist())
            prompt_lens.append(len(p))
    order = torch.randperm(len(seqs), generator=g).tolist()
    return [seqs[i] for i in order], [prompt_lens[i] for i in order]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_shared_prompt_rows_match_one_row_per_response(kind):
    """The CPU trainer runs each prompt once for all its responses: the same logprobs, entropies and
    gradients as one padded row per response."""
    model = tiny_model(kind, seed=6)
    seqs, prompt_lens = grouped_sequences(seed=8)
    rows = trainer.plan(seqs, prompt_lens, math.inf, share_prompts=True, pack=False)[0]
    assert len(rows) == 3 and all(len(row) == 1 and len(row[0]) == 3 for row in rows)  # a group a row, its prompt once
    assert sum(prompt_lens[row[0][0]] for row in rows) == 29
    results = []
    for share in (False, True):
        model.zero_grad()
        logp, entropy = trainer.response_logprobs(trainer.Policy(model), seqs, prompt_lens, 0.7, torch.float32, share,
                                                  rows if share else trainer.plan(seqs, prompt_lens, math.inf, False,
                                                                                  pack=False)[0])
        (logp * torch.arange(len(logp)) + entropy).sum().backward()
        results.append((logp.detach(), entropy.detach(), [p.grad.clone() for p in model.parameters()]))
    (logp, entropy, grads), (logp2, entropy2, grads2) = results
    torch.testing.assert_close(logp2, logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy2, entropy, atol=1e-5, rtol=0)
    for a, b in zip(grads2, grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_a_shared_row_keeps_responses_apart():
    """Changing one response's tokens changes its own logprobs only, not those of the responses beside it
    in the same row."""
    model = tiny_model("llama", seed=2)
    seqs, prompt_lens = grouped_sequences(seed=3)
    policy = trainer.Policy(model)
    with torch.no_grad():
        before = trainer.response_logprobs(policy, seqs, prompt_lens, 1.0, torch.float32, True)[0]
        prompt = lambda j: seqs[j][:prompt_lens[j]]
        # a response that comes first in its row, so that others follow it there
        i = next(j for j in range(len(seqs)) if len(seqs[j]) - prompt_lens[j] >= 2
                 and all(prompt(k) != prompt(j) for k in range(j)))
        assert any(prompt(k) == prompt(i) for k in range(i + 1, len(seqs)))
        changed = [list(s) for s in seqs]
        changed[i][prompt_lens[i]:-1] = [(t + 1) % 256 for t in changed[i][prompt_lens[i]:-1]]
        after = trainer.response_logprobs(policy, changed, prompt_lens, 1.0, torch.float32, True)[0]
    starts = [0, *itertools.accumulate(len(s) - p for s, p in zip(seqs, prompt_lens))]
    moved = [not torch.equal(before[a:b], after[a:b]) for a, b in zip(starts, starts[1:])]
    assert moved == [j == i for j in range(len(seqs))]


def test_shared_rows_give_the_same_gradients_every_time():
    """A prompt's last position predicts the first token of each of its responses in a shared row: the repeats
    must be summed in a fixed order (two identical runs diverged in the last bits when they were not)."""
    torch.manual_seed(0)
    prompts = [torch.randint(0, 256, (12,)).tolist() for _ in range(3)]
    seqs = [prompts[i % 3] + torch.randint(0, 256, (24,)).tolist() for i in range(96)]  # groups interleaved
    policy = trainer.Policy(tiny_model("llama", seed=5))
    seen = set()
    for _ in range(6):
        policy.zero_grad()
        logp, entropy = trainer.response_logprobs(policy, seqs, [12] * len(seqs), 1.0, torch.float32, True)
        (logp * torch.linspace(-1, 1, len(logp))).sum().backward()
        seen.add(b"".join(p.grad.numpy().tobytes() for p in policy.parameters()))
    assert len(seen) == 1


def test_missing_model_path_is_one_sentence(tmp_path):
    with pytest.raises(SystemExit, match="no config.json there"):
        trainer.resolve_model(str(tmp_path / "nope"), str(tmp_path))


def test_activation_checkpointing_gives_the_same_gradients():
    seqs, prompt_lens = random_prompts(256, [9, 14], seed=3), [4, 6]
    grads, layer_calls = [], []
    for checkpointing in (False, True):
        model = tiny_model("llama", seed=4)
        if checkpointing:
            trainer.checkpoint_layers(model)
        calls = []
        model.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
        logp, entropy = trainer.response_logprobs(trainer.Policy(model), seqs, prompt_lens, 0.7, torch.float32)
        (logp.sum() + entropy.sum()).backward()
        grads.append([p.grad for p in model.parameters()])
        layer_calls.append(len(calls))
    assert layer_calls == [1, 2]  # checkpointing recomputes the layer in the backward
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_checkpoint_holds_model_optimizer_and_reference(tmp_path):
    def parts(seed):
        model = trainer.Policy(tiny_model("llama", seed=seed))
        ref = trainer.Policy(tiny_model("llama", seed=seed + 1).requires_grad_(False))
        return model, torch.optim.AdamW(model.parameters()), ref

    model, optimizer, ref = parts(0)
    trainer.reset_reference(ref, model)
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), model.parameters()))
    sum(p.sum() for p in model.parameters()).backward()
    optimizer.step()  # now model, optimizer state and reference all differ from a fresh start
    outputs.save_checkpoint(config.Config(out_dir=str(tmp_path)), model, optimizer, ref, 3, rank=0)
    model2, optimizer2, ref2 = parts(5)
    loaded = outputs.load_checkpoint(config.Config(out_dir=str(tmp_path)), tmp_path / "checkpoints" / "step_000003",
                                     model2, optimizer2, ref2, rank=0)
    assert loaded == (4, None)
    for a, b in zip([*model.parameters(), *ref.parameters()], [*model2.parameters(), *ref2.parameters()]):
        assert torch.equal(a, b)
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))
    assert torch.equal(optimizer2.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])


def test_learning_rate_schedules():
    cfg = config.Config(lr=1.0, steps=10, warmup_steps=2, lr_schedule="cosine")
    lrs = [trainer.lr_at(cfg, s) for s in range(10)]
    assert lrs[0] == 0.5 and lrs[1] == 1.0 and lrs[-1] < 0.05 and all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    assert [trainer.lr_at(config.Config(lr=2.0, steps=10), s) for s in (0, 9)] == [2.0, 2.0]
    warmup = config.Config(lr=2.0, steps=10, warmup_steps=4, lr_schedule="warmup")
    assert [trainer.lr_at(warmup, s) for s in (0, 3, 9)] == [0.5, 2.0, 2.0]
    assert math.isclose(config.brorl_lr(1e-6, 512 * 16, 128 * 512), 1e-6 * math.sqrt(8))


@pytest.mark.parametrize("searchers", [0, 2])
def test_sampler_logprobs_meet_the_trainers_on_its_device(searchers):
    """The sampler's per-token logprobs, on the sampler's device (a GPU's, in a run there), meet the trainer's in
    the loss: TIS in a synchronous step (pi_old = the trainer's, e^0.5 above the sampler's here: every weight is
    e^0.5) and async PPO's pi_old (the sampler's itself: every ratio e^0.5, so positive advantages clip; TIS, whose
    weight would be 1, is refused there). FANOUT_TEST_DEVICE=cuda (./run.sh gpu-check) runs this on a GPU."""
    seqs, prompt_lens = grouped_sequences(seed=4)
    keys = {}
    group = torch.tensor([keys.setdefault(tuple(s[:p]), len(keys)) for s, p in zip(seqs, prompt_lens)])
    policy = trainer.Policy(tiny_model("llama", seed=6).to(DEVICE))
    with torch.no_grad():
        logp = trainer.response_logprobs(policy, seqs, prompt_lens, 1.0, torch.float32)[0]
    sampler_logp = [x - 0.5 for x in logp.split([len(s) - p for s, p in zip(seqs, prompt_lens)])]
    assert sampler_logp[0].device.type == DEVICE
    batch = trainer.Batch(seqs, prompt_lens, group, torch.tensor([float(i % 2) for i in range(len(seqs))]),
                          sampler_logp, [torch.zeros_like(x) for x in sampler_logp],
                          torch.ones(len(seqs), dtype=torch.bool), {})
    cfg = config.Config(loss="ppo", searchers=searchers, tis_cap=0.0 if searchers else 2.0, prompts_per_step=3,
                        rollouts_per_prompt=3)
    stats = trainer.train_on_batch(cfg, policy, None, torch.optim.SGD(policy.parameters(), lr=0.0), batch, 1.0,
                                   torch.float32)
    assert stats.get("tis_weight", 1.0) == pytest.approx(1.0 if searchers else math.exp(0.5), rel=1e-4)
    assert (stats["clip_frac"] > 0) == bool(searchers)


def test_evaluation_counts_a_pass_as_training_does(monkeypatch):
    """A held-out sample passes when its reward reaches --success, the same rule as the training metrics (with
    partial credit, 0.6 passes at --success 0.5 and not at 1)."""
    def sampled(cfg, sampler, tokenizer, task, items, prompts, n, temperature, seed, keys):
        index = [p for p, k in enumerate(n) for _ in range(k)]
        r = SimpleNamespace(prompt_index=index, sample_index=[0] * len(index), tokens=[[1]] * len(index),
                            finish_reason=["stop"] * len(index))
        return r, torch.tensor([0.6 if p == 0 else 0.3 for p in index]), 0, 0, [{}] * len(index)

    monkeypatch.setattr(collect, "generate_and_score", sampled)
    monkeypatch.setattr(collect, "encode_prompts", lambda tokenizer, template, items: [[1]] * len(items))
    task = reward.Task("x.jsonl", [{"question": "a"}, {"question": "b"}])
    for success, passed in ((0.5, 0.5), (1.0, 0.0)):
        result, _ = collect.evaluate(config.Config(success=success, eval_samples=2), None, None, task, seed=0)
        assert result["avg@2"] == result["greedy_acc"] == passed and result["pass@2"] == passed


@pytest.mark.parametrize("k", [1, 3, 5])
def test_evaluation_figures_are_their_formulas(monkeypatch, k):
    """On random per-sample outcomes, lengths and cut-offs (13 prompts over 1..3 ranks' shares): avg@k is the mean
    over every prompt's k samples, pass@k the unbiased estimator 1 - C(n-c, k) / C(n, k) (with n = k: a pass
    anywhere), greedy accuracy, mean length and the share cut at max_new_tokens; each completion noted once."""
    gen = torch.Generator().manual_seed(k)
    P = 13
    outcome, length = torch.rand(P, k, generator=gen) < 0.4, torch.randint(1, 9, (P, k), generator=gen)
    greedy = torch.rand(P, generator=gen) < 0.5

    def sampled(cfg, sampler, tokenizer, task, items, prompts, n, temperature, seed, keys):
        index = [p for p, m in enumerate(n) for _ in range(m)]
        sample = [s for m in n for s in range(m)]
        got = [greedy[keys[p]] if temperature == 0 else outcome[keys[p], s] for p, s in zip(index, sample)]
        lens = [1 if temperature == 0 else int(length[keys[p], s]) for p, s in zip(index, sample)]
        r = SimpleNamespace(prompt_index=index, sample_index=sample, tokens=[[7] * m for m in lens],
                            finish_reason=["length" if m == 8 else "stop" for m in lens])
        return r, torch.tensor(got, dtype=torch.float32), 0, 0, [{"key": keys[p]} for p in index]

    monkeypatch.setattr(collect, "generate_and_score", sampled)
    monkeypatch.setattr(collect, "encode_prompts", lambda tokenizer, template, items: [[1]] * len(items))
    task = reward.Task("x.jsonl", [{"question": str(i)} for i in range(P)])
    c = outcome.sum(1).tolist()
    expected = {f"avg@{k}": outcome.float().mean().item(),
                f"pass@{k}": sum(1 - math.comb(k - ci, k) / math.comb(k, k) for ci in c) / P,
                "greedy_acc": greedy.float().mean().item(), "response_len": length.float().mean().item(),
                "truncated_frac": (length == 8).float().mean().item()}
    for world in (1, 2, 3):  # each rank's share, summed as all_sum would (one process: the sums by hand)
        shares = [collect.evaluate(config.Config(eval_samples=k), None, None, task, 0, rank, world)
                  for rank in range(world)]
        if world == 1:
            result, notes = shares[0]
            assert result == pytest.approx({**result, **expected}) and result["eval_prompts"] == P
            assert sorted((n["key"], n["sample"], n["greedy"]) for n in notes) == sorted(
                [(p, s, False) for p in range(P) for s in range(k)] + [(p, 0, True) for p in range(P)])
        # every rank weighs its share by the whole set: the shares' figures add up to the set's
        assert sum(r[f"avg@{k}"] for r, _ in shares) == pytest.approx(expected[f"avg@{k}"])
        assert sum(r[f"pass@{k}"] for r, _ in shares) == pytest.approx(expected[f"pass@{k}"])

