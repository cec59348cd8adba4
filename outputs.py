"""What a run writes: metrics (JSONL, wandb, a plot), checkpoints that --resume continues from, and a
transformers-loadable export of the trained model (README, Outputs).
"""

import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

import lora
from cluster import barrier
from config import Config


class Logger:
    """Metrics (metrics.jsonl), completions (samples.jsonl, eval_<step>.jsonl) on rank 0, wandb when on, a plot."""

    def __init__(self, cfg: Config, enabled: bool, start_step: int = 0):
        self.enabled, self.rows, self.k = enabled, [], cfg.eval_samples
        self.dir = Path(cfg.out_dir)
        self.wandb = None
        if enabled and not start_step and (self.dir / "metrics.jsonl").exists():  # not resumed: an earlier run, kept
            kept = f"{cfg.out_dir.rstrip('/')}.{time.strftime('%Y%m%d-%H%M%S')}"  # whole, never overwritten or mixed in
            try:
                self.dir.rename(kept)
            except OSError as e:  # a mount point, the working directory, a parent not writable
                raise SystemExit(f"--out-dir {self.dir} holds a run that cannot be moved aside ({e}); name a new one")
            print(f"--out-dir {cfg.out_dir} held an earlier run; it is now in {kept}")
        try:  # before any step: a folder that cannot be made, W&B without a login, one sentence
            if enabled:
                self.dir.mkdir(parents=True, exist_ok=True)
                self.rows, self.file = reopen(self.dir / "metrics.jsonl", start_step)
                self.samples = reopen(self.dir / "samples.jsonl", start_step)[1]
                if cfg.wandb != "disabled":
                    import wandb
                    self.wandb = wandb.init(project="fanout", mode=cfg.wandb, config=dataclasses.asdict(cfg))
        except Exception as e:
            online = ", and log in to W&B (wandb login) or pass --wandb offline" if cfg.wandb == "online" else ""
            raise SystemExit(f"the run's outputs cannot start ({type(e).__name__}: {e}); name an --out-dir folder you "
                             f"can write{online}")

    def log(self, row: dict):
        if self.enabled:
            self.rows.append(row)
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        if self.wandb is not None:
            self.wandb.log({f"eval/{k}": v for k, v in row.items()} if "eval" in row else row)

    def completions(self, notes: list[dict], eval_step: int | None = None) -> None:
        """A step's completion notes appended to samples.jsonl, an evaluation's to eval_<step>.jsonl; wandb Tables."""
        if not self.enabled or not notes:
            return
        file = self.samples if eval_step is None else open(self.dir / f"eval_{eval_step}.jsonl", "w")
        file.writelines(json.dumps(note) + "\n" for note in notes)
        file.flush() if eval_step is None else file.close()
        if self.wandb is not None:
            import wandb
            columns = list(dict.fromkeys(key for note in notes for key in note))
            table = wandb.Table(columns, [[note.get(c) for c in columns] for note in notes], allow_mixed_types=True)
            self.wandb.log({"samples" if eval_step is None else "eval/completions": table})

    def plot(self) -> None:
        """plot.png: reward and the evaluations' figures, entropy (E3's target), response lengths, E3's temperature."""
        if not self.enabled:
            return
        from matplotlib.figure import Figure  # not pyplot: no backend to pick, no global figure left open
        steps, evals = [r for r in self.rows if "step" in r], [r for r in self.rows if "eval_step" in r]
        panels = {"reward": ("reward",), "entropy": ("entropy", "entropy_target"), "response length": ("response_len",)}
        if len({r.get("temperature") for r in steps}) > 1:
            panels["temperature"] = ("temperature",)
        eval_keys = {"reward": (f"avg@{self.k}", f"pass@{self.k}", "greedy_acc", "truncated_frac"),
                     "response length": ("response_len",)}
        fig = Figure(figsize=(4 * len(panels), 3))
        for ax, (title, keys) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels.items()):
            for key in (k for k in keys if any(k in r for r in steps)):  # E3's target, only where E3 runs
                ax.plot([r["step"] for r in steps if key in r], [r[key] for r in steps if key in r], label=key)
            for key in eval_keys.get(title, ()) if evals else ():
                ax.plot([r["eval_step"] for r in evals], [r[key] for r in evals], "o--", label=f"eval {key}")
            ax.set(title=title, xlabel="step")
            if len(ax.lines) > 1:
                ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(self.dir / "plot.png", dpi=100)
        self.file.close()
        self.samples.close()
        if self.wandb is not None:
            self.wandb.finish()


