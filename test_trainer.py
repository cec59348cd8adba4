"""The trainer's packed micro-batches and its passes (trainer.py): packed rows against one padded row per unit,
sequences kept apart inside a row, the passes a step runs for each configuration; ./run.sh gpu-check's dry run.
Run by test_all.py."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import bench
import train
import trainer
from kernels.test_kernels import random_prompts, tiny_config, tiny_model

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
    cfg = train.Config(tis_cap=2.0, max_tokens_per_microbatch=budget)
    stats = one_step(cfg, policy, seqs, prompt_lens, group, sampler_logp)
    assert len(calls) == n_micro and stats["clip_frac"] == 0
    assert math.isclose(stats["tis_weight"], math.exp(0.25), rel_tol=1e-5)
    # groups without advantage run no pass; the logged weight is the mean over the tokens that did (it read 0 for them)
    stats = one_step(train.Config(tis_cap=2.0, max_tokens_per_microbatch=budget), trainer.Policy(tiny_model(
        "llama", seed=4)), seqs, prompt_lens, group, sampler_logp, flat=(0, 1, 2))
    assert math.isclose(stats["tis_weight"], math.exp(0.25), rel_tol=1e-5)
    calls.clear()
    cfg = train.Config(tis_cap=2.0, kl_coef=0.1, kl_in_reward=True, updates_per_step=2,
                       max_tokens_per_microbatch=budget)
    ref = trainer.Policy(tiny_model("llama", seed=4))
    one_step(cfg, policy, seqs, prompt_lens, group, sampler_logp, ref)
    assert len(calls) == n_micro * 3  # pi_old before the updates, then one pass for each of the two updates


def test_tb_takes_log_z_from_the_update_pass_when_groups_are_whole():
    """TB with each group whole in a micro-batch: log Z from the update pass (one pass fewer); the same loss,
    log Z spread and weights as with groups split over micro-batches, where a no-grad pass computes log Z."""
    seqs, prompt_lens, group = mixed_groups(seed=9, rollouts=3)
    zeros = [torch.zeros(len(s) - p) for s, p in zip(seqs, prompt_lens)]
    results = []
    for budget in (4096, 40):  # 40 tokens: groups split
        policy, ref = trainer.Policy(tiny_model("qwen2", seed=8)), trainer.Policy(tiny_model("qwen2", seed=9))
        calls = count_passes(policy)
        cfg = train.Config(loss="tb", max_tokens_per_microbatch=budget)
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
    assert stages == ["kernels", "model", "train", "bench trainer", "bench logprob", "bench sampler"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["dry_run"] and sum(s["seconds_cap"] for s in summary["stages"]) <= 8 * 60
    command = next(s["command"] for s in summary["stages"] if s["stage"] == "train")
    assert command[1:6] == ["-m", "torch.distributed.run", "--nproc_per_node", "1", "train.py"]
    cfg = train.parse_config(command[6:])  # the training stage's flags make a valid grpo config
    assert (cfg.model, cfg.steps, cfg.save_every) == (str(tmp_path / "model"), 2, 2)
    config = transformers.AutoConfig.from_pretrained(tmp_path / "model")
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (28, 1536, 151936)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "model")
    assert tokenizer.eos_token_id is not None and len(tokenizer) <= config.vocab_size
    assert tokenizer.apply_chat_template([{"role": "user", "content": "1 + 1 ="}], add_generation_prompt=True)
    bench.random_model(tmp_path / "tiny", "cpu", tiny_config("qwen2"))
    lm = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "tiny", dtype=torch.bfloat16)
    weights = bench.random_weights(tiny_config("qwen2"), "cpu")
    assert all(torch.equal(p, weights[name]) for name, p in lm.state_dict().items() if name in weights)