def reopen(path: Path, start_step: int) -> tuple[list[dict], object]:
    """(the rows a run keeps, path open to append to): those before the checkpoint it resumes from (none if new)."""
    lines = path.read_text().splitlines() if start_step and path.is_file() else []
    rows = [json.loads(line) for line in lines if line.endswith("}")]  # not a row cut off when the run died
    rows = [r for r in rows if r.get("step", -1) < start_step and r.get("eval_step", 0) <= start_step
            and r.get("eval") != "after"]
    file = open(path, "w")
    file.writelines(json.dumps(row) + "\n" for row in rows)
    return rows, file


def save_checkpoint(cfg: Config, model, optimizer, ref_model, step: int, rank: int, loop_state=None,
                    group=None) -> None:
    """Sharded model and optimizer, every rank's state, in step_N.tmp renamed when complete (never half-read)."""
    root = Path(cfg.out_dir) / "checkpoints"
    tmp, final = root / f"step_{step:06d}.tmp", root / f"step_{step:06d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier(group)
    dcp.save(checkpoint_state(model, optimizer, ref_model), checkpoint_id=tmp, process_group=group,
             no_dist=not dist.is_initialized())
    torch.save({"step": step, "explore": loop_state, "run": run_kind(cfg)}, tmp / f"trainer_rank{rank}.pt")
    barrier(group)
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    barrier(group)


def run_kind(cfg: Config) -> str:  # the loop and prompts (by index) a checkpoint's state is of: a resume must match
    return (f"{'a TBA' if cfg.searchers else 'a synchronous'} run on --task {cfg.task} --task-size {cfg.task_size} "
            f"--eval-task '{cfg.eval_task}' --eval-prompts {cfg.eval_prompts} --seed {cfg.seed}")


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


TRAINED = StateDictOptions(ignore_frozen_params=True, strict=False)  # what trains: with LoRA the adapters alone


def checkpoint_state(model, optimizer, ref_model) -> dict:
    """The sharded tensors a checkpoint holds: the trained parameters, their optimizer state and the reference
    (resets move it), if it is a model of its own (LoRA's is the policy's base)."""
    model_state, optim_state = get_state_dict(model, optimizer, options=TRAINED)
    state = {"model": model_state, "optim": optim_state}
    if isinstance(ref_model, torch.nn.Module):
        state["ref"] = get_model_state_dict(ref_model)
    return state


def load_checkpoint(cfg: Config, path: Path, model, optimizer, ref_model, rank: int, group=None):
    """Restore model, optimizer and reference: (the step to run next, the loop's saved state)."""
    state = checkpoint_state(model, optimizer, ref_model)
    try:
        dcp.FileSystemReader(path).read_metadata()  # a damaged index fails here, before dcp logs its own tracebacks
        trainer = torch.load(path / f"trainer_rank{rank}.pt", weights_only=False)
        if trainer.get("run", run_kind(cfg)) != run_kind(cfg):
            raise ValueError(f"it holds the state of {trainer['run']}; this is {run_kind(cfg)}")
        dcp.load(state, checkpoint_id=path, process_group=group, no_dist=not dist.is_initialized())
    except (Exception, dcp.CheckpointException) as e:  # damaged, or another model's or flags': one sentence
        e = next(iter(e.failures.values()))[0] if isinstance(e, dcp.CheckpointException) else e  # a rank's error
        raise SystemExit(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); resume with the model and "
                         "flags it was saved with, delete it to resume from an older one, or start without --resume")
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=TRAINED)
    if isinstance(ref_model, torch.nn.Module):
        set_model_state_dict(ref_model, state["ref"])
    return trainer["step"] + 1, trainer["explore"]


def export_hf(cfg: Config, model, tokenizer, rank: int) -> None:
    """Write safetensors, config and tokenizer that AutoModelForCausalLM.from_pretrained loads (LoRA merged), and
    with LoRA the adapters alone in <folder>/adapter, which peft.PeftModel.from_pretrained loads onto the base."""
    full = {name: w.detach() for name, w in lora.merged(model.lm, list(model.lm.state_dict()))}  # every rank gathers
    adapters = {f"base_model.model.{name}": full.pop(name).cpu().contiguous() for name in lora.adapter_names(model.lm)}
    if model.lm.config.tie_word_embeddings:  # gathered, the tied head is a separate copy: save it once, as HF does
        full.pop("lm_head.weight", None)
    if rank != 0:
        return
    if cfg.lora_rank:  # PEFT's folder: its own config file and adapter_model.safetensors, PEFT's names
        from peft import LoraConfig
        folder = Path(cfg.export_hf) / "adapter"
        LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, task_type="CAUSAL_LM",
                   target_modules=list(cfg.lora_targets),
                   base_model_name_or_path=str(model.lm.config._name_or_path)).save_pretrained(folder)
        save_file(adapters, folder / "adapter_model.safetensors")
    model.lm.save_pretrained(cfg.export_hf, state_dict=full)
    tokenizer.save_pretrained(cfg.export_hf)
    print(f"exported the trained model to {cfg.export_hf}")
